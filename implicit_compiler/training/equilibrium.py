"""ImplicitModule's forward and adjoint solves, by the runtime's block sweeps.

Both solves are block systems over the model's state blocks,

    forward:  x_b = phi_b(A_b x + c_b)              c = B u + b_x
    adjoint:  v_b = s_b * ((A^T)_b v + g_b)         s = phi'(z), g = dL/dx,  and then dL/dz = v

(the adjoint w = A^T (s * w) + g of ``torch_bridge`` written for v = s * w, which is the gradient
it returns). They are solved as ``solve`` solves a model: the strongly connected components of
the block graph (``runtime.plan``) in topological order, an acyclic block once (forward
substitution), a cyclic component by block Gauss-Seidel sweeps with its back edges cut and
``fixed_point.iterate`` on its torn states only (``runtime.cyclic``: per-sample stopping on the
estimated error, Anderson, converged samples compacted away). The adjoint's block graph is the
forward one reversed: the same components in the opposite order, each swept in reverse storage
order, so that one adjoint sweep of a feedback loop is one backward pass around it.

Every block's product runs on the current weights, without a copy, in torch: a full pattern (a
dense model) is the dense matrix over the values, a sparse one a torch CSR tensor over its rows
(multithreaded: LeNet-5's A times 64 columns, 2.6 ms against 4.7 ms for scipy, 2 cores). Dense
products go through torch's BLAS too, not numpy's: the two libraries' thread pools, each spinning
while the other works, slowed both. A training step of the regression (forward and adjoint
solves of 8 sweeps each, Adam, projection; batch 64) took 12.0 ms against 21.7 ms with numpy's
products at 500 dense states, 2.2 against 7.9 ms at 100 (AMD EPYC, 2 cores).

Measured (``python scripts/train_regression.py``, 2 cores): see docs/training.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..activations import Activation
from ..runtime.cyclic import Sweep, as_slice, block_layout, solve_sweep, torn_blocks
from ..runtime.fixed_point import BatchMap, FixedPoint, iterate
from ..runtime.plan import block_dependency_graph, execution_order

if TYPE_CHECKING:  # pragma: no cover
    from .torch_bridge import ImplicitModule, SparsityPattern


@dataclass(frozen=True)
class BlockRows:
    """One state block: its name, rows and activation."""

    name: str
    start: int
    stop: int
    activation: Activation


@dataclass(frozen=True)
class Schedule:
    """The order of a block system's solve: acyclic blocks (an int) and cyclic components (a
    ``Sweep`` whose steps are block indices), in topological order."""

    steps: tuple[int | Sweep, ...]


def schedules(module: ImplicitModule) -> tuple[tuple[BlockRows, ...], Schedule, Schedule]:
    """The module's blocks and the forward and adjoint schedules of its block graph."""
    from ..activations import activation as resolve

    model = module.to_model()
    graph = block_dependency_graph(model)
    blocks = tuple(BlockRows(b.name, b.start, b.stop, resolve(b.activation)) for b in model.blocks)
    # the multiply-adds of a block's product per sample: its rows of A (forward), of A^T (adjoint)
    row_work, column_work = np.diff(model.A.indptr), np.diff(model.A.tocsc().indptr)
    forward, adjoint = [], []
    for component in execution_order(model):
        members = list(component.blocks)
        if not component.cyclic:
            forward.append(members[0])
            adjoint.append(members[0])
            continue
        forward.append(_sweep(blocks, members, lambda i: set(graph.predecessors(i)), "equilibrium", row_work))
        adjoint.append(_sweep(blocks, members[::-1], lambda i: set(graph.successors(i)), "adjoint", column_work))
    return blocks, Schedule(tuple(forward)), Schedule(tuple(adjoint[::-1]))


def _sweep(
    blocks: tuple[BlockRows, ...], order: list[int], reads: Callable[[int], set[int]], what: str, work: np.ndarray
) -> Sweep:
    """A cyclic component as a sweep, rows in state coordinates (``solve_blocks`` shifts them);
    ``work``: the multiply-adds of each state's product."""
    torn_rows, groups = block_layout([blocks[i] for i in torn_blocks(order, reads)])
    component, _ = block_layout([blocks[i] for i in order])
    return Sweep(
        names=tuple(blocks[i].name for i in order),
        description=f"the {what} solve's cyclic component [{', '.join(blocks[i].name for i in order)}]",
        rows=as_slice(component),
        torn=torn_rows,
        steps=tuple(order),
        program=None,
        torn_groups=groups,
        work=int(work[component].sum()),
    )


def solve_blocks(
    schedule: Schedule,
    W: np.ndarray,
    offset: int,
    run_block: ForwardBlocks | AdjointBlocks,
    tol: float,
    max_iter: int,
    memory: int,
) -> list[FixedPoint]:
    """Solve a block system in place in W, its unknowns in rows ``offset`` on (they start from
    what W holds); ``run_block(b, W)`` computes block b from W. Returns the fixed points of the
    cyclic components.

    A system of one cyclic block (the estimators' dense model) is iterated as one map,
    ``run_block.loop(W)``, instead of sweeps through W (copies of the states in and out, a pass to
    add the constant): a 500-state regression step (batch 64, float64) 11.2 and 9.9 ms against
    12.7 and 11.6 by sweeps, alternated.
    """
    results = []
    for step in schedule.steps:
        if not isinstance(step, Sweep):
            run_block(step, W)
            continue
        rows = step.rows
        rows = slice(offset + rows.start, offset + rows.stop) if isinstance(rows, slice) else offset + rows
        shifted = dataclasses.replace(step, rows=rows, torn=offset + step.torn)
        if len(schedule.steps) == 1 and len(step.steps) == 1:
            result = iterate(
                run_block.loop(W), W[shifted.torn], tol, max_iter, memory=memory, what=step.description,
                map_work=step.work,
            )  # fmt: skip
            W[rows] = result.x
            results.append(result)
            continue
        results.append(solve_sweep(shifted, W, run_block, tol, max_iter, memory))
    return results


class BlockProducts:
    """Row blocks of M X (or of M^T X) on the current values of one matrix, without copies."""

    def __init__(self, pattern: SparsityPattern, values: torch.Tensor, blocks: tuple[BlockRows, ...], transpose: bool):
        self.blocks = blocks
        shape = pattern.shape
        if pattern.full:
            dense = values.detach().view(shape)
            self.dense = dense.T if transpose else dense
            return
        self.dense = None
        if transpose:
            indptr, indices = pattern.transpose_indptr, pattern.transpose_indices
            data, shape = values.detach()[pattern.transpose_order], (shape[1], shape[0])
        else:
            indptr, indices, data = pattern.indptr, pattern.indices, values.detach()
        from .torch_bridge import _csr_tensor

        self.rows = []
        for block in blocks:
            lo, hi = int(indptr[block.start]), int(indptr[block.stop])
            pointers = indptr[block.start : block.stop + 1] - lo
            size = (block.stop - block.start, shape[1])
            self.rows.append(_csr_tensor(pointers, indices[lo:hi], data[lo:hi], size) if hi > lo else None)

    def __call__(self, b: int, X: np.ndarray) -> np.ndarray | None:
        """Rows of block b of the product with X (columns, batch); None when they are empty."""
        block = self.blocks[b]
        if self.dense is not None:  # (the first sweep from zero states: no product, 1 of ~8 per solve)
            return (self.dense[block.start : block.stop] @ torch.from_numpy(X)).numpy() if X.any() else None
        rows = self.rows[b]
        return None if rows is None else (rows @ torch.from_numpy(X)).numpy()


class ForwardBlocks:
    """run_block for W = [c; x]: x_b = phi_b(A_b x + c_b)."""

    def __init__(self, products: BlockProducts, n: int):
        self.products, self.n = products, n

    def __call__(self, b: int, W: np.ndarray) -> None:
        block, n = self.products.blocks[b], self.n
        z = self.products(b, W[n:])
        z = W[block.start : block.stop].copy() if z is None else np.add(z, W[block.start : block.stop], out=z)
        W[n + block.start : n + block.stop] = block.activation.apply_inplace(z)

    def loop(self, W: np.ndarray) -> BatchMap:
        """The one block of a one-block system as the map t -> phi(A t + c) (``solve_blocks``)."""
        (block,), constant = self.products.blocks, W[: self.n]

        def g(t: np.ndarray, columns: np.ndarray) -> np.ndarray:
            c = constant if columns.size == constant.shape[1] else constant[:, columns]
            z = self.products(0, t)
            return block.activation.apply_inplace(c.copy() if z is None else np.add(z, c, out=z))

        return g


class AdjointBlocks:
    """run_block for W = [s; g; v]: v_b = s_b * ((A^T)_b v + g_b)."""

    def __init__(self, products: BlockProducts, n: int):
        self.products, self.n = products, n

    def __call__(self, b: int, W: np.ndarray) -> None:
        block, n = self.products.blocks[b], self.n
        rows = slice(block.start, block.stop)
        z = self.products(b, W[2 * n :])
        z = W[n:][rows].copy() if z is None else np.add(z, W[n:][rows], out=z)
        np.multiply(z, W[rows], out=W[2 * n :][rows])

    def loop(self, W: np.ndarray) -> BatchMap:
        """The one block of a one-block system as the map v -> s * (A^T v + g) (``solve_blocks``)."""
        slopes, gradient = W[: self.n], W[self.n : 2 * self.n]

        def g(v: np.ndarray, columns: np.ndarray) -> np.ndarray:
            every = columns.size == slopes.shape[1]
            s, c = (slopes, gradient) if every else (slopes[:, columns], gradient[:, columns])
            z = self.products(0, v)
            z = c.copy() if z is None else np.add(z, c, out=z)
            return np.multiply(z, s, out=z)

        return g


def iterations(results: list[FixedPoint]) -> tuple[int, float]:
    """Iterations run over the components and the largest final residual."""
    count = sum(len(result.history) for result in results)
    residual = max((result.history[-1] for result in results if result.history), default=0.0)
    return count, residual
