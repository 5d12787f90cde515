"""An implicit model as a torch module, trained by implicit differentiation.

Forward, for a batch of inputs u (columns of U), with no autograd tracking:

    x = phi(z),  z = A x + B u + b_x
    y = C x + D u + b_y

The equilibrium is solved as the numpy runtime solves a model (``equilibrium``): acyclic blocks
by forward substitution (exact), cyclic components by block Gauss-Seidel sweeps with Anderson on
their torn states, every sample stopped once its estimated relative error (residual / (1 -
rate), ``runtime.fixed_point``) is at most ``tol``. It converges when phi is non-expansive and
||A||_inf < 1 (keep it so with ``project_`` after each optimizer step).

Backward, by implicit differentiation rather than through the iterations: at the equilibrium,
with J = diag(phi'(z)) A, the chain rule through x = phi(A x + B u + b_x) gives

    dL/dz = phi'(z) * w,   w = J^T w + dL/dx   (the adjoint equation, solved like the forward one)

and then, g = phi'(z) * w summed over the batch where a sample axis is contracted,

    dL/dA = g x^T,  dL/dB = g u^T  (on the stored sparsity patterns only),  dL/db_x = g,  dL/du = B^T g.

||A^T||_1 = ||A||_inf, so the adjoint iteration contracts whenever the forward one is guaranteed to.
The output map y = C x + D u + b_y is differentiated by ordinary autograd. Memory is that of one
solve, whatever the number of iterations.

Matrices are held as trainable value vectors over fixed CSR patterns (buffers): a compiled LeNet-5
has n = 12,812 states and 315k non-zeros in A, 650 MB as a dense float32 matrix. A full pattern
(a dense model) is multiplied as a dense matrix: CSR data in row-major order is that matrix.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from torch.autograd.function import once_differentiable

from ..activations import Activation
from ..activations import activation as resolve_activation
from ..errors import ConvergenceError, ShapeError
from ..model import ImplicitModel, StateBlock, TensorSpec
from ..runtime.fixed_point import check_tolerance
from .equilibrium import AdjointBlocks, BlockProducts, ForwardBlocks, iterations, schedules, solve_blocks
from .projection import project_rows_l1, row_l1_norms, structure_mask

MATRIX_NAMES = ("A", "B", "C", "D")
TRAINABLE = ("A", "B", "C", "D", "bias_x", "bias_y")
STRUCTURES = ("dense", "triangular")
DEFAULT_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}
SMALL_PRODUCT = 1 << 15  # nnz x batch up to which SparsityPattern multiplies by gather and scatter


@dataclass(frozen=True)
class SolveRecord:
    """The last equilibrium solve and, once backward has run, its adjoint solve.

    Attributes:
        forward_iterations: sweeps of the forward solve's cyclic components (0 for an acyclic
            model, solved exactly by forward substitution).
        forward_residual: its final residual (0.0 without cyclic components).
        backward_iterations: iterations of the adjoint solve (None until backward runs).
        backward_residual: its final residual.
    """

    forward_iterations: int
    forward_residual: float
    backward_iterations: int | None = None
    backward_residual: float | None = None


class SparsityPattern(torch.nn.Module):
    """The fixed CSR pattern of one matrix, with the products training needs.

    Values live elsewhere (a parameter of ``ImplicitModule``); every method takes them.
    Buffers: ``indptr``, ``indices``, ``row_ids`` (the row of each stored entry) and the pattern
    of the transpose (``transpose_indptr``, ``transpose_indices``, ``transpose_order``: the position
    in ``values`` of each stored entry of M^T, in CSR order).
    """

    def __init__(self, matrix: sp.csr_array):
        super().__init__()
        matrix = sp.csr_array(matrix)
        matrix.sum_duplicates()
        self.shape = tuple(int(d) for d in matrix.shape)
        self.nnz = int(matrix.nnz)
        self.full = self.nnz == self.shape[0] * self.shape[1]  # canonical CSR: data is the dense row-major matrix
        positions = np.arange(1, self.nnz + 1, dtype=np.int64)  # 1-based: no stored entry is a zero
        transpose = sp.csr_array((positions, matrix.indices, matrix.indptr), self.shape).T.tocsr()
        transpose.sort_indices()
        buffers = {
            "indptr": matrix.indptr,
            "indices": matrix.indices,
            "row_ids": np.repeat(np.arange(self.shape[0]), np.diff(matrix.indptr)),
            "transpose_indptr": transpose.indptr,
            "transpose_indices": transpose.indices,
            "transpose_order": transpose.data - 1,
        }
        for name, array in buffers.items():  # structure, not weights: left out of state_dict
            self.register_buffer(name, torch.as_tensor(np.asarray(array, dtype=np.int64)), persistent=False)

    def extra_repr(self) -> str:
        return f"shape={self.shape}, nnz={self.nnz}, full={self.full}"

    def sparse(self, values: torch.Tensor) -> torch.Tensor:
        """M as a torch sparse CSR tensor (its values are ``values``, autograd included)."""
        return _csr_tensor(self.indptr, self.indices, values, self.shape)

    def dense(self, values: torch.Tensor) -> torch.Tensor:
        """M as a dense tensor, differentiable in ``values``."""
        if self.full:
            return values.view(self.shape)
        flat = self.row_ids * self.shape[1] + self.indices
        zeros = values.new_zeros(self.shape[0] * self.shape[1])
        return zeros.index_put((flat,), values).view(self.shape)

    def matmul(self, values: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
        """M X for a dense X of shape (columns of M, batch)."""
        if self.full:
            return values.view(self.shape) @ X
        if self._small(X):
            products = values[:, None] * X.index_select(0, self.indices)
            return X.new_zeros((self.shape[0], X.shape[1])).index_add_(0, self.row_ids, products)
        return self.sparse(values) @ X

    def transpose_matmul(self, values: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        """M^T Y for a dense Y of shape (rows of M, batch)."""
        if self.full:
            return values.view(self.shape).T @ Y
        if self._small(Y):
            products = values[:, None] * Y.index_select(0, self.row_ids)
            return Y.new_zeros((self.shape[1], Y.shape[1])).index_add_(0, self.indices, products)
        shape = (self.shape[1], self.shape[0])
        return _csr_tensor(self.transpose_indptr, self.transpose_indices, values[self.transpose_order], shape) @ Y

    def sampled_outer(self, G: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
        """(G X^T) at the stored entries, as a values vector: the gradient of M's values when
        dL/d(M X) = G. G is (rows, batch), X is (columns, batch)."""
        if self.full:
            return (G @ X.T).reshape(-1)
        if self._small(X):
            return (G.index_select(0, self.row_ids) * X.index_select(0, self.indices)).sum(1)
        pattern = self.sparse(G.new_zeros(self.nnz))
        return torch.sparse.sampled_addmm(pattern, G, X.T, beta=0.0).values()

    def _small(self, X: torch.Tensor) -> bool:
        """Few enough products for gathers and one scatter, cheaper than building a sparse tensor
        and starting the sparse kernels' thread pool."""
        return self.nnz * X.shape[1] <= SMALL_PRODUCT


class ImplicitModule(torch.nn.Module):
    """x = phi(A x + B u + b_x), y = C x + D u + b_y with trainable sparse A, B, C, D and biases.

    Parameters (or buffers, when not trainable): ``A_values``, ``B_values``, ``C_values``,
    ``D_values`` (the CSR data of each matrix over its fixed pattern, ``A_pattern`` ...), ``bias_x``
    and ``bias_y``. ``A`` ... ``D`` give the matrices as torch sparse CSR tensors, ``dense(name)``
    as dense ones. Build one with ``from_model`` (or ``ImplicitModel.to_torch``) or ``random``.

    Attributes:
        blocks, inputs, outputs: as in ``ImplicitModel`` (``to_model`` keeps them).
        tol, max_iter: the forward and adjoint solves' tolerance (on the estimated relative
            error of each sample's iterated states) and iteration cap per cyclic component.
        anderson_memory: Anderson history length of both solves (0: plain sweeps).
        last_solve: a ``SolveRecord`` of the latest forward (and backward) solve.
    """

    def __init__(
        self,
        model: ImplicitModel,
        dtype: Any = None,
        trainable: Iterable[str] = TRAINABLE,
        tol: float | None = None,
        max_iter: int = 1000,
    ):
        super().__init__()
        if not isinstance(model, ImplicitModel):
            raise ShapeError(f"expected an ImplicitModel, got {type(model).__name__}")
        dtype = _torch_dtype(dtype, model.dtype)
        trainable = tuple(trainable)
        unknown = sorted(set(trainable) - set(TRAINABLE))
        if unknown:
            raise ShapeError(f"trainable: unknown names {unknown}; expected a subset of {TRAINABLE}")
        self.blocks: tuple[StateBlock, ...] = model.blocks
        self.inputs: tuple[TensorSpec, ...] = model.inputs
        self.outputs: tuple[TensorSpec, ...] = model.outputs
        self.segments = _activation_segments(model.blocks)
        self.tol = DEFAULT_TOLERANCE[dtype] if tol is None else float(tol)
        check_tolerance(self.tol, np.float32 if dtype == torch.float32 else np.float64)
        self.max_iter = int(max_iter)
        self.anderson_memory = 5
        self.last_solve: SolveRecord | None = None
        for name in MATRIX_NAMES:
            matrix = getattr(model, name)
            self.add_module(f"{name}_pattern", SparsityPattern(matrix))
            self._register(f"{name}_values", torch.as_tensor(matrix.data.copy(), dtype=dtype), name in trainable)
        for name in ("bias_x", "bias_y"):
            self._register(name, torch.as_tensor(getattr(model, name).copy(), dtype=dtype), name in trainable)
        self._blocks, self._forward_schedule, self._adjoint_schedule = schedules(self)

    def _register(self, name: str, value: torch.Tensor, trainable: bool) -> None:
        if trainable:
            self.register_parameter(name, torch.nn.Parameter(value))
        else:
            self.register_buffer(name, value)

    # ----------------------------------------------------------------------------- construction
    @classmethod
    def from_model(
        cls,
        model: ImplicitModel,
        dtype: Any = None,
        trainable: Iterable[str] = TRAINABLE,
        tol: float | None = None,
        max_iter: int = 1000,
    ) -> ImplicitModule:
        """A module holding ``model``'s matrices and biases as tensors over its sparsity patterns.

        Args:
            model: the implicit model (compiled or hand-made).
            dtype: torch.float32 or torch.float64 (default: the model's dtype).
            trainable: which of "A", "B", "C", "D", "bias_x", "bias_y" are parameters; the others
                are buffers.
            tol: tolerance of the forward and adjoint solves, on each sample's estimated relative
                error (default 1e-10 in float64, 1e-5 in float32).
            max_iter: iteration cap of each solve.
        """
        return cls(model, dtype=dtype, trainable=trainable, tol=tol, max_iter=max_iter)

    @classmethod
    def random(
        cls,
        n_states: int,
        n_inputs: int,
        n_outputs: int,
        activation: str | Activation = "relu",
        kappa: float = 0.95,
        structure: str = "dense",
        seed: int | None = None,
        dtype: Any = torch.float64,
        trainable: Iterable[str] = TRAINABLE,
        tol: float | None = None,
        max_iter: int = 1000,
    ) -> ImplicitModule:
        """A randomly initialised one-block model with full patterns (input 'u', output 'y').

        A is Gaussian scaled to ||A||_inf = kappa / 2 (inside the ball, so early solves are fast);
        ``structure="triangular"`` stores only its strict lower triangle (an acyclic model).
        B ~ N(0, 1/p), C ~ N(0, 1/n); D and the biases start at zero (stored, so trainable).
        """
        if min(n_states, n_inputs, n_outputs) < 1:
            raise ShapeError(
                f"expected at least one state, input and output, got n_states={n_states}, "
                f"n_inputs={n_inputs}, n_outputs={n_outputs}"
            )
        if structure not in STRUCTURES:
            raise ShapeError(f"unknown structure {structure!r}: expected one of {', '.join(STRUCTURES)}")
        if not 0 <= kappa < float("inf"):
            raise ValueError(f"kappa: expected a finite radius >= 0 for ||A||_inf, got {kappa}")
        n, p, q = int(n_states), int(n_inputs), int(n_outputs)
        rng = np.random.default_rng(seed)
        A = rng.normal(size=(n, n))
        if structure == "triangular":
            A = np.tril(A, k=-1)
        largest_row = np.abs(A).sum(axis=1).max()
        A *= 0.5 * float(kappa) / largest_row if largest_row > 0 else 0.0
        A_csr = _strictly_lower_pattern(A) if structure == "triangular" else _full_pattern(A)
        B = rng.normal(size=(n, p)) / np.sqrt(p)
        C = rng.normal(size=(q, n)) / np.sqrt(n)
        model = ImplicitModel(
            A_csr,
            _full_pattern(B),
            _full_pattern(C),
            _full_pattern(np.zeros((q, p))),
            None,
            None,
            (StateBlock("x", 0, n, activation, (n,)),),
            (TensorSpec("u", (p,)),),
            (TensorSpec("y", (q,)),),
        )
        return cls(model, dtype=dtype, trainable=trainable, tol=tol, max_iter=max_iter)

    def to_model(self) -> ImplicitModel:
        """The current weights as an ``ImplicitModel`` (copies; same patterns, explicit zeros kept)."""
        matrices = []
        for name in MATRIX_NAMES:
            pattern: SparsityPattern = getattr(self, f"{name}_pattern")
            data = getattr(self, f"{name}_values").detach().cpu().numpy().copy()
            indices, indptr = pattern.indices.cpu().numpy(), pattern.indptr.cpu().numpy()
            matrices.append(sp.csr_array((data, indices, indptr), shape=pattern.shape))
        bias_x, bias_y = (getattr(self, name).detach().cpu().numpy().copy() for name in ("bias_x", "bias_y"))
        return ImplicitModel(*matrices, bias_x, bias_y, self.blocks, self.inputs, self.outputs)

    # ----------------------------------------------------------------------------- properties
    @property
    def n(self) -> int:
        """Number of states."""
        return self.A_pattern.shape[0]

    @property
    def p(self) -> int:
        """Number of (flattened) inputs."""
        return self.B_pattern.shape[1]

    @property
    def q(self) -> int:
        """Number of (flattened) outputs."""
        return self.C_pattern.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        """The floating dtype of the weights."""
        return self.A_values.dtype

    @property
    def A(self) -> torch.Tensor:
        """A as a sparse CSR tensor over ``A_values``."""
        return self.A_pattern.sparse(self.A_values)

    @property
    def B(self) -> torch.Tensor:
        """B as a sparse CSR tensor over ``B_values``."""
        return self.B_pattern.sparse(self.B_values)

    @property
    def C(self) -> torch.Tensor:
        """C as a sparse CSR tensor over ``C_values``."""
        return self.C_pattern.sparse(self.C_values)

    @property
    def D(self) -> torch.Tensor:
        """D as a sparse CSR tensor over ``D_values``."""
        return self.D_pattern.sparse(self.D_values)

    def dense(self, name: str) -> torch.Tensor:
        """Matrix ``name`` ("A", "B", "C" or "D") as a dense tensor, differentiable in its values."""
        if name not in MATRIX_NAMES:
            raise ShapeError(f"unknown matrix {name!r}: expected one of {', '.join(MATRIX_NAMES)}")
        return getattr(self, f"{name}_pattern").dense(getattr(self, f"{name}_values"))

    def state_matrix_norm(self) -> float:
        """||A||_inf, the largest row l1 norm of A (< 1 keeps the model well-posed)."""
        with torch.no_grad():
            norms = row_l1_norms(self.A_values, self.A_pattern.indptr)
            return float(norms.max()) if norms.numel() else 0.0

    def lipschitz_per_state(self) -> torch.Tensor:
        """The Lipschitz constant of each state's activation, (n,) (inf for 'square')."""
        constants = torch.empty(self.n, dtype=self.dtype, device=self.A_values.device)
        for start, stop, activation in self.segments:
            constants[start:stop] = activation.lipschitz
        return constants

    def extra_repr(self) -> str:
        return f"n={self.n}, p={self.p}, q={self.q}, nnz(A)={self.A_pattern.nnz}, dtype={self.dtype}"

    # ----------------------------------------------------------------------------- training
    def forward(self, u: Any) -> torch.Tensor:
        """y for inputs u of shape (batch, p), or (p,) for one sample (then y is (q,))."""
        U, single = self._input_columns(u)
        X = self._equilibrium_columns(U)
        Y = (
            _SparseProduct.apply(self.C_values, X, self.C_pattern)
            + _SparseProduct.apply(self.D_values, U, self.D_pattern)
            + self.bias_y[:, None]
        )
        return Y[:, 0] if single else Y.T

    def equilibrium(self, u: Any) -> torch.Tensor:
        """The state x of shape (batch, n) (or (n,)), differentiable by implicit differentiation."""
        U, single = self._input_columns(u)
        X = self._equilibrium_columns(U)
        return X[:, 0] if single else X.T

    @torch.no_grad()
    def project_(self, kappa: float, mask: Any = None) -> ImplicitModule:
        """Project A's rows onto {||row||_1 <= kappa} in place: ||A||_inf <= kappa afterwards.

        Call it after each optimizer step to keep the model well-posed (kappa < 1 for
        non-expansive activations). The sparsity pattern is always kept; ``mask`` restricts it
        further: "triangular" (strictly lower: an acyclic model), a boolean (n, n) array, or a
        boolean vector over the stored entries. Entries outside the mask become zero.
        """
        pattern: SparsityPattern = self.A_pattern
        entry_mask = None
        if mask is not None:
            if isinstance(mask, str) or tuple(mask.shape) == pattern.shape:
                dense_mask = structure_mask(mask, pattern.shape)
                entry_mask = torch.as_tensor(dense_mask[pattern.row_ids.cpu().numpy(), pattern.indices.cpu().numpy()])
            elif tuple(mask.shape) == (pattern.nnz,):
                entry_mask = torch.as_tensor(mask, dtype=torch.bool)
            else:
                raise ShapeError(
                    f"mask: expected 'triangular', a boolean {pattern.shape} array or a boolean vector over the "
                    f"{pattern.nnz} stored entries of A, got shape {tuple(mask.shape)}"
                )
            entry_mask = entry_mask.to(self.A_values.device)
        if pattern.full and entry_mask is None:  # the dense matrix itself: its rows sorted in place
            projected = project_rows_l1(self.A_values.view(pattern.shape), kappa).view(-1)
        else:
            projected = project_rows_l1(self.A_values, kappa, indptr=pattern.indptr, mask=entry_mask)
        self.A_values.copy_(projected)
        return self

    # ----------------------------------------------------------------------------- solving
    def _input_columns(self, u: Any) -> tuple[torch.Tensor, bool]:
        """u as (p, batch) columns in the module's dtype, and whether it was one sample."""
        if not torch.is_tensor(u):
            u = torch.as_tensor(np.asarray(u))
        u = u.to(dtype=self.dtype, device=self.A_values.device)
        single = u.dim() == 1
        if single:
            u = u[None]
        if u.dim() != 2 or u.shape[1] != self.p:
            raise ShapeError(f"expected inputs of shape (batch, {self.p}) or ({self.p},), got {tuple(u.shape)}")
        return u.T, single

    def _equilibrium_columns(self, U: torch.Tensor) -> torch.Tensor:
        return _Equilibrium.apply(self.A_values, self.B_values, self.bias_x, U, self)

    def _slopes(self, X: torch.Tensor, Z: torch.Tensor | None) -> torch.Tensor:
        """phi'(z) at the equilibrium, read off x = phi(z) where it can be (Z otherwise:
        ``_read_off_output``)."""
        slopes = torch.empty_like(X)
        for start, stop, activation in self.segments:
            rows = slice(start, stop)
            if _read_off_output(activation):
                slopes[rows] = _phi_derivative_at_output(activation, X[rows])
            else:  # phi'(z) of Z (float64, rounded to the module's dtype)
                derivative = activation.derivative(Z[rows].detach().cpu().numpy())
                slopes[rows] = torch.from_numpy(derivative).to(dtype=X.dtype, device=X.device)
        return slopes

    def _solve_forward(
        self, A_values: torch.Tensor, B_values: torch.Tensor, bias_x: torch.Tensor, U: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The equilibrium by block sweeps (``equilibrium``) in W = [c; x], c = B u + b_x;
        returns (X, Z), both (n, batch): Z = A X + c only when a block's phi'(z) cannot be read
        off x (``_read_off_output``), else None."""
        constant = self.B_pattern.matmul(B_values, U) + bias_x[:, None]
        n = self.n
        W = np.zeros((2 * n, constant.shape[1]), dtype=_numpy_dtype(self.dtype))
        W[:n] = constant.cpu().numpy()
        products = BlockProducts(self.A_pattern, A_values.cpu(), self._blocks, transpose=False)
        results = self._solve_blocks(
            "equilibrium (forward) solve", self._forward_schedule, W, n, ForwardBlocks(products, n)
        )
        self.last_solve = SolveRecord(*iterations(results))
        X = torch.from_numpy(W[n:]).to(constant.device)
        if not all(_read_off_output(activation) for _, _, activation in self.segments):
            return X, self.A_pattern.matmul(A_values, X) + constant
        return X, None

    def _solve_adjoint(self, A_values: torch.Tensor, slopes: torch.Tensor, grad_X: torch.Tensor) -> torch.Tensor:
        """g = phi'(z) * w with w = A^T (phi'(z) * w) + dL/dx, by block sweeps in W = [s; dL/dx; g]."""
        n = self.n
        W = np.zeros((3 * n, grad_X.shape[1]), dtype=_numpy_dtype(self.dtype))
        W[:n], W[n : 2 * n] = slopes.cpu().numpy(), grad_X.detach().cpu().numpy()
        products = BlockProducts(self.A_pattern, A_values.cpu(), self._blocks, transpose=True)
        results = self._solve_blocks(
            "adjoint (backward) solve", self._adjoint_schedule, W, 2 * n, AdjointBlocks(products, n)
        )
        if self.last_solve is not None:
            count, residual = iterations(results)
            self.last_solve = dataclasses.replace(
                self.last_solve, backward_iterations=count, backward_residual=residual
            )
        return torch.from_numpy(W[2 * n :]).to(grad_X.device)

    def _solve_blocks(self, what: str, schedule, W: np.ndarray, offset: int, run_block) -> list:
        try:
            return solve_blocks(schedule, W, offset, run_block, self.tol, self.max_iter, self.anderson_memory)
        except ConvergenceError as error:
            history = error.residual_history
            raise ConvergenceError(f"{self._failure_message(what, history)} ({error})", history) from error

    def _failure_message(self, what: str, history: list[float]) -> str:
        residual = history[-1] if history else float("nan")
        return (
            f"the {what} did not converge in {len(history)} of max_iter={self.max_iter} iterations: "
            f"residual {residual:.3g}, tol {self.tol:.3g}, with ||A||_inf = {self.state_matrix_norm():.3g}. "
            "Keep the model well-posed by projecting A after each optimizer step, module.project_(kappa) "
            "with kappa < 1 (so ||A||_inf < 1 for non-expansive activations); otherwise raise max_iter "
            "or loosen tol. The residual history is in the error's residual_history"
        )


# --------------------------------------------------------------------------------- autograd
class _Equilibrium(torch.autograd.Function):
    """X = phi(A X + B U + b_x) with gradients by the implicit function theorem."""

    @staticmethod
    def forward(ctx, A_values, B_values, bias_x, U, module: ImplicitModule):
        with torch.no_grad():
            X, Z = module._solve_forward(A_values, B_values, bias_x, U)
        ctx.module, ctx.Z = module, Z
        ctx.save_for_backward(A_values, B_values, U, X)
        return X

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_X):
        A_values, B_values, U, X = ctx.saved_tensors
        module: ImplicitModule = ctx.module
        needs_A, needs_B, needs_bias, needs_U = ctx.needs_input_grad[:4]
        with torch.no_grad():
            G = module._solve_adjoint(A_values, module._slopes(X, ctx.Z), grad_X)
            grad_A = module.A_pattern.sampled_outer(G, X) if needs_A else None
            grad_B = module.B_pattern.sampled_outer(G, U) if needs_B else None
            grad_bias = G.sum(1) if needs_bias else None
            grad_U = module.B_pattern.transpose_matmul(B_values, G) if needs_U else None
        return grad_A, grad_B, grad_bias, grad_U, None


class _SparseProduct(torch.autograd.Function):
    """M X over a fixed pattern: dL/dvalues = (G X^T) on the pattern, dL/dX = M^T G."""

    @staticmethod
    def forward(ctx, values, X, pattern: SparsityPattern):
        ctx.pattern = pattern
        ctx.save_for_backward(values, X)
        return pattern.matmul(values, X)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_Y):
        values, X = ctx.saved_tensors
        pattern: SparsityPattern = ctx.pattern
        grad_values = pattern.sampled_outer(grad_Y, X) if ctx.needs_input_grad[0] else None
        grad_X = pattern.transpose_matmul(values, grad_Y) if ctx.needs_input_grad[1] else None
        return grad_values, grad_X, None


# --------------------------------------------------------------------------------- helpers
def _read_off_output(activation: Activation) -> bool:
    """Whether phi'(z) follows from x = phi(z) (cheaply, in torch): for identity, relu, tanh,
    sigmoid and a leaky_relu with alpha > 0 (with alpha <= 0, x no longer tells z's sign). The
    others (square: z = +-sqrt(x); gelu, elu, ...) take phi'(z) from Z = A X + c."""
    if activation.name == "leaky_relu":
        return activation.alpha > 0
    return activation.name in ("identity", "relu", "tanh", "sigmoid")


def _phi_derivative_at_output(activation: Activation, x: torch.Tensor) -> torch.Tensor:
    """phi'(z) from x = phi(z) (where ``_read_off_output``), with the conventions of
    ``analysis.attack.activation_derivative`` (relu' = 0 and leaky_relu' = 1 at z = 0): x > 0 iff
    z > 0 (relu), x < 0 iff z < 0 (leaky_relu, alpha > 0), tanh' = 1 - x^2, sigmoid' = x (1 - x)."""
    name = activation.name
    if name == "identity":
        return torch.ones_like(x)
    if name == "relu":
        return (x > 0).to(x.dtype)
    if name == "leaky_relu":
        return torch.where(x < 0, torch.full_like(x, activation.alpha), torch.ones_like(x))
    if name == "tanh":
        return 1 - x * x
    if name == "sigmoid":
        return x * (1 - x)
    raise ShapeError(f"the derivative of {name!r} cannot be read off its output")


def _activation_segments(blocks: tuple[StateBlock, ...]) -> tuple[tuple[int, int, Activation], ...]:
    """(start, stop, activation) runs of the state, consecutive blocks with one activation merged."""
    segments: list[tuple[int, int, Activation]] = []
    for block in blocks:
        if block.size == 0:
            continue
        if segments and segments[-1][1] == block.start and segments[-1][2] == block.activation:
            segments[-1] = (segments[-1][0], block.stop, block.activation)
        else:
            segments.append((block.start, block.stop, resolve_activation(block.activation)))
    return tuple(segments)


def _csr_tensor(indptr: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, shape: tuple) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(indptr, indices, values, shape, check_invariants=False)


def _full_pattern(dense: np.ndarray) -> sp.csr_array:
    """A CSR array storing every entry of ``dense``, zeros included (so all of them train)."""
    rows, cols = dense.shape
    indptr = np.arange(rows + 1) * cols
    return sp.csr_array((dense.ravel().copy(), np.tile(np.arange(cols), rows), indptr), shape=dense.shape)


def _strictly_lower_pattern(dense: np.ndarray) -> sp.csr_array:
    """A CSR array storing every entry strictly below the diagonal of a square ``dense``."""
    n = dense.shape[0]
    rows, cols = np.tril_indices(n, k=-1)  # row-major order: canonical CSR
    indptr = np.concatenate(([0], np.cumsum(np.arange(n))))
    return sp.csr_array((dense[rows, cols], cols, indptr), shape=dense.shape)


def _numpy_dtype(dtype: torch.dtype) -> type:
    return np.float32 if dtype == torch.float32 else np.float64


def _torch_dtype(dtype: Any, model_dtype: np.dtype) -> torch.dtype:
    if dtype is None:
        return torch.float32 if np.dtype(model_dtype) == np.float32 else torch.float64
    if isinstance(dtype, torch.dtype):
        resolved = dtype
    else:
        resolved = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}.get(np.dtype(dtype))
    if resolved not in DEFAULT_TOLERANCE:
        raise ShapeError(f"expected dtype torch.float32 or torch.float64, got {dtype}")
    return resolved
