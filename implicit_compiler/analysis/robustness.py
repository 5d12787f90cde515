"""Local robustness verdicts, VNN-COMP style: is the label kept for every input of the box?

For a sample u0 with label c (by default its predicted class) the property is
y_c(u) - y_j(u) > 0 for every j != c and every u with |u - u0| <= eps. The margins
m_j = y_c - y_j are bounded from below directly, as rows of an objective R (CROWN bounds a
difference of outputs more tightly than the difference of their bounds), for all ordered pairs
at once. The verdict is "robust" when every lower bound is positive, "not proved" otherwise
(the bounds are sound, not complete: a "not proved" sample may still be robust), and
"misclassified" when the label given is not the prediction at u0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import arguments
from ..errors import AnalysisError
from ..model import ImplicitModel
from ..runtime.batching import flatten_inputs
from .bounds import OutputBounds, per_input, relaxed_bounds, rounded_outward

VERDICTS = ("robust", "not proved", "misclassified")


@dataclass(frozen=True, eq=False)
class RobustnessReport:
    """Verdicts over the boxes |u - u0[i]| <= eps.

    Attributes:
        labels: the label of each sample, (batch,).
        predictions: argmax y(u0), (batch,).
        margins: lower bounds of y_label - y_j over the box, (batch, q); +inf at j = label.
        verdicts: "robust", "not proved" or "misclassified" per sample.
        method: "crown" or "ibp".
        condition: why the bounds hold (see ``OutputBounds.condition``).
        bounds: the outputs' own bounds over the same boxes (``output_bounds``'), from the same
            pass: its intermediate bounds serve both.
    """

    labels: np.ndarray
    predictions: np.ndarray
    margins: np.ndarray
    verdicts: tuple[str, ...]
    method: str
    condition: str
    bounds: OutputBounds

    @property
    def robust(self) -> np.ndarray:
        return np.array([verdict == "robust" for verdict in self.verdicts])


def certify_robustness(
    model: ImplicitModel, u0: Any, eps: Any, labels: Any = None, method: str = "crown"
) -> RobustnessReport:
    """The robustness verdict of each sample of u0 (one sample or a batch) at radius eps.

    Args:
        model: a classifier: y holds one score per class.
        u0: the centers.
        eps: the l_inf radius: a scalar, (p,) or shaped like one sample.
        labels: the class of each sample (int or (batch,)); None: the predicted class.
        method: "crown" or "ibp".

    Raises:
        AnalysisError: fewer than 2 outputs, labels out of range, or the bounds' condition fails.
    """
    method = arguments.choice(method, ("crown", "ibp"), "method")
    if model.q < 2:
        raise AnalysisError(f"robustness needs at least 2 outputs (class scores), the model has q = {model.q}")
    radius = per_input(model, arguments.real_values(eps, "eps"), "eps")
    if (radius < 0).any():
        raise AnalysisError(f"eps: expected nonnegative radii, got minimum {radius.min():.6g}")
    inputs = flatten_inputs(model.inputs, u0)[0].astype(np.float64)
    solution = model.solve(u0)
    scores = np.atleast_2d(np.asarray(solution.y, dtype=np.float64))
    predictions = scores.argmax(axis=1)
    labels = predictions if labels is None else np.broadcast_to(np.asarray(labels), predictions.shape)
    if labels.dtype.kind not in "iu" or (labels < 0).any() or (labels >= model.q).any():
        raise AnalysisError(f"labels: expected class indices in [0, {model.q}), got {labels!r}")
    q = model.q
    pairs = np.array([(i, j) for i in range(q) for j in range(q) if i != j])
    differences = np.zeros((len(pairs), q))
    differences[np.arange(len(pairs)), pairs[:, 0]] = 1.0
    differences[np.arange(len(pairs)), pairs[:, 1]] = -1.0
    objective = np.vstack([np.eye(q), differences])  # the outputs, then every y_i - y_j
    low, high, margin, condition = relaxed_bounds(model, inputs, radius, method, solution.error, objective)
    bounds = rounded_outward(solution.y, low[:, :q], high[:, :q], margin[:, :q], method, condition)
    lower = np.nextafter(low[:, q:], -np.inf)
    margins = np.full((inputs.shape[0], q), np.inf)
    for row, (i, j) in enumerate(pairs):
        chosen = labels == i
        margins[chosen, j] = lower[chosen, row]
    verdicts = tuple(
        "misclassified" if label != prediction else "robust" if (margin > 0).all() else "not proved"
        for label, prediction, margin in zip(labels, predictions, margins)
    )
    return RobustnessReport(labels.copy(), predictions, margins, verdicts, method, condition, bounds)
