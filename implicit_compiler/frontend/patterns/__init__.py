"""Folding the exporters' decompositions back into one activation or one normalization.

torch's legacy exporter (and, for SiLU, the dynamo exporter too) writes some layers as chains
of elementwise ops. Lowered as written, every product of two variables there costs two square
blocks (the square identity); recognised, the chain is one componentwise activation block, or
one normalization. ``fold_patterns`` rewrites the prepared (float64) graph before lowering:

- GELU, erf and tanh forms, into Gelu (``gelu``);
- x * G(x), G a chain of unary ops: SiLU / Swish, Mish, HardSwish (``gates``);
- LayerNorm as exporters write it below opset 17, into LayerNormalization (``layer_norm``).

``catalog`` lists the matchers, in the order they are tried, and what each pattern becomes: the
one place to extend. ``rewrite`` is the driver (``fold_patterns``), over the graph index of
``graph_index``, with the helpers every matcher shares in ``matching``; ``functions`` defines each
private op as a model-local ONNX function, ``lowering`` lowers it.

Products of several Muls are flattened (the exporters nest them in different orders), and the
constant factors multiplied together. A match is exact or nothing: each constant must round to
the same float32 as the one of the formula (exporters store float32: sqrt 2 is 1.4142135), the
intermediate values must be read by nothing outside the pattern (nor be graph outputs; a value
read elsewhere keeps its chain), and the result must have x's shape (shape inference; a constant
that broadcasts x to a larger shape is not folded). A chain with any other constant is left as
it is. The folded op uses the exact constants: that changes the model's function by less than
the float32 rounding of its constants (relative 6e-8 of those constants).

The folded nodes are written in the private domain ``PATTERN_DOMAIN``, whatever the model's
opset (Gelu is an op of opset 20, LayerNormalization of 17, Mish of 18: writing them in the
default domain of an opset-14 model would make an invalid model, and raising its opset would
change the meaning of its other ops). Each private op is lowered by the registry's lowering of
the standard op it names (``STANDARD``), given a node of that op; ``Silu`` (which ONNX has no
op for) is lowered to the ``silu`` activation (``lowering``). Each private op also gets a
model-local ONNX function with its definition (``functions``), so that the rewritten graph stays a
valid model: shape inference (the batch-axis check and the size estimate) goes through it, and
onnxruntime and onnx.reference can run it. ``from_onnx`` folds a pattern only when the op it becomes has a
lowering (otherwise the chain is lowered as written).
"""

from __future__ import annotations

from .catalog import FOLDED, MATCHERS, STANDARD, folded_patterns_table
from .lowering import lower_silu, standard_node
from .rewrite import Fold, fold_patterns, pattern_lowerable

__all__ = [
    "FOLDED",
    "MATCHERS",
    "STANDARD",
    "Fold",
    "fold_patterns",
    "folded_patterns_table",
    "lower_silu",
    "pattern_lowerable",
    "standard_node",
]
