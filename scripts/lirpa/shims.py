"""Runtime shims that let auto_LiRPA 0.3 (2022, pins torch < 1.13) import and run next to
numpy 2 and torch 2.13, the versions of the reference environment made by scripts/setup_lirpa.

Import this module before ``auto_LiRPA``: it calls ``install()``, which also imports auto_LiRPA
(swallowing the warnings its import prints: ``torch.jit.script`` is deprecated in torch 2, and
it sets ``warnings.simplefilter("once")``). Nothing inside site-packages is patched: each shim
puts back, at run time, a name that auto_LiRPA 0.3 reaches for and that a newer numpy or torch
removed or changed, with the same behaviour it had there.
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


def _named_members() -> None:
    """``BoundedModule._named_members(get_members_fn, prefix, recurse)`` (auto_LiRPA/
    bound_general.py overrides torch's to translate names): torch >= 1.13 calls it from
    ``named_parameters`` with a ``remove_duplicate`` keyword, which the override does not take
    (CROWN reads ``list(self.parameters())[0].dtype`` when it bounds a node by a full identity,
    e.g. on ACAS Xu). The override already drops duplicates (its memo), so accept the keyword
    and ignore it. Needs auto_LiRPA imported: done here, after the shims its import needs."""
    import warnings

    with warnings.catch_warnings(record=True):  # see the module docstring
        from auto_LiRPA.bound_general import BoundedModule

    original = BoundedModule._named_members
    if getattr(original, "_shimmed", False):
        return

    def _named_members(self, get_members_fn, prefix="", recurse=True, remove_duplicate=True):
        return original(self, get_members_fn, prefix=prefix, recurse=recurse)

    _named_members._shimmed = True
    BoundedModule._named_members = _named_members


def install() -> None:
    """Install every shim (idempotent): the three auto_LiRPA's import needs, then it, then the
    one that patches auto_LiRPA itself."""
    _numpy_arraysetops()
    _set_opset_version()
    _node_getitem()
    _named_members()


install()
