"""Exporting implicit models: ``to_onnx`` (an ONNX graph onnxruntime runs; ``onnx_export``)."""

from .onnx_export import DEFAULT_OPSET, to_onnx

__all__ = ["DEFAULT_OPSET", "to_onnx"]
