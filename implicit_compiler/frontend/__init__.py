"""The ONNX frontend: lower ONNX networks into implicit models, and verify the result."""

from __future__ import annotations

from . import ops  # noqa: F401  (registers every lowering)
from .lower import from_onnx
from .registry import supported_ops_table
from .verification import OutputComparison, VerifyReport, verify

__all__ = ["OutputComparison", "VerifyReport", "from_onnx", "supported_ops_table", "verify"]
