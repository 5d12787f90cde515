"""Runtime shims that let auto_LiRPA 0.3 (2022, pins torch < 1.13) import and run next to
numpy 2 and torch 2.13, the versions of the reference environment made by scripts/setup_lirpa.

Import this module before ``auto_LiRPA``; call ``install()`` (done on import). Nothing inside
site-packages is patched: each shim puts back, at run time, a name that auto_LiRPA 0.3 reaches
for and that a newer numpy or torch removed, with the same behaviour it had there.
"""

from __future__ import annotations

import sys
import types


def _numpy_arraysetops() -> None:
    """``from numpy.lib.arraysetops import isin`` (auto_LiRPA/operators/base.py): numpy 2 made
    ``numpy.lib.arraysetops`` private (``numpy.lib._arraysetops_impl``); ``isin`` itself lives
    on as ``numpy.isin``. Register a module of that name exposing it."""
    import numpy as np

    if "numpy.lib.arraysetops" in sys.modules:
        return
    try:
        import numpy.lib.arraysetops  # noqa: F401  (numpy 1: nothing to do)
    except ImportError:
        module = types.ModuleType("numpy.lib.arraysetops")
        module.isin = np.isin
        sys.modules["numpy.lib.arraysetops"] = module
        np.lib.arraysetops = module


def _set_opset_version() -> None:
    """``from torch.onnx.symbolic_helper import _set_opset_version`` (auto_LiRPA/parse_graph.py,
    which calls ``_set_opset_version(12)`` before ``_optimize_graph``): torch 1.13 replaced it by
    the ``GLOBALS.export_onnx_opset_version`` property, which torch 2.13 keeps in
    ``torch.onnx._internal.torchscript_exporter._globals``. Same effect: set that property."""
    import torch.onnx.symbolic_helper as helper

    if hasattr(helper, "_set_opset_version"):
        return
    from torch.onnx._internal.torchscript_exporter._globals import GLOBALS

    def _set_opset_version(opset_version: int) -> None:
        GLOBALS.export_onnx_opset_version = opset_version

    helper._set_opset_version = _set_opset_version


def _node_getitem() -> None:
    """``n[k]`` on a ``torch._C.Node`` (auto_LiRPA/parse_graph.py reads every attribute as
    ``{k: n[k] for k in n.attributeNames()}``): torch < 1.13 monkeypatched ``Node.__getitem__``
    in torch/onnx/utils.py to read an attribute whatever its kind; torch 2 dropped that patch
    and keeps the same function as ``symbolic_helper._node_get`` (``getattr(n, n.kindOf(k))(k)``).
    """
    import torch

    if hasattr(torch._C.Node, "__getitem__"):
        return

    def __getitem__(node, key):  # noqa: N807  (the dunder auto_LiRPA calls)
        return getattr(node, node.kindOf(key))(key)

    torch._C.Node.__getitem__ = __getitem__


def install() -> None:
    """Install every shim (idempotent)."""
    _numpy_arraysetops()
    _set_opset_version()
    _node_getitem()


install()
