"""Maxima written as relu trees, recognized so that their bounds need only their inputs' bounds.

The frontend lowers max(a, b) as b + relu(a - b) (MaxPool, ReduceMax: balanced trees, one relu
block per level). A relu state r whose row is exactly z_r = M1 - M2 with M1 and M2 maxima
already known makes M = M2 + r = max(M1, M2) a known maximum too. Known maxima are sums of
states with coefficient 1: a single state s (the maximum of {s}), or M2's states plus r.

- A *max level*: a relu part all of whose rows are such differences (no input term, no bias).
- A *max output*: an identity part all of whose rows are known maxima (a pooling's output kept
  as a block, as before a convolution).

Recognition reads only the matrix (``find_max_trees``, vectorized over rows: each maximum's
states are checked against the chain r -> M2's representative -> ...), so it holds whatever
built the model: the identities used are exact for any states, and a relu of a difference that
was not meant as a maximum is bounded just as validly.

Bounds (auto_LiRPA's MaxPool relaxation, Xu et al. 2020, on the tree):

- intervals: a maximum lies in [max l_i, max h_i] over its elements (``Maxima``: far tighter
  than the interval of the sum M2 + r), so z_r = M1 - M2 in [l(M1) - h(M2), h(M1) - l(M2)]
  (intersected with the row's own interval), and a max output in [l(M), h(M)];
- a max level's lines (``max_lines``): below, r >= 0 or r >= z_r (M >= M2 or M >= M1, the one
  with the larger lower bound); above, where the relu is undecided,
  r = max(M1, M2) - M2 <= h(M) - M2: slope 0 on the row's positive part (M1), 1 on its
  negative part (-M2), intercept h(M);
- a max output (``select_leaves``), the same composed down the tree: M >= x_i for the element
  i reached by the larger lower bounds, and M = x_j where every node on the way to j is
  decided (z >= 0 or z <= 0), else M <= h of the first undecided node. CROWN then moves a
  max output's coefficients straight onto the elements, one each, never through the levels.

None of it needs bounds on the tree's differences by back-substitution (LeNet-5's CROWN spent
a third of its time there before), but the elements' own bounds matter where they can be a
window's maximum (``contenders``): CROWN refines those rows (``crown``). At LeNet-5's second
pool that is 1,729 rows of 20 digits at eps 0.001 against 18,853 not known inactive (13,172
against 20,415 at eps 0.01), for the same bounds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from ..activations import activation
from ..arrays import sorted_unique
from .relaxation import WIDEN_ULPS, Lines, linear_relaxation

_EPS = float(np.finfo(np.float64).eps)
RELU = activation("relu")


@dataclass(frozen=True)
class MaxLevel:
    """The rows of a max level: z_r = M1 - M2. A maximum is named by its representative
    state: the state itself for a single state (``*_single``), else the relu state that made
    it. All global state indices, one entry per row."""

    first: np.ndarray
    first_single: np.ndarray
    second: np.ndarray
    second_single: np.ndarray


@dataclass(frozen=True)
class MaxTrees:
    """The maxima of a model: its max levels and its max outputs (identity parts whose rows
    are each a known maximum: a pooling's output kept as a block), by part index; for each
    made maximum's state (n-long arrays, -1 / False elsewhere) its operands M1 and M2; and
    the parts holding the single states that are maximized."""

    levels: dict[int, MaxLevel]
    outputs: dict[int, tuple[np.ndarray, np.ndarray]]  # part -> (representatives, single)
    first: np.ndarray
    first_single: np.ndarray
    second: np.ndarray
    second_single: np.ndarray
    inputs: frozenset
    windows: sp.csr_array  # (maxima, n): the elements of each made maximum that no level reads


def find_max_trees(model, parts) -> MaxTrees:
    """The max levels and max outputs among ``parts`` (``interval.Part``, in execution order)."""
    n = model.n
    chain_next = np.full(n, -1, dtype=np.int64)  # a made maximum's state -> M2's representative
    chain_size = np.zeros(n, dtype=np.int64)  # its number of states (0: not a made maximum)
    operands = [np.full(n, -1, dtype=np.int64), np.zeros(n, dtype=bool), np.full(n, -1, dtype=np.int64),
                np.zeros(n, dtype=bool)]  # fmt: skip
    levels, outputs, singles = {}, {}, []
    members = sp.csr_array((n, n))  # a made maximum's state -> its elements (1 each)
    operand = np.zeros(n, dtype=bool)  # read by a later level
    for index, part in enumerate(parts):
        rows = part.rows
        name = part.activation.name
        if part.loop is not None or name not in ("relu", "identity") or rows.B.nnz or np.any(rows.bias):
            continue
        matrix = sp.csr_array(model.A[rows.states])
        if matrix.nnz == 0 or np.any(np.abs(matrix.data) != 1) or np.any(np.diff(matrix.indptr) < 1):
            continue
        first, first_size = _maxima(matrix, 1.0, chain_next, chain_size)
        if first is None:
            continue
        if name == "identity":
            if np.all(matrix.data == 1):
                outputs[index] = (first, first_size == 1)
                singles.append(first[first_size == 1])
            continue
        second, second_size = _maxima(matrix, -1.0, chain_next, chain_size)
        if second is None:
            continue
        level = MaxLevel(first, first_size == 1, second, second_size == 1)
        levels[index] = level
        for array, values in zip(operands, (level.first, level.first_single, level.second, level.second_single)):
            array[rows.states] = values
        singles.extend((first[first_size == 1], second[second_size == 1]))
        operand[first[first_size > 1]] = operand[second[second_size > 1]] = True
        members = members + _elements(rows.states, level, members, n)
        chain_next[rows.states] = second
        chain_size[rows.states] = second_size + 1
    part_of_state = np.full(n, -1, dtype=np.int64)
    for index, part in enumerate(parts):
        part_of_state[part.rows.states] = index
    maximized = sorted_unique(part_of_state[np.concatenate(singles)]) if singles else []
    made = np.zeros(n, dtype=bool)
    for index, part in enumerate(parts):
        made[part.rows.states] = index in levels
    windows = sp.csr_array(members[np.flatnonzero(made & ~operand)])
    return MaxTrees(levels, outputs, *operands, frozenset(int(index) for index in maximized), windows)


def _elements(states: np.ndarray, level: MaxLevel, members: sp.csr_array, n: int) -> sp.csr_array:
    """(n, n) with the elements of each row's maximum M = max(M1, M2) in the rows ``states``."""
    rows = np.arange(states.size)
    union = sp.csr_array((states.size, n))
    for state, single in ((level.first, level.first_single), (level.second, level.second_single)):
        picked = sp.csr_array((np.ones(int(single.sum())), (rows[single], state[single])), shape=(states.size, n))
        made = sp.csr_array((np.ones(int((~single).sum())), (rows[~single], state[~single])), shape=(states.size, n))
        union = union + picked + made @ members
    union.data[:] = 1.0
    placed = sp.csr_array((np.ones(states.size), (states, rows)), shape=(n, states.size))
    return sp.csr_array(placed @ union)


def contenders(trees: MaxTrees, states: np.ndarray, low: np.ndarray, high: np.ndarray, bounds) -> np.ndarray:
    """Which of ``states`` (with bounds ``low`` / ``high``, (batch, size); the other states'
    from ``bounds``) can be the maximum of a window that more than one element can be: the
    states whose bounds the maxima's relaxations read. A state below another's lower bound in
    every window of its is never the maximum (tighter bounds keep it so), and a window with one
    such element is that element."""
    windows = trees.windows
    batch = low.shape[0]
    if windows.nnz == 0:
        return np.zeros((batch, states.size), dtype=bool)
    all_low, all_high = bounds.low.copy(), bounds.high.copy()
    all_low[:, states], all_high[:, states] = low, high
    starts = windows.indptr[:-1][np.diff(windows.indptr) > 0]
    entry_window = np.repeat(np.arange(windows.shape[0]), np.diff(windows.indptr))
    entry_low, entry_high = all_low[:, windows.indices], all_high[:, windows.indices]
    best_low = np.full((batch, windows.shape[0]), -np.inf)
    best_low[:, np.diff(windows.indptr) > 0] = np.maximum.reduceat(entry_low, starts, axis=1)
    contending = entry_high >= best_low[:, entry_window]
    count = np.zeros((batch, windows.shape[0]))
    count[:, np.diff(windows.indptr) > 0] = np.add.reduceat(contending.astype(np.float64), starts, axis=1)
    needed = contending & (count[:, entry_window] > 1)
    incidence = sp.csr_array((np.ones(windows.nnz), (np.arange(windows.nnz), windows.indices)),
                             shape=(windows.nnz, all_low.shape[1]))  # fmt: skip
    return (sp.csr_array(needed.astype(np.float64)) @ incidence).toarray()[:, states] > 0


def _maxima(matrix: sp.csr_array, sign: float, chain_next, chain_size):
    """For each row, the representative and size of the maximum whose states are the row's
    entries equal to ``sign`` (all of them, exactly); (None, None) if a row has none."""
    picked = sp.csr_array(matrix == sign, dtype=np.int8)
    picked.sort_indices()
    counts = np.diff(picked.indptr)
    if counts.min() < 1:
        return None, None
    width = int(counts.max())
    members = np.full((matrix.shape[0], width), -1, dtype=np.int64)  # sorted, padded with -1
    slot = np.arange(picked.nnz) - np.repeat(picked.indptr[:-1], counts)
    members[np.repeat(np.arange(matrix.shape[0]), counts), slot] = picked.indices
    representative = members[np.arange(matrix.shape[0]), counts - 1]  # the latest state
    many = counts > 1
    if np.any(chain_size[representative[many]] != counts[many]):
        return None, None
    chain = np.full_like(members, -1)
    chain[:, 0] = representative
    for step in range(1, width):
        chain[:, step] = np.where(step < counts, chain_next[chain[:, step - 1]], -1)
    chain.sort(axis=1)  # the -1 padding first: compare the members right-aligned
    members.sort(axis=1)
    if not np.array_equal(chain, members):
        return None, None
    return representative, counts


class Maxima:
    """The intervals of the made maxima, by their states (batch, n), filled as the max levels
    are bounded (in order)."""

    def __init__(self):
        self.low = self.high = None

    def operands(self, level: MaxLevel, low: np.ndarray, high: np.ndarray):
        """((low, high) of M1, (low, high) of M2), each (batch, rows); ``low`` / ``high``: the
        states' bounds (batch, n)."""
        first = self.of(level.first, level.first_single, low, high)
        return first, self.of(level.second, level.second_single, low, high)

    def record(self, level: MaxLevel, states: np.ndarray, low: np.ndarray, high: np.ndarray) -> None:
        """M = max(M1, M2) of each row: [max(l1, l2), max(h1, h2)], by its state."""
        (low1, high1), (low2, high2) = self.operands(level, low, high)
        if self.low is None:
            self.low, self.high = np.zeros_like(low), np.zeros_like(high)
        self.low[:, states], self.high[:, states] = np.maximum(low1, low2), np.maximum(high1, high2)

    def of(self, states, single, low, high):
        """The intervals (batch, rows) of the maxima named by ``states`` / ``single``."""
        if single.all():
            return low[:, states], high[:, states]
        made = ~single
        lows, highs = low[:, states], high[:, states]
        lows[:, made], highs[:, made] = self.low[:, states[made]], self.high[:, states[made]]
        return lows, highs


def pre_activation_bounds(level: MaxLevel, maxima: Maxima, low: np.ndarray, high: np.ndarray):
    """[l(M1) - h(M2), h(M1) - l(M2)] for each row, (batch, rows), widened by its rounding."""
    (low1, high1), (low2, high2) = maxima.operands(level, low, high)
    z_low, z_high = low1 - high2, high1 - low2
    pad = 2 * _EPS
    return z_low - pad * (np.abs(low1) + np.abs(high2)), z_high + pad * (np.abs(high1) + np.abs(low2))


def select_leaves(trees: MaxTrees, output: tuple[np.ndarray, np.ndarray], bounds):
    """The relaxation of a max output, per sample and row (each (batch, rows)): M >= x[lower]
    (down the tree, the operand with the larger lower bound at each node: M >= either), and
    M = x[upper] where every node on the way down is decided (z = M1 - M2 >= 0: M = M1; <= 0:
    M = M2), else (upper = -1) M <= top, the upper bound of the first undecided node's maximum
    (widened by a few ulps)."""
    representatives, single = output
    batch = bounds.low.shape[0]
    start = np.broadcast_to(representatives, (batch, representatives.size))
    start_single = np.broadcast_to(single, start.shape)
    maxima = bounds.maxima

    def pick(array, node):
        return np.take_along_axis(array, node, axis=1)

    lower, at_leaf = start.copy(), start_single.copy()
    while not at_leaf.all():
        node = np.where(at_leaf, 0, lower)
        first, second = trees.first[node], trees.second[node]
        low1 = np.where(trees.first_single[node], pick(bounds.low, first), pick(maxima.low, first))
        low2 = np.where(trees.second_single[node], pick(bounds.low, second), pick(maxima.low, second))
        choose_first = low1 >= low2
        lower = np.where(at_leaf, lower, np.where(choose_first, first, second))
        at_leaf = at_leaf | np.where(choose_first, trees.first_single[node], trees.second_single[node])
    upper, at_leaf = start.copy(), start_single.copy()
    top = np.zeros(start.shape)
    while not at_leaf.all():
        node = np.where(at_leaf, 0, upper)
        up, down = pick(bounds.pre_low, node) >= 0, pick(bounds.pre_high, node) <= 0
        open_ = ~at_leaf & ~up & ~down
        top = np.where(open_, pick(maxima.high, node), top)
        at_leaf = at_leaf | open_
        chosen = np.where(up, trees.first[node], trees.second[node])
        upper = np.where(at_leaf, np.where(open_, -1, upper), chosen)
        at_leaf = at_leaf | np.where(up, trees.first_single[node], trees.second_single[node])
    top = top + WIDEN_ULPS * _EPS * np.abs(top) + np.finfo(np.float64).tiny
    return lower, upper, top


def max_lines(level: MaxLevel, maxima: Maxima, low, high, z_low, z_high) -> Lines:
    """The relaxation of a max level on z in [z_low, z_high] (module docstring): ``Lines`` whose
    upper line has ``upper_slope`` on the row's positive part and ``upper_negative_slope`` on
    its negative part."""
    lines = linear_relaxation(RELU, z_low, z_high)
    (low1, high1), (low2, high2) = maxima.operands(level, low, high)
    top = np.maximum(high1, high2)
    top = top + WIDEN_ULPS * _EPS * np.abs(top) + np.finfo(np.float64).tiny
    undecided = (z_low < 0) & (z_high > 0)
    return Lines(
        np.where(undecided, (low1 >= low2).astype(np.float64), lines.lower_slope),
        lines.lower_intercept,
        np.where(undecided, 0.0, lines.upper_slope),
        np.where(undecided, top, lines.upper_intercept),
        np.where(undecided, 1.0, lines.upper_slope),
    )
