"""Well-posedness: does x = phi(A x + B u + b_x) have exactly one solution for every input?

Acyclic model. When the block graph has no cycle, the blocks can be computed one after the
other from blocks already known (forward substitution): the solution exists and is unique for
any activation.

Cyclic component. Let c be a strongly connected set of blocks and L the largest Lipschitz
constant of its activations. With everything outside c fixed, the component's states solve
x_c = T(x_c) = phi(A_cc x_c + w), and componentwise |T(x) - T(x')| <= L |A_cc| |x - x'|. If

    L * lambda_pf(|A_cc|) < 1,

T is a contraction in a weighted max-norm (weights from the Perron-Frobenius structure of
|A_cc|; see ``rescale``), so the component has a unique solution and fixed-point iteration
converges to it from any start (El Ghaoui et al., "Implicit deep learning": lambda_pf(|A|) < 1
for non-expansive phi). The cheaper test L * ||A_cc||_inf < 1 implies it and is reported too;
it is not invariant under rescaling of the state, the Perron-Frobenius condition is. If
|A_cc| is nilpotent (lambda_pf = 0), the component is acyclic at the level of single states and
forward substitution in state order solves it for any activation, Lipschitz or not.

The condition is sufficient only: when it fails the verdict is "not shown", not "ill-posed".
The model is well-posed when every cyclic component is (the components are solved in
topological order, each from the ones before it).

A structured model (convolutions kept as kernels) is never materialized: only the cyclic
components' rows of |A| are read, as CSR when they are small enough (``_block_solve``'s
``COMPONENT_CSR_ENTRIES``), else as an operator on the kernels, whose lambda_pf is found by
iteration and ||A_cc||_inf by one product with ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from ..model import ImplicitModel
from ..runtime.plan import execution_order
from ._block_solve import component_matrix, component_names, component_states
from .spectral import perron_frobenius_eigenvalue


@dataclass(frozen=True)
class ComponentReport:
    """The well-posedness verdict for one cyclic strongly connected component.

    Attributes:
        blocks: names of the component's blocks, in state order.
        states: number of states in the component.
        perron_frobenius: lambda_pf(|A_cc|), A restricted to the component's states.
        inf_norm: ||A_cc||_inf, the largest absolute row sum.
        lipschitz: the largest Lipschitz constant of the component's activations (inf for square).
        well_posed: True when shown (L * lambda_pf < 1, or lambda_pf = 0); None when the
            sufficient condition fails and well-posedness is not shown.
        reason: the verdict with its numbers, and what to do when it is not shown.
    """

    blocks: tuple[str, ...]
    states: int
    perron_frobenius: float
    inf_norm: float
    lipschitz: float
    well_posed: bool | None
    reason: str


@dataclass(frozen=True)
class WellPosednessReport:
    """The model's well-posedness verdict.

    Attributes:
        well_posed: True when the equilibrium is shown to be unique for every input (acyclic,
            or every cyclic component shown well-posed); False when not shown.
        acyclic: True when the block graph has no cycle.
        components: one report per cyclic component, in execution order (empty when acyclic).
        reason: the verdict with its reason.
    """

    well_posed: bool
    acyclic: bool
    components: tuple[ComponentReport, ...]
    reason: str


def wellposedness(model: ImplicitModel) -> WellPosednessReport:
    """Check the sufficient condition for a unique equilibrium, component by component.

    Args:
        model: the implicit model.

    Returns:
        A ``WellPosednessReport``; analyses print nothing, ``report.reason`` says why.
    """
    cyclic = [component for component in execution_order(model) if component.cyclic]
    if not cyclic:
        reason = (
            "well-posed: the block graph is acyclic, so forward substitution computes every block once "
            "from blocks before it; the solution exists and is unique for any activation"
        )
        return WellPosednessReport(True, True, (), reason)
    reports = []
    for component in cyclic:
        A_cc = component_matrix(model.structure.A, component_states(model, component), magnitude=True)
        names = component_names(model, component)
        lipschitz = max(model.blocks[i].activation.lipschitz for i in component.blocks)
        activations = sorted({str(model.blocks[i].activation) for i in component.blocks})
        reports.append(_component_report(names, A_cc, lipschitz, activations))
    shown = [r for r in reports if r.well_posed]
    if len(shown) == len(reports):
        reason = (
            f"well-posed: all {len(reports)} cyclic component(s) satisfy L * lambda_pf(|A_cc|) < 1 "
            "(or are nilpotent); the rest of the model is acyclic"
        )
        return WellPosednessReport(True, False, tuple(reports), reason)
    failing = [r for r in reports if not r.well_posed]
    details = "; ".join(f"[{', '.join(r.blocks)}]: {r.reason.removeprefix('not shown: ')}" for r in failing)
    reason = f"not shown for {len(failing)} of {len(reports)} cyclic component(s): {details}"
    return WellPosednessReport(False, False, tuple(reports), reason)


def _component_report(
    names: tuple[str, ...], A_cc: sp.csr_array | spla.LinearOperator, lipschitz: float, activations: list[str]
) -> ComponentReport:
    states = A_cc.shape[0]
    radius = perron_frobenius_eigenvalue(A_cc)
    row_sums = A_cc.sum(axis=1) if sp.issparse(A_cc) else A_cc @ np.ones(states)
    inf_norm = float(row_sums.max()) if states else 0.0
    where = f"activations {', '.join(activations)}"
    if radius == 0.0:
        reason = (
            "well-posed: |A_cc| is nilpotent (lambda_pf = 0), so the states are acyclic one by one and "
            "forward substitution in state order gives the unique solution for any activation"
        )
        return ComponentReport(names, states, radius, inf_norm, lipschitz, True, reason)
    if math.isinf(lipschitz):
        reason = (
            f"not shown: the contraction condition L * lambda_pf(|A_cc|) < 1 needs Lipschitz activations, "
            f"and this loop contains a non-Lipschitz one ({where}; lambda_pf(|A_cc|) = {radius:.6g}, "
            f"||A_cc||_inf = {inf_norm:.6g}); move the non-Lipschitz activation (square, exp, log, ...) out of "
            "the loop or bound its input"
        )
        return ComponentReport(names, states, radius, inf_norm, lipschitz, None, reason)
    gain = lipschitz * radius
    if gain < 1:
        cheap = lipschitz * inf_norm
        if cheap < 1:
            also = f"the cheaper test L * ||A_cc||_inf = {cheap:.6g} < 1 holds too"
        else:
            also = (
                f"the cheaper test L * ||A_cc||_inf = {cheap:.6g} fails; a diagonal rescaling of the state "
                "(rescale, for positively homogeneous activations) brings ||A_cc||_inf under 1"
            )
        reason = (
            f"well-posed: L * lambda_pf(|A_cc|) = {lipschitz:.6g} * {radius:.6g} = {gain:.6g} < 1 ({where}): "
            f"the loop is a contraction in a weighted max-norm; {also}"
        )
        return ComponentReport(names, states, radius, inf_norm, lipschitz, True, reason)
    reason = (
        f"not shown: the sufficient condition L * lambda_pf(|A_cc|) < 1 fails, "
        f"{lipschitz:.6g} * {radius:.6g} = {gain:.6g} >= 1 ({where}; ||A_cc||_inf = {inf_norm:.6g}); "
        f"shrink the loop gain, e.g. scale A_cc by less than {1 / gain:.6g}: rescaling the state cannot help, "
        "lambda_pf(|A_cc|) is invariant under diagonal similarity"
    )
    return ComponentReport(names, states, radius, inf_norm, lipschitz, None, reason)
