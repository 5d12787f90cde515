"""What is folded: the matchers, in the order they are tried, and the private op each pattern becomes.

To fold one more decomposition: write its matcher (``(graph, root) -> (the matched nodes' indices,
the new private node, new constants) | None``, matched from the chain's last node; the helpers of
``matching``), list it in ``MATCHERS``, give its private op a standard op in ``STANDARD`` (or a
lowering of its own in ``lowering``), its definition in ``functions._function``, its attributes in
``lowering.standard_node`` where the standard op has any, and a row in ``FOLDED`` (the op table).
"""

from __future__ import annotations

from .gates import _hard_sigmoid_of_hard_swish, _unary_gate
from .gelu import _match_gelu, _match_gelu_tanh
from .layer_norm import _match_layer_norm
from .select import FOLDED as SELECT_FOLDED
from .select import MATCHERS as SELECT_MATCHERS

# private op -> (the standard op whose lowering lowers it, its since_version); Silu is ours.
STANDARD = {
    "Gelu": ("Gelu", 20),
    "GeluTanh": ("Gelu", 20),
    "HardSwish": ("HardSwish", 14),
    "Mish": ("Mish", 18),
    "LayerNormalization": ("LayerNormalization", 17),
}
# (pattern, what it becomes) for the op table
FOLDED = (
    ("GELU, erf form: x * (1 + Erf(x / sqrt 2)) * 0.5", "Gelu (approximate='none')"),
    ("GELU, tanh form: x * (1 + Tanh(sqrt(2/pi) (x + 0.044715 x^3))) * 0.5", "Gelu (approximate='tanh')"),
    ("SiLU / Swish: x * Sigmoid(x)", "one silu block"),
    ("Mish: x * Tanh(Softplus(x))", "Mish"),
    ("HardSwish: x * HardSigmoid(x; 1/6, 1/2)", "HardSwish"),
    ("LayerNorm: (x - mean) / Sqrt(mean((x - mean)^2) + eps) [* scale] [+ bias]", "LayerNormalization"),
    *SELECT_FOLDED,
)

# Tried in this order at each node, last nodes first (the largest match wins).
MATCHERS = (
    _match_layer_norm,
    _match_gelu,
    _match_gelu_tanh,
    _unary_gate("Silu", ("Sigmoid",)),
    _unary_gate("Mish", ("Tanh", "Softplus")),
    _unary_gate("HardSwish", ("HardSigmoid",), _hard_sigmoid_of_hard_swish),
    *SELECT_MATCHERS,  # Elu, Selu, ThresholdedRelu from their ONNX function bodies (select.py)
)


def folded_patterns_table() -> str:
    """A markdown table of the decompositions folded before lowering and what each becomes."""
    lines = ["| folded pattern | becomes |", "| --- | --- |"]
    lines += [f"| {pattern} | {becomes} |" for pattern, becomes in FOLDED]
    return "\n".join(lines)
