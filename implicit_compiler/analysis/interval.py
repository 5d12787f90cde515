"""Interval bounds (IBP) on every state of an implicit model over a box |u - u0| <= sigma.

The state is cut into parts, one per block, ordered by the execution order of the components
(``runtime.plan``) and, inside a cyclic component, by state order (a compiled network's own
order): a part reads earlier parts (``sources``) and, inside a loop, possibly itself and later
parts of its loop (``feedback``). Each pre-activation z = A x + B u + b is bounded from the
bounds already known, in midpoint-radius form (z_mid = A x_mid + B u0 + b, z_rad = |A| x_rad +
|B| sigma), and each state by the range of its activation over [z_mid - z_rad, z_mid + z_rad]
(``relaxation.interval_image``).

A loop (cyclic component) c reads itself, x_c = phi(A_cc x_c + w), w = A_c,rest x_rest + B_c u
+ b_c. Its bounds are the interval fixed point, reached from a valid enclosure inwards:

1. Enclosure. With the nominal solution x^ at u0 (solved in float64) and its residual
   r = |x^_c - phi(A_cc x^_c + w^)|, every solution for u in the box obeys, componentwise,
   |x_c - x^_c| <= Lambda (|A_cc| |x_c - x^_c| + dw) + r, dw the reach of w around w^. When
   lambda_pf(Lambda |A_cc|) < 1 (Lambda: the activations' Lipschitz constants, the
   well-posedness condition of the loop), (I - Lambda |A_cc|)^{-1} >= 0 exists and
   |x_c - x^_c| <= d = (I - Lambda |A_cc|)^{-1} (Lambda dw + r). Otherwise no bound is claimed.
2. Refinement. If every solution lies in X, it lies in phi(A_cc X + W) too: X <- X n
   phi(A_cc X + W) shrinks the box and keeps every solution, until it stops moving
   (``REFINE_TOLERANCE``) or after ``REFINE_ITERATIONS`` steps.

All of it in float64, each z widened by the rounding of its sum (g_k of Higham 3.1 times the
sum of the absolute terms), so that rounding cannot exclude an exact value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import networkx as nx
import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla
from scipy.sparse import csgraph

from ..activations import Activation
from ..arrays import sorted_unique
from ..errors import AnalysisError
from ..model import ImplicitModel
from ..runtime.plan import execution_order
from .max_tree import Maxima, MaxTrees, find_max_trees
from .max_tree import pre_activation_bounds as max_pre_activation
from .relaxation import DomainError, interval_image
from .spectral import perron_frobenius_eigenvalue

REFINE_ITERATIONS = 500
REFINE_TOLERANCE = 1e-12  # relative to the loop's largest |bound|
_ROUNDOFF = float(np.finfo(np.float64).eps) / 2


@dataclass(frozen=True)
class Rows:
    """Rows of the model's state equation: z[states] = sum_j A[states, part j] x_j + B u + bias.

    ``sources``: (j, A[states, states of part j]) for the parts read before these rows;
    ``feedback``: the same for the parts of their own loop at or after them (empty outside loops).
    """

    states: np.ndarray
    sources: tuple[tuple[int, sp.csr_array], ...]
    feedback: tuple[tuple[int, sp.csr_array], ...]
    B: sp.csr_array
    bias: np.ndarray
    gamma: np.ndarray  # g_k of each row's sum

    @property
    def size(self) -> int:
        return self.states.size


@dataclass(frozen=True)
class Part:
    """One block (or, in a loop cut at the state level, the block's states of one level): its
    rows, activation, name, loop (index into ``Structure.loops``) and tensor shape (the block's,
    when the part is the whole block; else None)."""

    rows: Rows
    activation: Activation
    name: str
    loop: int | None
    shape: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Loop:
    """A cyclic component: its parts (a contiguous range of part indices), its rows with
    ``feedback`` = ((first part, A_cc),) and sources outside it, and its names."""

    parts: range
    rows: Rows
    names: str


@dataclass(frozen=True)
class Structure:
    """The model in float64, cut into parts (blocks) in execution order, and its loops."""

    model: ImplicitModel
    parts: tuple[Part, ...]
    loops: tuple[Loop, ...]
    _signed: dict = field(default_factory=dict, compare=False, repr=False)
    products: dict = field(default_factory=dict, compare=False, repr=False)  # ``crown.Relaxations``' cache
    max_trees: MaxTrees | None = field(default=None, compare=False, repr=False)  # its maxima (``max_tree``)

    def signed(self, matrix: sp.csr_array) -> tuple[sp.csr_array, sp.csr_array, sp.csr_array]:
        """(M^+, M^-, |M^-|) of one of the structure's matrices, split once (cached, kept alive)."""
        key = id(matrix)
        if key not in self._signed:
            negative = matrix.minimum(0)
            self._signed[key] = (matrix, (matrix.maximum(0), negative, abs(negative)))
        return self._signed[key][1]

    @classmethod
    def of(cls, model: ImplicitModel) -> Structure:
        """The structure of ``model`` (kept in the model's cache with what it caches itself:
        bounding the same model again starts from it)."""
        if "bounds_structure" not in model._cache:
            model._cache["bounds_structure"] = cls._made(model.astype(np.float64))
        return model._cache["bounds_structure"]

    @classmethod
    def _made(cls, model: ImplicitModel) -> Structure:
        pieces = []  # (block index, states, loop number or None), in order
        loops_states = []
        for component in execution_order(model):
            if not component.cyclic:
                block = model.blocks[component.blocks[0]]
                pieces.append((component.blocks[0], np.arange(block.start, block.stop), None))
                continue
            for states, cyclic in _state_levels(model, component):
                groups = _by_block(model, states)
                if cyclic:
                    loops_states.append(range(len(pieces), len(pieces) + len(groups)))
                number = len(loops_states) - 1 if cyclic else None
                pieces.extend((block, rows, number) for block, rows in groups)
        part_of = np.empty(model.n, dtype=np.int64)
        for index, (_, states, _) in enumerate(pieces):
            part_of[states] = index
        part_states = [states for _, states, _ in pieces]
        parts = []
        for index, (block, states, number) in enumerate(pieces):
            rows = _rows(model, states, part_of, part_states, own=index)
            whole = states.size == model.blocks[block].size
            shape = model.blocks[block].shape if whole else None
            parts.append(Part(rows, model.blocks[block].activation, model.blocks[block].name, number, shape))
        loops = []
        for members in loops_states:
            states = np.concatenate([part_states[index] for index in members])
            rows = _rows(model, states, part_of, part_states, own=members.start)
            loop_block = sp.csr_array(model.A[states][:, states])
            rows = Rows(rows.states, rows.sources, ((members.start, loop_block),), rows.B, rows.bias, rows.gamma)
            names = ", ".join(dict.fromkeys(parts[index].name for index in members))
            loops.append(Loop(members, rows, names))
        return cls(model, tuple(parts), tuple(loops), max_trees=find_max_trees(model, parts))


def _state_levels(model: ImplicitModel, component) -> list[tuple[np.ndarray, bool]]:
    """A cyclic component cut at the state level: its strongly connected sets of states
    (scipy's csgraph), in topological order, the states that are not on any cycle grouped by
    depth (a level reads only earlier levels). Returns (states, cyclic) in order. A loop whose
    pattern is nilpotent (a strictly triangular A_cc) has no cycle among its states: it is
    bounded level by level, exactly as the acyclic network it unrolls to."""
    states = np.concatenate([np.arange(model.blocks[i].start, model.blocks[i].stop) for i in component.blocks])
    states.sort()
    pattern = sp.csr_array(model.A[states][:, states])
    pattern.data[:] = 1
    count, labels = csgraph.connected_components(pattern, directed=True, connection="strong")
    sizes = np.bincount(labels, minlength=count)
    self_loop = np.zeros(count, dtype=bool)
    diagonal = pattern.diagonal() != 0
    self_loop[labels[diagonal]] = True
    cyclic = (sizes > 1) | self_loop
    # edges between the sets: state j -> state i when row i reads column j
    coo = pattern.tocoo()
    graph = nx.DiGraph()
    graph.add_nodes_from(range(count))
    between = labels[coo.col] != labels[coo.row]
    graph.add_edges_from(zip(labels[coo.col[between]].tolist(), labels[coo.row[between]].tolist()))
    depth = np.zeros(count, dtype=np.int64)
    for node in nx.topological_sort(graph):
        depth[node] = max((depth[source] + 1 for source in graph.predecessors(node)), default=0)
    result = []
    level_of_state = depth[labels]
    for level in np.unique(depth):
        here = level_of_state == level
        plain = here & ~cyclic[labels]
        if plain.any():
            result.append((states[plain], False))
        for node in np.flatnonzero((depth == level) & cyclic):
            result.append((states[labels == node], True))
    return result


def _by_block(model: ImplicitModel, states: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """``states`` (sorted) split by the block holding them: (block index, states), in order."""
    starts = np.array([block.start for block in model.blocks])
    owner = np.searchsorted(starts, states, side="right") - 1
    return [(int(block), states[owner == block]) for block in np.unique(owner)]


def _rows(model: ImplicitModel, states, part_of, part_states, own: int) -> Rows:
    """The Rows of ``states``: sources are the parts before ``own``, feedback the others it
    reads (``own`` and later parts of its loop: execution order allows no other)."""
    A_rows = sp.csr_array(model.A[states])
    sources, feedback = [], []
    for part in sorted_unique(part_of[A_rows.indices]):
        block = sp.csr_array(A_rows[:, part_states[part]])
        (sources if part < own else feedback).append((int(part), block))
    terms = np.diff(A_rows.indptr) + np.diff(model.B.indptr)[states] + 2
    return Rows(
        states, tuple(sources), tuple(feedback), sp.csr_array(model.B[states]),
        model.bias_x[states].astype(np.float64), _gamma(terms),
    )  # fmt: skip


@dataclass(frozen=True, eq=False)
class StateBounds:
    """Bounds over the box, per sample (batch, n), float64: pre-activations z in [pre_low,
    pre_high] and states x in [low, high]."""

    pre_low: np.ndarray
    pre_high: np.ndarray
    low: np.ndarray
    high: np.ndarray
    maxima: Maxima = field(default_factory=Maxima)  # the max levels' maxima (``max_tree``)

    @classmethod
    def empty(cls, batch: int, n: int) -> StateBounds:
        return cls(*(np.zeros((batch, n)) for _ in range(4)))


def interval_bounds(structure: Structure, center: np.ndarray, radius: np.ndarray, refine=None) -> StateBounds:
    """IBP bounds of every state for the boxes |u - center[i]| <= radius.

    Args:
        structure: ``Structure.of(model)``.
        center: (batch, p) float64.
        radius: (p,) float64, nonnegative.
        refine: optional callback (part index, bounds, pre_low, pre_high) -> (pre_low, pre_high)
            that tightens the pre-activation bounds of a part reading other parts before its
            states are bounded (CROWN's intermediate bounds); it must return bounds that hold.
            Inside a loop it is called in passes over the loop's parts, after the enclosure.

    Raises:
        AnalysisError: a pre-activation leaves its activation's domain, or a loop is not
            contracting (lambda_pf(Lambda |A_cc|) >= 1).
    """
    model = structure.model
    bounds = StateBounds.empty(center.shape[0], model.n)
    nominal = None
    index = 0
    while index < len(structure.parts):
        part = structure.parts[index]
        if part.loop is not None:
            if nominal is None:
                nominal = np.atleast_2d(model.solve(center).x)  # float64: the enclosure starts there
            loop = structure.loops[part.loop]
            enclose_loop(structure, loop, bounds, center, radius, nominal)
            if refine is not None:
                refine_loop(structure, loop, bounds, center, radius, refine)
            index = loop.parts.stop
            continue
        low, high = pre_activation(structure, part.rows, bounds, center, radius)
        level = structure.max_trees.levels.get(index)
        output = structure.max_trees.outputs.get(index)
        if level is not None:
            low, high = intersect(low, high, *max_pre_activation(level, bounds.maxima, bounds.low, bounds.high))
        elif output is not None:
            low, high = intersect(low, high, *bounds.maxima.of(*output, bounds.low, bounds.high))
        elif refine is not None and part.rows.sources:
            low, high = refine(index, bounds, low, high)
        set_part_bounds(structure, index, bounds, low, high)
        if level is not None:
            bounds.maxima.record(level, part.rows.states, bounds.low, bounds.high)
        index += 1
    return bounds


LOOP_PASSES = 8  # CROWN passes over a loop's parts at most
LOOP_PASS_GAIN = 0.01  # stop when a pass narrows the loop's pre-activations by less than this fraction


def refine_loop(structure: Structure, loop: Loop, bounds: StateBounds, center, radius, refine) -> None:
    """Passes over the loop's parts in order: each part's pre-activations bounded from the
    bounds of the others (its feedback taken as intervals), narrowed by ``refine``."""
    states = loop.rows.states
    for _ in range(LOOP_PASSES):
        before = float(np.sum(bounds.pre_high[:, states] - bounds.pre_low[:, states]))
        for index in loop.parts:
            rows = structure.parts[index].rows
            low, high = pre_activation(structure, rows, bounds, center, radius, with_feedback=True)
            low, high = refine(index, bounds, low, high)
            low, high = intersect(low, high, bounds.pre_low[:, rows.states], bounds.pre_high[:, rows.states])
            set_part_bounds(structure, index, bounds, low, high, narrow=True)
        after = float(np.sum(bounds.pre_high[:, states] - bounds.pre_low[:, states]))
        if not after < (1 - LOOP_PASS_GAIN) * before:
            break


def intersect(low, high, other_low, other_high):
    """The intersection of two valid intervals; where rounding leaves it empty (the true value
    lies within ulps of both), the first interval."""
    new_low, new_high = np.maximum(low, other_low), np.minimum(high, other_high)
    empty = new_low > new_high
    return np.where(empty, low, new_low), np.where(empty, high, new_high)


def pre_activation(structure: Structure, rows: Rows, bounds: StateBounds, center, radius, with_feedback=False):
    """(low, high) of z = A x + B u + b for ``rows`` from the current bounds, (batch, size):
    the sources only (w, for a loop), or with the feedback too. Each end is its own sum (A^+
    x_low + A^- x_high + ... for the low end), widened by the rounding of that sum alone (g_k
    times the sum of its terms' magnitudes), so a sum of nonnegative terms (a variance) keeps a
    nonnegative lower bound however wide its upper one."""
    low, high, size_low, size_high = _ends(structure, rows.B, center - radius, center + radius)
    low += rows.bias
    high += rows.bias
    size_low += np.abs(rows.bias)
    size_high += np.abs(rows.bias)
    for source, block in rows.sources + (rows.feedback if with_feedback else ()):
        states = structure.parts[source].rows.states
        for total, part in zip(
            (low, high, size_low, size_high), _ends(structure, block, bounds.low[:, states], bounds.high[:, states])
        ):
            total += part
    return low - rows.gamma * size_low, high + rows.gamma * size_high


def _ends(structure: Structure, matrix: sp.csr_array, low: np.ndarray, high: np.ndarray):
    """For (batch, columns) low and high: the ends M^+ low + M^- high and M^+ high + M^- low,
    and the sums of their terms' magnitudes, each (batch, rows)."""
    positive, negative, magnitude = structure.signed(matrix)
    return (
        (positive @ low.T + negative @ high.T).T,
        (positive @ high.T + negative @ low.T).T,
        (positive @ np.abs(low).T + magnitude @ np.abs(high).T).T,
        (positive @ np.abs(high).T + magnitude @ np.abs(low).T).T,
    )


def set_part_bounds(structure: Structure, index: int, bounds: StateBounds, low, high, narrow=False) -> None:
    """Record z in [low, high] for a part and bound its states by phi's range there (within
    their current bounds when ``narrow``)."""
    part = structure.parts[index]
    states = part.rows.states
    bounds.pre_low[:, states], bounds.pre_high[:, states] = low, high
    try:
        x_low, x_high = interval_image(part.activation, low, high)
    except DomainError as error:
        raise AnalysisError(f"no bound on block {part.name!r}: {error}; the box is too large for this model") from None
    if narrow:
        x_low, x_high = intersect(x_low, x_high, bounds.low[:, states], bounds.high[:, states])
    bounds.low[:, states], bounds.high[:, states] = x_low, x_high


def enclose_loop(structure: Structure, loop: Loop, bounds: StateBounds, center, radius, nominal) -> None:
    """The interval fixed point of a loop (module docstring, steps 1 and 2)."""
    rows = loop.rows
    matrix = rows.feedback[0][1]
    lipschitz = np.concatenate([np.full(structure.parts[i].rows.size, structure.parts[i].activation.lipschitz)
                                for i in loop.parts])  # fmt: skip
    if not np.isfinite(lipschitz).all():
        raise AnalysisError(
            f"no bound on the cyclic component [{loop.names}]: an activation in the loop is not Lipschitz, "
            "so its solutions cannot be enclosed"
        )
    gain = sp.csr_array(abs(matrix).multiply(lipschitz[:, None]))
    radius_pf = perron_frobenius_eigenvalue(gain)
    if radius_pf >= 1:
        raise AnalysisError(
            f"no bound on the cyclic component [{loop.names}]: lambda_pf(Lambda |A_cc|) = {radius_pf:.6g} >= 1, "
            "so the loop is not known to contract and its solutions cannot be enclosed; shrink the loop gain"
        )
    # w = A_c,rest x_rest + B u + b: its interval, and its reach around the nominal w^
    w_low, w_high = pre_activation(structure, rows, bounds, center, radius)
    x_hat = nominal[:, rows.states]
    w_hat = (rows.B @ center.T).T + rows.bias
    for source, block in rows.sources:
        w_hat += (block @ nominal[:, structure.parts[source].rows.states].T).T
    w_reach = np.maximum(w_high - w_hat, w_hat - w_low)
    z_hat = w_hat + (matrix @ x_hat.T).T
    residual = np.empty_like(x_hat)
    offset = 0
    for index in loop.parts:
        part = structure.parts[index]
        local = slice(offset, offset + part.rows.size)
        residual[:, local] = np.abs(x_hat[:, local] - part.activation(z_hat[:, local]))
        offset = local.stop
    residual += 4 * _ROUNDOFF * (np.abs(x_hat) + (abs(matrix) @ np.abs(x_hat).T).T + np.abs(w_hat))
    system = sp.csc_array(sp.eye_array(rows.size, format="csc") - gain)
    distance = spla.splu(system).solve(np.ascontiguousarray((lipschitz * w_reach + residual).T)).T
    distance = np.maximum(distance, 0) * (1 + 1e-9) + 1e-300
    states = rows.states
    bounds.low[:, states], bounds.high[:, states] = x_hat - distance, x_hat + distance
    scale = float(np.maximum(np.abs(bounds.high[:, states]), np.abs(bounds.low[:, states])).max(initial=0))
    for _ in range(REFINE_ITERATIONS):
        old_low, old_high = bounds.low[:, states].copy(), bounds.high[:, states].copy()
        _loop_step(structure, loop, bounds, w_low, w_high)
        moved = max(float(np.abs(bounds.low[:, states] - old_low).max(initial=0)),
                    float(np.abs(bounds.high[:, states] - old_high).max(initial=0)))  # fmt: skip
        if moved <= REFINE_TOLERANCE * max(scale, math.ulp(1.0)):
            break
    low, high = _loop_pre_activation(structure, loop, bounds, w_low, w_high)
    bounds.pre_low[:, states], bounds.pre_high[:, states] = low, high


def _loop_step(structure: Structure, loop: Loop, bounds: StateBounds, w_low, w_high) -> None:
    """X <- X n phi(A_cc X + W), part by part."""
    low, high = _loop_pre_activation(structure, loop, bounds, w_low, w_high)
    offset = 0
    for index in loop.parts:
        size = structure.parts[index].rows.size
        local = slice(offset, offset + size)
        set_part_bounds(structure, index, bounds, low[:, local], high[:, local], narrow=True)
        offset += size


def _loop_pre_activation(structure: Structure, loop: Loop, bounds: StateBounds, w_low, w_high):
    """z = A_cc X + W for the loop's current box X and the interval W of the rest (each end its
    own sum, as ``pre_activation``'s)."""
    states = loop.rows.states
    low, high, size_low, size_high = _ends(structure, loop.rows.feedback[0][1], bounds.low[:, states],
                                           bounds.high[:, states])  # fmt: skip
    gamma = loop.rows.gamma
    return low + w_low - gamma * (size_low + np.abs(w_low)), high + w_high + gamma * (size_high + np.abs(w_high))


def _gamma(terms: np.ndarray) -> np.ndarray:
    """g_k = k e / (1 - k e) for float64, the relative rounding bound of a k-term sum."""
    products = terms.astype(np.float64) * _ROUNDOFF
    return products / np.maximum(1 - products, 0.5)
