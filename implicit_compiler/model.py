"""The implicit model: x = phi(A x + B u + b_x), y = C x + D u + b_y.

A (n x n), B (n x p), C (q x n), D (q x p) are scipy.sparse CSR arrays, or structured matrices
(``structure.StructuredMatrix``: convolution and dense terms kept as kernels, plus a CSR
remainder) that become CSR only when read: ``model.A`` materializes and caches it, after
checking that it fits in memory (``ModelTooLargeError`` with its size when it does not), while
``model.structure`` gives the four structured forms, which the runtime, save/load, spy and the
analyses use without materializing.

The state x is cut into named blocks, each a contiguous slice of x with one componentwise
activation and the shape of the tensor it came from. Inputs and outputs carry their names and
per-sample shapes: a sample is flattened in C order and the inputs are concatenated in the order
they are listed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp

from .activations import Activation, activation
from .errors import ModelTooLargeError, NonFiniteError, ShapeError
from .memory import available_memory_bytes
from .structure import StructuredMatrix

if TYPE_CHECKING:
    from .runtime.solve import Solution

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


@dataclass(frozen=True)
class TensorSpec:
    """A named model input or output and its per-sample shape (no batch axis)."""

    name: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", _as_shape(self.shape, f"tensor {self.name!r}"))

    @property
    def size(self) -> int:
        """Number of scalars in one sample."""
        return math.prod(self.shape)


@dataclass(frozen=True)
class StateBlock:
    """A contiguous slice x[start:stop] of the state, produced by one activation site.

    Attributes:
        name: unique name of the block (the ONNX value it stands for, when lowered).
        start, stop: the slice of x it occupies.
        activation: the componentwise activation applied to the block.
        shape: the original tensor shape of one sample, in C order (prod(shape) = stop - start).
        source_node: the name of the network node that produced it, if any.
    """

    name: str
    start: int
    stop: int
    activation: Activation
    shape: tuple[int, ...]
    source_node: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "activation", activation(self.activation))
        object.__setattr__(self, "shape", _as_shape(self.shape, f"block {self.name!r}"))
        if not 0 <= self.start <= self.stop:
            raise ShapeError(
                f"block {self.name!r}: expected 0 <= start <= stop, got start={self.start}, stop={self.stop}"
            )
        if math.prod(self.shape) != self.size:
            raise ShapeError(
                f"block {self.name!r}: shape {self.shape} holds {math.prod(self.shape)} values "
                f"but the block spans {self.size} states ({self.start}:{self.stop})"
            )

    @property
    def size(self) -> int:
        """Number of states in the block."""
        return self.stop - self.start

    @property
    def slice(self) -> slice:
        """The block's slice of the state vector."""
        return slice(self.start, self.stop)


class _Matrix:
    """A, B, C or D of a model: stored as given (CSR, or a ``StructuredMatrix`` with terms),
    read as CSR (a structured one materialized once, on the first read, if it fits)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, model: ImplicitModel | None, owner: type | None = None) -> sp.csr_array:
        if model is None:
            raise AttributeError(self.name)  # (no default: the dataclass field is required)
        stored = model.__dict__["_stored"][self.name]
        if not isinstance(stored, StructuredMatrix):
            return stored
        key = ("csr", self.name)
        if key not in model._cache:
            model._cache[key] = _materialize(stored, self.name)
        return model._cache[key]

    def __set__(self, model: ImplicitModel, value: Any) -> None:
        model.__dict__.setdefault("_stored", {})[self.name] = value  # (frozen: only __init__ sets it)


@dataclass(frozen=True)
class ModelStructure:
    """A, B, C and D of a model as structured matrices (a plain one has no terms)."""

    A: StructuredMatrix
    B: StructuredMatrix
    C: StructuredMatrix
    D: StructuredMatrix


@dataclass(frozen=True, eq=False, repr=False)
class ImplicitModel:
    """An implicit model x = phi(A x + B u + b_x), y = C x + D u + b_y.

    Construct it from its parts (validated here), with ``from_matrices`` for a one-block model,
    or with ``implicit_compiler.from_onnx``. All matrices and biases share one floating dtype
    (float32 or float64); sparse inputs of any format are stored as CSR, ``StructuredMatrix``
    ones as they are (materialized when ``model.A`` etc. is read: see the module docstring).
    The constructor takes canonical CSR arrays over without copying them (do not edit them
    afterwards); ``from_matrices`` copies.
    """

    A: sp.csr_array = _Matrix()
    B: sp.csr_array = _Matrix()
    C: sp.csr_array = _Matrix()
    D: sp.csr_array = _Matrix()
    bias_x: np.ndarray
    bias_y: np.ndarray
    blocks: tuple[StateBlock, ...]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    _cache: dict = field(default_factory=dict, init=False, compare=False)

    def __post_init__(self) -> None:
        stored = self.__dict__["_stored"]
        matrices = {name: _as_stored(stored[name], name) for name in "ABCD"}
        dtype = _common_float_dtype([m.dtype for m in matrices.values()])
        for name, matrix in matrices.items():
            stored[name] = (
                matrix.astype(dtype, copy=False) if isinstance(matrix, sp.csr_array) else matrix.astype(dtype)
            )
        n, p, q = stored["A"].shape[0], stored["B"].shape[1], stored["C"].shape[0]
        _expect_shape(stored["A"], (n, n), "A", "square, n x n with n the number of states")
        _expect_shape(stored["B"], (n, p), "B", "n x p: rows as A, columns as inputs")
        _expect_shape(stored["C"], (q, n), "C", "q x n: rows as outputs, columns as A")
        _expect_shape(stored["D"], (q, p), "D", "q x p: rows as C, columns as B")
        object.__setattr__(self, "bias_x", _as_bias(self.bias_x, n, dtype, "bias_x"))
        object.__setattr__(self, "bias_y", _as_bias(self.bias_y, q, dtype, "bias_y"))
        for name in "ABCD":
            matrix = stored[name]
            finite = matrix.is_finite() if isinstance(matrix, StructuredMatrix) else np.isfinite(matrix.data).all()
            if not finite:
                raise NonFiniteError(f"matrix {name} holds NaN or inf values; expected finite weights")
        object.__setattr__(self, "blocks", tuple(self.blocks))
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "outputs", tuple(self.outputs))
        _check_blocks(self.blocks, n)
        _check_specs(self.inputs, p, "inputs", "p, the columns of B")
        _check_specs(self.outputs, q, "outputs", "q, the rows of C")

    # ----------------------------------------------------------------------------- construction
    @classmethod
    def from_matrices(
        cls,
        A: Any,
        B: Any,
        C: Any,
        D: Any,
        activation: str | Activation = "relu",
        bias_x: Any = None,
        bias_y: Any = None,
    ) -> ImplicitModel:
        """A one-block model from array-like or sparse matrices (input 'u', output 'y')."""
        A, B, C, D = (_as_csr(m, name, copy=True) for m, name in zip((A, B, C, D), "ABCD"))
        n, p, q = A.shape[0], B.shape[1], C.shape[0]
        block = StateBlock("x", 0, n, activation, (n,))
        return cls(A, B, C, D, bias_x, bias_y, (block,), (TensorSpec("u", (p,)),), (TensorSpec("y", (q,)),))

    @classmethod
    def from_torch(cls, module: Any) -> ImplicitModel:
        """The model an ``implicit_compiler.training.ImplicitModule`` holds now (needs torch).
        Any other torch module is compiled by ``implicit_compiler.from_torch(module, example_inputs)``
        (which also takes an ImplicitModule, returning this)."""
        from .training.torch_bridge import ImplicitModule

        if not isinstance(module, ImplicitModule):
            raise ShapeError(
                f"expected an implicit_compiler.training.ImplicitModule, got {type(module).__name__}; to compile "
                "another torch module, export it with implicit_compiler.from_torch(module, example_inputs)"
            )
        return module.to_model()

    def to_torch(self, **options: Any) -> Any:
        """A trainable torch module of this model (needs torch); options as
        ``ImplicitModule.from_model``: dtype, trainable, tol, max_iter."""
        from .training.torch_bridge import ImplicitModule

        return ImplicitModule.from_model(self, **options)

    # ----------------------------------------------------------------------------- properties
    @property
    def n(self) -> int:
        """Number of states."""
        return self._stored["A"].shape[0]

    @property
    def p(self) -> int:
        """Number of (flattened) inputs per sample."""
        return self._stored["B"].shape[1]

    @property
    def q(self) -> int:
        """Number of (flattened) outputs per sample."""
        return self._stored["C"].shape[0]

    @property
    def dtype(self) -> np.dtype:
        """The floating dtype of every matrix and bias."""
        return self._stored["A"].dtype

    @property
    def nnz(self) -> int:
        """Non-zeros of A, B, C and D together (as CSR; counted from the structure, without
        materializing)."""
        return sum(matrix.nnz for matrix in self._stored.values())

    @property
    def memory_bytes(self) -> int:
        """Bytes held by the matrices as stored (CSR arrays; kernels and remainders of structured
        ones) and the biases."""
        total = self.bias_x.nbytes + self.bias_y.nbytes
        for m in self._stored.values():
            total += (
                m.stored_bytes
                if isinstance(m, StructuredMatrix)
                else m.data.nbytes + m.indices.nbytes + m.indptr.nbytes
            )
        return total

    @property
    def structure(self) -> ModelStructure:
        """A, B, C and D as ``StructuredMatrix`` objects, never materialized (the runtime,
        save, spy and the analyses read this); a plain CSR matrix has no terms."""
        if "structure" not in self._cache:
            self._cache["structure"] = ModelStructure(
                *(m if isinstance(m, StructuredMatrix) else StructuredMatrix.plain(m) for m in self._parts())
            )
        return self._cache["structure"]

    @property
    def is_structured(self) -> bool:
        """Whether some matrix keeps terms (convolutions, dense products) instead of CSR."""
        return any(isinstance(m, StructuredMatrix) for m in self._parts())

    def materialized(self) -> ImplicitModel:
        """The same model with A, B, C and D as CSR (itself when they already are);
        ``ModelTooLargeError`` when one would not fit in memory."""
        if not self.is_structured:
            return self
        return ImplicitModel(
            self.A, self.B, self.C, self.D, self.bias_x, self.bias_y, self.blocks, self.inputs, self.outputs
        )

    def _parts(self) -> tuple[Any, Any, Any, Any]:
        """A, B, C, D as stored (CSR or ``StructuredMatrix``)."""
        return tuple(self._stored[name] for name in "ABCD")

    def block(self, name: str) -> StateBlock:
        """The state block called ``name``."""
        for block in self.blocks:
            if block.name == name:
                return block
        raise KeyError(f"no state block named {name!r}; blocks: {[b.name for b in self.blocks]}")

    def __repr__(self) -> str:
        return (
            f"ImplicitModel(n={self.n}, p={self.p}, q={self.q}, nnz(A)={self._stored['A'].nnz}, "
            f"blocks={len(self.blocks)}, dtype={self.dtype})"
        )

    # ----------------------------------------------------------------------------- transforms
    def astype(self, dtype: Any) -> ImplicitModel:
        """The same model with every matrix and bias cast to ``dtype`` (float32 or float64)."""
        dtype = np.dtype(dtype)
        if dtype == self.dtype:
            return self
        if dtype not in FLOAT_DTYPES:
            raise ShapeError(
                f"expected dtype float32 or float64, got {dtype}: implicit models compute in float32 or float64 "
                "only (float16 weights and inputs are widened to float32, exactly)"
            )
        if dtype not in self._cache:
            self._cache[dtype] = ImplicitModel(
                *(m.astype(dtype) for m in self._parts()),
                self.bias_x.astype(dtype),
                self.bias_y.astype(dtype),
                self.blocks,
                self.inputs,
                self.outputs,
            )
        return self._cache[dtype]

    def homogeneous(self) -> ImplicitModel:
        """The bias-free form: u extended with a constant 1, biases moved into B and D.

        x = phi(A x + [B b_x] [u; 1]),  y = C x + [D b_y] [u; 1]. The extra input is named
        'one' (shape (1,)); feed it the value 1.
        """
        A, B, C, D = self._parts()
        B, D = _with_column(B, self.bias_x), _with_column(D, self.bias_y)
        names = {spec.name for spec in self.inputs}
        one = "one" if "one" not in names else _fresh_name("one", names)
        return ImplicitModel(
            A,
            B,
            C,
            D,
            None,
            None,
            self.blocks,
            (*self.inputs, TensorSpec(one, (1,))),
            self.outputs,
        )

    # ----------------------------------------------------------------------------- running
    def solve(
        self,
        u: Any,
        method: str = "auto",
        tol: float | None = None,
        max_iter: int = 1000,
        anderson_memory: int = 5,
        acceleration: str = "anderson",
    ) -> Solution:
        """Solve the equilibrium for input(s) u; see ``implicit_compiler.runtime.solve``."""
        from .runtime.solve import solve

        return solve(
            self, u, method=method, tol=tol, max_iter=max_iter, anderson_memory=anderson_memory,
            acceleration=acceleration,
        )  # fmt: skip

    def predict(self, u: Any, **solve_options: Any) -> np.ndarray | dict[str, np.ndarray]:
        """y shaped like the source network's output(s): one array, or a dict for several.

        Acyclic models run as one compiled program: one sample in one call
        (``runtime/one_sample.py``), a batch by tiles of samples (``runtime/sample_tiles.py``,
        from a tile per thread on). What the runtime works in is kept on the model between calls
        (one per thread, released with the model), as only y is returned: the program's values
        (p + n + q), the tiles' slabs ((p + n + q) x tile per thread), or for other models and
        smaller batches the solver's (p + n) x batch state.

        ``solve_options`` are ``solve``'s: method, tol, max_iter, anderson_memory, acceleration,
        checked on every path (another name is an ArgumentTypeError). An empty batch gives an
        empty (0, ...) result; float16 inputs compute in float32 and wider floats (longdouble,
        big-endian '>f8') in float64.
        """
        from .runtime.batching import shape_outputs
        from .runtime.solve import predict_outputs

        return shape_outputs(self.outputs, predict_outputs(self, u, **solve_options))

    def to_onnx(
        self, path: str | None = None, opset: int | None = None, overwrite: bool = False, **options: Any
    ) -> Any:
        """This model as an ONNX graph (an ``onnx.ModelProto``) that onnxruntime runs and that
        predicts as ``predict`` does; written to ``path`` when given (an existing file only
        with ``overwrite``). Options: tol, max_iter (cyclic components), find_kernels; see
        ``implicit_compiler.export.to_onnx``."""
        from .export import to_onnx

        return to_onnx(self, path, opset=opset, overwrite=overwrite, **options)

    def save(self, path: str, overwrite: bool = False) -> None:
        """Write the model to one .npz file (no pickle); refuse to replace a file unless asked."""
        from .serialization import save_model

        save_model(self, path, overwrite=overwrite)


# --------------------------------------------------------------------------------- structure
def _materialize(matrix: StructuredMatrix, name: str) -> sp.csr_array:
    """``matrix.to_csr()`` after checking it fits: building it holds the entries as COO (two
    int64 indices and a value each) beside the final CSR."""
    needed = matrix.nnz * (16 + matrix.dtype.itemsize) + matrix.csr_bytes()
    available = available_memory_bytes()
    if needed > available:
        raise ModelTooLargeError(
            f"model.{name} would hold {matrix.nnz / 1e9:.2f}G non-zeros ({matrix.csr_bytes() / 1e9:.1f} GB as "
            f"{matrix.dtype} CSR, {needed / 1e9:.1f} GB while building it), over the {available / 1e9:.1f} GB this "
            "process has left; predict, solve, save, spy, well_posedness and sensitivity work on the structured "
            "form without it (model.structure), or a smaller input resolution makes it fit"
        )
    try:
        return _with_int32_indices(matrix.to_csr())
    except MemoryError as error:
        raise ModelTooLargeError(f"model.{name} ran out of memory while materializing its CSR: {error}") from error


def _as_stored(matrix: Any, name: str) -> sp.csr_array | StructuredMatrix:
    """A structured matrix with terms as it is (its remainder canonical CSR), one without as
    its remainder, anything else as ``_as_csr``."""
    if isinstance(matrix, StructuredMatrix):
        if not matrix.terms:
            return _as_csr(matrix.remainder, name)
        _check_real(matrix.dtype, f"matrix {name}")
        return StructuredMatrix(matrix.shape, matrix.terms, _as_csr(matrix.remainder, name))
    return _as_csr(matrix, name)


def _with_column(matrix: sp.csr_array | StructuredMatrix, column: np.ndarray) -> sp.csr_array | StructuredMatrix:
    """[matrix column] (``homogeneous``)."""
    column = sp.csr_array(column.reshape(-1, 1))
    if isinstance(matrix, StructuredMatrix):
        return matrix.with_columns(column)
    return sp.hstack([matrix, column], format="csr")


# --------------------------------------------------------------------------------- validation
def _as_shape(shape: Any, what: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        raise ShapeError(f"{what}: expected a shape of non-negative integers, got {shape!r}") from None
    if any(d < 0 for d in dims) or any(d != s for d, s in zip(dims, shape)):
        raise ShapeError(f"{what}: expected a shape of non-negative integers, got {shape!r}")
    return dims


def _as_csr(matrix: Any, name: str, copy: bool = False) -> sp.csr_array:
    """A CSR array from any sparse matrix or 2-D array-like of real numbers.

    The caller's matrix is never changed: one with duplicate entries is copied before they are
    summed. With ``copy`` it is not shared either (``from_matrices``: the caller's later edits
    would change ``model.A`` but not the compiled programs); without, a canonical CSR array is
    taken over as it is (the lowering's matrices: a copy would add half to its peak memory).
    float16 becomes float32, exactly (scipy.sparse has no float16)."""
    if sp.issparse(matrix):
        _check_real(matrix.dtype, f"matrix {name}")
        if copy or not isinstance(matrix, sp.csr_array):
            csr = sp.csr_array(matrix, copy=copy)
        else:
            csr = matrix if matrix.has_canonical_format else matrix.copy()
        if not csr.has_canonical_format and np.shares_memory(csr.data, matrix.data):
            csr = csr.copy()  # (a csr_matrix converts sharing its arrays)
    else:
        dense = np.asarray(matrix)
        if dense.ndim != 2:
            raise ShapeError(f"matrix {name}: expected 2 dimensions, got shape {dense.shape}")
        _check_real(dense.dtype, f"matrix {name}")
        csr = sp.csr_array(dense.astype(np.float32) if dense.dtype == np.float16 else dense)
    if csr.ndim != 2:
        raise ShapeError(f"matrix {name}: expected 2 dimensions, got shape {csr.shape}")
    csr.sum_duplicates()
    return _with_int32_indices(csr)


def _check_real(dtype: np.dtype, what: str) -> None:
    """Refuse complex (and non-numeric) weights: casting would drop the imaginary part with
    only numpy's ComplexWarning, and the model would silently compute something else."""
    if dtype.kind != "b" and (not np.issubdtype(dtype, np.number) or np.issubdtype(dtype, np.complexfloating)):
        raise ShapeError(f"{what}: expected real numbers, got dtype {dtype}; take the real part first if that is meant")


def _with_int32_indices(csr: sp.csr_array) -> sp.csr_array:
    """The same matrix with int32 index arrays when they fit: half the index memory and traffic
    of scipy's int64 (which it keeps after stacking large matrices)."""
    limit = np.iinfo(np.int32).max
    if csr.indices.dtype == np.int32 and csr.indptr.dtype == np.int32:
        return csr
    if csr.nnz > limit or max(csr.shape) > limit:
        return csr
    compact = sp.csr_array(csr.shape, dtype=csr.dtype)
    compact.data, compact.indices, compact.indptr = csr.data, csr.indices.astype(np.int32), csr.indptr.astype(np.int32)
    return compact


def _common_float_dtype(dtypes: Sequence[np.dtype]) -> np.dtype:
    dtype = np.result_type(*dtypes)
    if dtype in FLOAT_DTYPES:
        return dtype
    if np.issubdtype(dtype, np.floating) and dtype.itemsize < 4:
        return np.dtype(np.float32)
    return np.dtype(np.float64)


def _expect_shape(matrix: sp.csr_array | StructuredMatrix, expected: tuple[int, int], name: str, rule: str) -> None:
    if matrix.shape != expected:
        raise ShapeError(f"matrix {name} must be {rule}: expected shape {expected}, got {matrix.shape}")


def _as_bias(bias: Any, size: int, dtype: np.dtype, name: str) -> np.ndarray:
    if bias is None:
        return np.zeros(size, dtype=dtype)
    vector = np.asarray(bias)
    _check_real(vector.dtype, name)
    if vector.shape not in ((size,), (size, 1), (1, size)):
        raise ShapeError(f"{name}: expected a vector of length {size}, got shape {vector.shape}")
    vector = vector.reshape(size).astype(dtype, copy=False)
    if not np.isfinite(vector).all():
        raise NonFiniteError(f"{name} holds NaN or inf values; expected finite biases")
    return vector


def _check_blocks(blocks: tuple[StateBlock, ...], n: int) -> None:
    if n > 0 and not blocks:
        raise ShapeError(f"expected state blocks covering the {n} states, got none")
    position = 0
    for block in blocks:
        if not isinstance(block, StateBlock):
            raise ShapeError(f"expected StateBlock entries in blocks, got {type(block).__name__}")
        if block.start != position:
            raise ShapeError(
                f"blocks must tile the state in order: block {block.name!r} starts at "
                f"{block.start}, expected {position}"
            )
        position = block.stop
    if position != n:
        raise ShapeError(f"blocks cover states 0:{position}, expected 0:{n} (n = rows of A)")
    names = [block.name for block in blocks]
    if len(set(names)) != len(names):
        raise ShapeError(f"block names must be unique, got duplicates in {names}")


def _check_specs(specs: tuple[TensorSpec, ...], total: int, what: str, meaning: str) -> None:
    if not all(isinstance(spec, TensorSpec) for spec in specs):
        raise ShapeError(f"expected TensorSpec entries in {what}")
    size = sum(spec.size for spec in specs)
    if size != total:
        shapes = ", ".join(f"{spec.name}{spec.shape}" for spec in specs)
        raise ShapeError(f"{what} [{shapes}] hold {size} values per sample, expected {total} ({meaning})")
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise ShapeError(f"{what} names must be unique, got {names}")


def _fresh_name(base: str, taken: set[str]) -> str:
    index = 1
    while f"{base}_{index}" in taken:
        index += 1
    return f"{base}_{index}"
