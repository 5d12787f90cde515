"""Max pools in a prediction: a relu tree's output computed as its windows' maxima.

The frontend lowers a maximum as a relu tree (``frontend.ops.pooling.tree_max``): level after
level, z_r = M1 - M2 with M1, M2 maxima already made, r = relu(z_r), and M = M2 + r =
max(M1, M2) (a maximum is a sum of states with coefficient 1: a leaf, or a chain of relu states
down to one). Where the pool's output is kept as an identity block whose rows are such sums,
and no term reads the levels' states, ``predict`` (which returns no states) needs the output
and the level states read elsewhere only (ResNet's shortcut reads the pool as its last level's
state plus a leaf): each output row is the maximum of its window's leaves, and such a state r
the relu of its M1 less its M2, M1 read from the output row it made where there is one:

    V[output row o] = max_k V[window[o, k]],     V[r] = relu(max(M1) - max(M2))

(NaN when an element is NaN, as the tree gives), one pass reading the leaves and writing those
rows, instead of the levels' states, 2 to 6 non-zeros each, then the output's rows. It is
the same value up to rounding: the tree's M2 + relu(M1 - M2) is max(M1, M2) rounded (two infinite
elements aside, where the tree gives NaN). ``solve``, which returns the states, runs the levels.

A later block's row that reads a whole maximum (its leaf and chain of states, each with one
coefficient c: ResNet's shortcut reads the pool so) reads c V[output row] instead
(``_read_outputs``); the level states left to compute are then those C reads, or a row reading
part of a chain (none in ResNet).

Recognition reads the blocks' rows alone (``_windows``), checking every row: a level is relu
with no bias and entries +1 / -1, the +1 entries being the states of one maximum and the -1
entries another's (the states of a made maximum are its chain, walked down from its latest
state); the output is identity with no bias, each row one maximum. What keeps it (ResNet-18 at
224 x 224, float32, 2 cores, 2026-12-07): its max pool (1.39M tree states over 200,704 outputs)
took 36-68 ms at batch 16 and 7.9-12.6 ms at batch 1 by the levels, 13.6 / 3.9 ms so (its last
level's 193,600 states read by the residual shortcut included, each from its output row), and
2.7 ms at batch 1 with the shortcut reading the output rows, which then takes 0.56 ms (a
diagonal: ``kernels.diagonal_runs``) where reading leaf and states took 1.7 ms.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import scipy.sparse as sp

from ..arrays import sorted_unique
from . import kernels
from .structured import StructuredBlock

try:
    import numba
except ImportError:  # pragma: no cover - numba is a dependency
    numba = None

# A window of more elements than this is left to the levels.
MAX_WINDOW = 64
# Rows of one task of ``window_max``.
WINDOW_RUN = 1024
# What ``_windows`` returns for a row that is not a maximum.
BAD = -(1 << 62)


@dataclass(frozen=True)
class Maxima:
    """Rows of V to fill with maxima (``window_max``): V[targets[i]] = the maximum of V's rows
    first[i, :first_counts[i]], less the maximum of second's where second_counts[i] > 0, then
    relu."""

    targets: np.ndarray
    first: np.ndarray
    first_counts: np.ndarray
    second: np.ndarray
    second_counts: np.ndarray

    def run(self, V: np.ndarray) -> None:
        work = int(self.first_counts.sum() + self.second_counts.sum())
        kernel = window_max if kernels.threaded(work, V.shape[1]) else window_max_serial
        kernel(V, self.targets, self.first, self.first_counts, self.second, self.second_counts)


@dataclass(frozen=True)
class MaxPoolStep:
    """A max pool's levels and output block (``StructuredBlock``s, in order) and, to run without
    the levels, the output's rows as ``Maxima`` of their windows, then the level states read
    elsewhere (r = relu(M1 - M2), M1 read from the output row it made when there is one)."""

    blocks: tuple[StructuredBlock, ...]
    outputs: Maxima
    states: Maxima
    cyclic = False

    def run(self, V: np.ndarray, states: bool) -> None:
        """Fill V's rows of the pool: every level's states and the output with ``states``, else
        the output and the level states read elsewhere (the levels' other rows of V are left as
        they were)."""
        if states:
            for block in self.blocks:
                block.run(V)
            return
        self.outputs.run(V)
        self.states.run(V)


def fuse_max_pools(model, steps: list) -> list:
    """``steps`` with each run of max-tree levels and their output block (acyclic
    ``StructuredBlock`` steps without terms) as one ``MaxPoolStep``, where recognized, and the
    later blocks reading a whole maximum of it reading its output row instead (``_read_outputs``)."""
    if not kernels.available():
        return steps
    steps = list(steps)
    fused: list = []
    position = 0
    while position < len(steps):
        stop = position
        while stop < len(steps) and _is_level(steps[stop]):
            stop += 1
        if stop > position and stop < len(steps) and _is_output(steps[stop]):
            found = _max_pool(model, steps[position : stop + 1], steps[stop + 1 :])
            if found is not None:
                fused.append(found[0])
                steps[stop + 1 :] = found[1]
                position = stop + 1
                continue
        fused.append(steps[position])
        position += 1
    return fused


def _plain(step, activation: str) -> bool:
    if not isinstance(step, StructuredBlock) or step.terms or step.cyclic or step.activation.name != activation:
        return False
    data = step._remainder_rows[2]
    return data.size > 0 and not np.any(step.bias) and bool(np.all(np.abs(data) == 1))


def _is_level(step) -> bool:
    return _plain(step, "relu")


def _is_output(step) -> bool:
    return _plain(step, "identity") and bool(np.all(step._remainder_rows[2] == 1))


def _max_pool(model, blocks: list[StructuredBlock], later: list) -> tuple[MaxPoolStep, list] | None:
    """The pool of these levels and output block, and the ``later`` steps with the blocks that
    read a whole maximum reading its output row; None where a row is not a maximum, the levels
    are not contiguous in V, a window is too wide, or a term reads a level."""
    if any(a.rows.stop != b.rows.start for a, b in zip(blocks[:-1], blocks[1:])):
        return None
    start, stop, p = blocks[0].rows.start, blocks[-2].rows.stop, model.p
    parts = [block._remainder_rows for block in blocks]
    offsets = np.cumsum([0] + [indptr[-1] for indptr, _, _ in parts])
    indptr = np.concatenate([[0]] + [indptr[1:] + offset for (indptr, _, _), offset in zip(parts, offsets)])
    sources = np.concatenate([sources.view(np.int64) for _, sources, _ in parts])
    data = np.concatenate([data for _, _, data in parts]).astype(np.float64)
    size, outputs = stop - start, blocks[-1].rows.stop - blocks[-1].rows.start
    first, second, offsets, leaves = _windows(indptr.astype(np.int64), sources, data, start, size, outputs, MAX_WINDOW)
    if first.size == 1 and first[0] == BAD:
        return None
    output_rows = np.arange(size, size + outputs)
    made_by = np.full(size, -1, dtype=np.int64)  # a level state -> the V row of the output it makes
    made = first[output_rows] >= 0
    made_by[first[output_rows][made]] = output_rows[made] + start
    read_outputs = [_read_outputs(step, blocks[-1], made_by, start, stop) for step in later]
    rewritten = [new for new, old in zip(read_outputs, later) if new is not old]
    exported = _read_elsewhere(model, start - p, stop - p, blocks[-1].rows.stop - p, rewritten)
    if exported is None:
        return None
    exported -= start - p  # (rows of the levels)
    window, counts = _table(first[output_rows], offsets, leaves)
    reads_output = made_by[exported] >= 0
    high, high_counts = _table(first[exported], offsets, leaves)
    high[reads_output, 0], high_counts[reads_output] = made_by[exported[reads_output]], 1
    low, low_counts = _table(second[exported], offsets, leaves)
    none = np.zeros((outputs, 1), dtype=np.int64)
    pool = MaxPoolStep(
        tuple(blocks),
        Maxima(output_rows + start, window, counts, none, np.zeros(outputs, dtype=np.int64)),
        Maxima(exported + start, high, high_counts, low, low_counts),
    )
    return pool, read_outputs


def _read_outputs(step, output: StructuredBlock, made_by: np.ndarray, start: int, stop: int):
    """``step`` with each remainder row that reads the whole sum of an output row (the leaf and
    the chain of states of a maximum: ``output``'s entries, each with one coefficient c) reading
    c V[that output row] instead: the same value (the tree's, up to rounding), without reading
    the levels' states (V rows start:stop). ResNet's shortcut reads the stem's pool so. The
    output row is the one the row's latest level state makes; ``step`` itself when no row
    changes or it is not a ``StructuredBlock``."""
    if not isinstance(step, StructuredBlock) or step.remainder is None:
        return step
    indptr, sources, data = step._remainder_rows
    sources = sources.view(np.int64)
    rows = np.repeat(np.arange(indptr.size - 1), np.diff(indptr))
    level = (sources >= start) & (sources < stop)
    if not level.any():
        return step
    latest = np.full(indptr.size - 1, -1, dtype=np.int64)  # each row's latest level state read
    np.maximum.at(latest, rows[level], sources[level])
    reader = np.flatnonzero(latest >= 0)
    made = made_by[latest[reader] - start]
    reader, made = reader[made >= 0], made[made >= 0]
    if reader.size == 0:
        return step
    # the entries each reader must hold: its output row's, with the coefficient of its latest state
    out_indptr, out_sources, _ = output._remainder_rows
    out_sources = out_sources.view(np.int64)
    local = made - output.rows.start
    counts = out_indptr[local + 1] - out_indptr[local]
    needed_rows = np.repeat(reader, counts)
    needed = out_sources[np.repeat(out_indptr[local] - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())]
    span = np.int64(max(int(sources.max()), int(needed.max())) + 1)
    keys = rows * span + sources
    order = np.argsort(keys, kind="stable")
    keys = keys[order]
    entry = order[np.minimum(np.searchsorted(keys, needed_rows * span + needed), keys.size - 1)]
    latest_entry = order[np.searchsorted(keys, reader * span + latest[reader])]
    coefficient = np.repeat(data[latest_entry], counts)
    held = (rows[entry] == needed_rows) & (sources[entry] == needed) & (data[entry] == coefficient)
    whole = np.logical_and.reduceat(held, np.cumsum(counts) - counts)  # (an output row has entries)
    if not whole.any():
        return step
    drop = np.zeros(sources.size, dtype=bool)
    drop[entry[np.repeat(whole, counts)]] = True
    new_rows = np.concatenate([rows[~drop], reader[whole]])
    new_sources = np.concatenate([sources[~drop], made[whole]])
    new_data = np.concatenate([data[~drop], data[latest_entry[whole]]])
    columns, column_of = np.unique(new_sources, return_inverse=True)
    remainder = sp.csr_array((new_data, (new_rows, column_of)), shape=(indptr.size - 1, columns.size))
    return replace(step, remainder=remainder, remainder_columns=columns)


def _table(operands: np.ndarray, offsets: np.ndarray, leaves: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The leaves of each operand (-(v + 1): the leaf at V row v; else a row whose maximum's
    leaves are leaves[offsets[row]:offsets[row + 1]]) as (table (operands, width), counts)."""
    made = operands >= 0
    counts = np.ones(operands.size, dtype=np.int64)
    counts[made] = offsets[operands[made] + 1] - offsets[operands[made]]
    table = np.zeros((operands.size, max(1, int(counts.max(initial=1)))), dtype=np.int64)
    table[~made, 0] = -operands[~made] - 1
    columns = np.arange(table.shape[1])
    inside = made[:, None] & (columns[None, :] < counts[:, None])
    starts = np.where(made, offsets[np.maximum(operands, 0)], 0)
    table[inside] = leaves[(starts[:, None] + columns[None, :])[inside]]
    return table, counts


def _read_elsewhere(model, first: int, last: int, tree_stop: int, blocks: list[StructuredBlock]) -> np.ndarray | None:
    """The level states (rows first:last of x) read other than by the pool's rows (first:
    tree_stop): by A's remainder (the rows of ``blocks`` by their remainders instead, rewritten
    by ``_read_outputs``) or by C's remainder, as rows of x; None when a term of A
    or C reads one (its product would need them all)."""
    A, C, p = model.structure.A, model.structure.C, model.p
    if any(term.op.source.start < last and first < term.op.source.stop for matrix in (A, C) for term in matrix.terms):
        return None
    remainder = A.remainder
    reading = np.flatnonzero((remainder.indices >= first) & (remainder.indices < last))
    rows = np.searchsorted(remainder.indptr, reading, side="right") - 1
    elsewhere = (rows < first) | (rows >= tree_stop)
    for block in blocks:
        elsewhere &= (rows < block.rows.start - p) | (rows >= block.rows.stop - p)
    read = [remainder.indices[reading[elsewhere]]]
    for block in blocks:
        sources = block._remainder_rows[1].view(np.int64) - p
        read.append(sources[(sources >= first) & (sources < last)])
    outputs = C.remainder.indices
    read.append(outputs[(outputs >= first) & (outputs < last)])
    return sorted_unique(np.concatenate(read)).astype(np.int64)


if numba is not None:

    @numba.njit(cache=True, nogil=True)
    def _operand(indptr, sources, data, row, sign, start, size, chain_next, chain_size, members):  # pragma: no cover
        """The maximum named by row's entries equal to sign: a leaf (returns -(v + 1) for V row
        v, outside the tree) or a made maximum (its latest state's index in the tree), checked
        against the chain; ``BAD`` when they are not one maximum."""
        bad = BAD
        count = 0
        latest = -1
        for k in range(indptr[row], indptr[row + 1]):
            if data[k] == sign:
                if count == members.size:
                    return bad
                members[count] = sources[k]
                count += 1
                local = sources[k] - start
                if 0 <= local < size:
                    latest = max(latest, local)
        if count == 0:
            return bad
        if latest < 0:
            return -(members[0] + 1) if count == 1 else bad
        if chain_size[latest] != count:
            return bad
        found = 0
        node = latest
        for _ in range(count):  # walk the chain: every member once
            value = node + start if node >= 0 else -node - 1
            for k in range(count):
                if members[k] == value:
                    found += 1
                    members[k] = -1
                    break
            if node < 0:
                break
            node = chain_next[node]
        return latest if found == count else bad

    @numba.njit(cache=True, nogil=True)
    def _copy_leaves(operand, leaves, offsets, at):  # pragma: no cover - jitted
        """Write the leaves of ``operand`` (a leaf -(v + 1), or a made maximum's row) at ``at``;
        returns where the next go."""
        if operand < 0:
            leaves[at] = -operand - 1
            return at + 1
        for k in range(offsets[operand], offsets[operand + 1]):
            leaves[at] = leaves[k]
            at += 1
        return at

    @numba.njit(cache=True, nogil=True)
    def _windows(indptr, sources, data, start, size, outputs, width):  # pragma: no cover
        """For the ``size`` level rows then the ``outputs`` rows (CSR over V, the levels' states
        at V rows start:start + size): each row's operands (M1, and M2 for a level's row: a made
        maximum's row, or -(v + 1) for the leaf at V row v) and the leaves of its maximum (CSR:
        offsets, leaves); all four one entry ``BAD`` when a row is not a maximum."""
        rows = size + outputs
        bad = BAD
        failed = np.full(1, bad, np.int64)
        chain_next = np.full(size, bad, np.int64)  # made maximum -> M2 (a state, or -(leaf + 1))
        chain_size = np.zeros(size, np.int64)
        first = np.empty(rows, np.int64)
        second = np.empty(rows, np.int64)
        count = np.zeros(rows, np.int64)  # leaves of each row's maximum
        members = np.empty(width, np.int64)
        for row in range(rows):
            a = _operand(indptr, sources, data, row, 1.0, start, size, chain_next, chain_size, members)
            if a == bad:
                return failed, failed, failed, failed
            first[row] = a
            count[row] = 1 if a < 0 else count[a]
            if row < size:  # a level's row: r = relu(M1 - M2), M = M2 + r
                b = _operand(indptr, sources, data, row, -1.0, start, size, chain_next, chain_size, members)
                if b == bad:
                    return failed, failed, failed, failed
                second[row] = b
                count[row] += 1 if b < 0 else count[b]
                chain_next[row] = b
                chain_size[row] = (1 if b < 0 else chain_size[b]) + 1
                if count[row] > width:
                    return failed, failed, failed, failed
        # leaves, row by row (a row's operands come before it)
        offsets = np.zeros(rows + 1, np.int64)
        for row in range(rows):
            offsets[row + 1] = offsets[row] + count[row]
        leaves = np.empty(offsets[rows], np.int64)
        for row in range(rows):
            at = _copy_leaves(first[row], leaves, offsets, offsets[row])
            if row < size:
                _copy_leaves(second[row], leaves, offsets, at)
        return first, second, offsets, leaves

    def _window_max(V, targets, first, first_counts, second, second_counts):  # pragma: no cover - jitted
        """V[targets[i]] = max of V's rows first[i, :first_counts[i]] (a vector of samples each),
        or, where second_counts[i] > 0, relu(that - the maximum of second's): a pool's output
        row, or a level's state read elsewhere. NaN where an element is NaN (as the tree gives);
        runs of ``WINDOW_RUN`` rows on threads, one sample a value at a time, more a row at a
        time (ResNet-18's pool at batch 16: 46 ms the first way, 17 ms the second)."""
        rows, batch = targets.shape[0], V.shape[1]
        for run in numba.prange((rows + WINDOW_RUN - 1) // WINDOW_RUN):
            low = np.empty(batch, V.dtype)
            for i in range(run * WINDOW_RUN, min(rows, (run + 1) * WINDOW_RUN)):
                target = targets[i]
                if batch == 1:
                    value = _maximum(V, first[i], first_counts[i])
                    if second_counts[i]:
                        value -= _maximum(V, second[i], second_counts[i])
                        value = 0 if value <= 0 else value
                    V[target, 0] = value
                    continue
                _maximum_into(V, first[i], first_counts[i], V[target])
                if second_counts[i]:
                    _maximum_into(V, second[i], second_counts[i], low)
                    for t in range(batch):
                        value = V[target, t] - low[t]
                        V[target, t] = 0 if value <= 0 else value

    @numba.njit(cache=True, nogil=True, inline="always")
    def _maximum(V, window, count):  # pragma: no cover - jitted
        """The maximum of V[window[:count], 0], NaN when one is NaN."""
        best = V[window[0], 0]
        for k in range(1, count):
            value = V[window[k], 0]
            best = value if value > best or value != value else best
        return best

    @numba.njit(cache=True, nogil=True, inline="always")
    def _maximum_into(V, window, count, out):  # pragma: no cover - jitted
        """out = the maximum of V's rows window[:count], NaN propagated."""
        out[:] = V[window[0]]
        for k in range(1, count):
            row = window[k]
            for t in range(out.size):
                value, best = V[row, t], out[t]
                out[t] = value if value > best or value != value else best

    window_max, window_max_serial = kernels.threaded_and_serial(_window_max, cache=True, nogil=True)
