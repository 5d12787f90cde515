"""Figures of training histories (matplotlib's Agg canvas, saved as ``implicit_compiler.viz`` saves).

``plot_bcd_history`` draws a ``bcd.BCDHistory`` like the IDL report's convergence figures: the
losses and the objective against the round on a log scale (left), the Fenchel divergence, the
dual variables' norm and the gap between relaxed and equilibrium states (right, log scale). An
existing file is only replaced with ``overwrite=True``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.ticker import MaxNLocator

from ..errors import ArgumentValueError
from ..viz import _check_target, _figure, _save

HISTORY_SIZE_PX = (1500, 600)


def plot_bcd_history(history: Any, path: str | Path, *, title: str | None = None, overwrite: bool = False) -> Path:
    """Draw a BCD history (loss and divergence against the round, log scale) into a PNG.

    Args:
        history: a ``bcd.BCDHistory`` (e.g. ``ImplicitRegressor(solver="bcd").fit(...).history_``).
        path: where to write the PNG (parent folders are created).
        title: the figure title (default: the training type and the number of rounds).
        overwrite: replace an existing file; by default an existing file is left as it is and
            ``OverwriteError`` raised.

    Returns:
        The path written, 1500 x 600 pixels.
    """
    path = _check_target(path, overwrite)
    if not getattr(history, "objective", ()):
        raise ArgumentValueError(f"history: expected a BCDHistory with at least one round, got {history!r}")
    rounds = np.arange(1, len(history.objective) + 1)
    figure = _figure(HISTORY_SIZE_PX)
    left, right = figure.subplots(1, 2)
    _curve(left, rounds, history.objective, "objective J (relaxed)", "tab:gray", "--")
    _curve(left, rounds, history.loss, "loss of the relaxed states", "tab:blue", "-")
    _curve(left, rounds, history.equilibrium_loss, "loss at the equilibrium (training)", "tab:red", "-")
    _curve(left, rounds, history.eval_loss, "loss at the equilibrium (eval set)", "tab:orange", "-")
    left.set_title("loss")
    _curve(right, rounds, history.fenchel, "Fenchel divergence sum_i F_i", "tab:green", "-")
    _curve(right, rounds, history.dual_norm, "dual norm ||lambda||_2", "tab:purple", "--")
    _curve(right, rounds, history.equilibrium_gap, "gap ||X - X*||_F / sqrt(m)", "tab:brown", ":")
    right.set_title("implicit constraint")
    for axes in (left, right):
        axes.set_xlabel("round")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_yscale("log")
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(fontsize=8)
    figure.suptitle(title or f"BCD ({history.type_of_training}), {len(rounds)} rounds")
    return _save(figure, path, overwrite)


def _curve(axes: Any, rounds: np.ndarray, values: Any, label: str, color: str, style: str) -> None:
    """One curve; values that a log scale cannot show (<= 0) are left out; nothing when empty."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return
    shown = np.where(values > 0, values, np.nan)
    axes.plot(rounds[: values.size], shown, style, color=color, label=label, marker="." if values.size < 40 else None)
