"""An implicit model as an ONNX graph that onnxruntime (or any ONNX runtime) runs.

The model x = phi(A x + B u + b_x), y = C x + D u + b_y becomes, with tensors (N, features)
row-major (N the symbolic batch axis "N"; a product with the rows r of M is X M[r]^T):

    graph input  u_i (N, *shape_i)   -> Flatten -> (N, p_i)            (model.inputs, in order)
    each state block b, in the runtime's order (``runtime.plan.execution_order``):
      acyclic:   z_b = sum_j A[b, j] x_j + sum_i B[b, i] u_i + b_x[b];   x_b = phi_b(z_b)
                 (forward substitution: every x_j read is computed before)
      cyclic component K (blocks that read each other through A): one ``Loop``, below
    graph output y_k (N, *shape_k) = Reshape(sum_j C[k, j] x_j + sum_i D[k, i] u_i + b_y[k])
    per cyclic component, an output "fixed_point_residual" (N,) (``_residual_name``)

The products are ``onnx_products``' (convolution and dense terms as Conv and Gemm with their
kernels; the CSR rest as strided Slices or Gathers, Mul and ReduceSum, or small dense Gemms); the
activations ``onnx_activations``' (Relu, LeakyRelu, ... exactly as ``activations`` defines
them). A plain CSR model is first searched for its convolutions and dense products
(``structure.lift``, exact: the same linear map), so that the file holds kernels, not their
Toeplitz copies: LeNet-5 compiled as CSR exports to 258 kB (its ONNX file: 260 kB), ResNet20
to 1.09 MB (1.21 MB).

A cyclic component K, blocks k_1 .. k_m in storage order, is solved as the runtime solves it
(``runtime.cyclic``): by sweeps G of its blocks, iterated on the torn states t (the blocks that
back edges read). With F_k = (what K's block k reads from outside K: inputs, blocks solved
before, and its bias), computed once before the loop,

    Loop(max_iter, cond=true, x_k = 0 for every k in K, r = inf, f_prev = g_prev = 0):
        sweep G:  for k in k_1 .. k_m:  x_k' = phi_k(F_k + sum_{j in K} A[k, j] x_j*)
                  (x_j* the new x_j' for j before k, the carried x_j otherwise: one
                   Gauss-Seidel pass, one forward pass around a feedback loop)
        f = G(t) - t on the torn states;  r = |f|_inf / max(|G(t)|_inf, tiny), per sample (N,)
        cond = max_n r_n > tol
        Anderson acceleration of memory 1, per sample: df = f - f_prev, dg = G(t) - g_prev,
            gamma = <f, df> / <df, df>,  t' = G(t) - gamma dg
        where the residual shrank since the last sweep (a plain sweep t' = G(t) on the first
        sweep, where it grew, and on the sweep that ends the loop, so the answer is G(t))

so that the loop stops when every sample's relative residual is at most tol, or after
max_iter sweeps. tol and max_iter are the graph's initializers "fixed_point_tolerance" and
"fixed_point_max_iter" (defaults: the runtime's predict's, 1e-5 in float32, 1e-10 in float64,
and 1000). The last r is the graph output, so a run that did not converge is visible there
(r > tol; NaN or inf when the iteration diverged), never silent. The runtime stops on an
estimated error (r / (1 - rate)) with Anderson of memory 5; this stops on r itself, so its
states are within about tol / (1 - rate) of the equilibrium. Sweeps to tol 1e-5 in float32:
the LeNet-5 loop 3, as the runtime; a dense relu layer with ||A||_inf = 0.9 / 0.99 (n = 500,
nonnegative, batch 16) 10 / 15 against the runtime's 11 / 14 Anderson steps and 25 / 47
plain sweeps, 8e-6 / 6e-6 from its prediction (relative).

Each Loop is marked for ``from_onnx`` (``fixed_point_marks``: its doc_string, a JSON object
naming per state the carried body input, the sweep's result G and the Loop output, and the
residual output), so that it reads the Loop back as the fixed point x = G(x) it computes.

float64 models export double tensors (onnxruntime has no double Conv: such files run in
``onnx.reference`` and other runtimes).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import onnx
from onnx import helper

from .. import __version__, arguments
from ..errors import ArgumentValueError, ModelTooLargeError, ShapeError
from ..model import ImplicitModel, StateBlock
from .fixed_point_marks import FixedPointState, fixed_point_marks
from .onnx_activations import apply_activation
from .onnx_graph import GraphWriter
from .onnx_products import Contribution, Segment, Sources, row_products, total

DEFAULT_OPSET = 17
LEAST_OPSET = 13  # ReduceSum's axes as an input, Loop-13
RESIDUAL_OUTPUT = "fixed_point_residual"
PROTOBUF_LIMIT = 2**31 - 1


def to_onnx(
    model: ImplicitModel,
    path: str | os.PathLike | None = None,
    opset: int | None = None,
    overwrite: bool = False,
    tol: float | None = None,
    max_iter: int | None = None,
    find_kernels: bool = True,
) -> onnx.ModelProto:
    """The model as an ONNX ``ModelProto`` (module docstring), written to ``path`` when given.

    Args:
        path: the .onnx file to write; an existing file is replaced only with ``overwrite``
            (``OverwriteError`` otherwise, before any work).
        opset: the ONNX opset (default ``DEFAULT_OPSET``; from ``LEAST_OPSET`` to the installed
            onnx's latest).
        tol, max_iter: the cyclic components' stopping tolerance on the relative residual and
            sweep cap (defaults: ``predict``'s; ``ToleranceError`` for a tol the dtype cannot
            reach, as ``predict``).
        find_kernels: search a plain CSR model's convolutions and dense products first
            (``structure.lift``), so that they are written as Conv / Gemm with their kernels.
    """
    from ..runtime.fixed_point import check_tolerance
    from ..runtime.solve import DEFAULT_TOLERANCE, PREDICT_OPTIONS
    from ..serialization import writable_target, write_file

    opset = _checked_opset(opset)
    tol = DEFAULT_TOLERANCE[model.dtype] if tol is None else arguments.real(tol, "tol", "a positive number")
    check_tolerance(tol, model.dtype)  # (as predict: ToleranceError for one the dtype cannot reach)
    max_iter = PREDICT_OPTIONS["max_iter"] if max_iter is None else arguments.integer(max_iter, "max_iter", 1)
    if path is not None:
        writable_target(path, overwrite)  # refuse an existing file before the work
    if find_kernels and not model.is_structured:
        from ..structure import lift

        model = lift(model)
    proto = _Exporter(model, opset, float(tol), int(max_iter)).model_proto()
    if proto.ByteSize() > PROTOBUF_LIMIT:
        raise ModelTooLargeError(
            f"the exported graph takes {proto.ByteSize() / 2**30:.1f} GiB, over protobuf's 2 GiB limit for one "
            "ONNX file (weights in external data files are not written by to_onnx)"
        )
    onnx.checker.check_model(proto, full_check=True)
    if path is not None:
        write_file(path, lambda stream: stream.write(proto.SerializeToString()), overwrite)
    return proto


def _checked_opset(opset: Any) -> int:
    latest = onnx.defs.onnx_opset_version()
    if opset is None:
        return DEFAULT_OPSET
    opset = arguments.integer(opset, "opset", LEAST_OPSET)
    if opset > latest:
        raise ArgumentValueError(
            f"to_onnx: opset {opset} is outside the opsets it writes, {LEAST_OPSET} to {latest} (the installed "
            f"onnx's latest); the default is {DEFAULT_OPSET}"
        )
    return opset


class _Exporter:
    """Writes one model's graph (module docstring)."""

    def __init__(self, model: ImplicitModel, opset: int, tol: float, max_iter: int):
        self.model, self.tol, self.max_iter = model, tol, max_iter
        self.g = GraphWriter(model.dtype, opset)
        self.structure = model.structure
        self.states: dict[int, str] = {}  # block index -> the tensor of its states (N, size)
        self.inputs = Sources([])
        self.residuals: list[onnx.ValueInfoProto] = []

    def model_proto(self) -> onnx.ModelProto:
        from ..runtime.plan import block_dependency_graph, execution_order

        model, g = self.model, self.g
        _check_names(model)
        for spec in (*model.inputs, *model.outputs):
            g.reserve(spec.name)
        graph_inputs = self._read_inputs()
        dependencies = block_dependency_graph(model)
        components = execution_order(model)
        cyclic = sum(component.cyclic for component in components)
        for component in components:
            if component.cyclic:
                self._loop(component.blocks, dependencies, _residual_name(len(self.residuals), cyclic))
            else:
                self._block(component.blocks[0])
        graph_outputs = [self._output(spec, offset) for spec, offset in zip(model.outputs, _offsets(model.outputs))]
        graph = helper.make_graph(
            g.nodes, "implicit_model", graph_inputs, graph_outputs + self.residuals, initializer=g.initializers
        )
        graph.doc_string = (
            f"x = phi(A x + B u + b_x), y = C x + D u + b_y: n = {model.n}, {len(model.blocks)} blocks, "
            f"{cyclic} cyclic component(s)"
        )
        opsets = [helper.make_opsetid("", g.opset)]
        proto = helper.make_model(graph, opset_imports=opsets, producer_name="implicit_compiler")
        proto.producer_version = __version__
        proto.ir_version = helper.find_min_ir_version_for(opsets)
        if cyclic:
            settings = {"fixed_point_tolerance": repr(self.tol), "fixed_point_max_iter": str(self.max_iter)}
            helper.set_model_props(proto, settings)
        return proto

    # ----------------------------------------------------------------------------- inputs, outputs
    def _read_inputs(self) -> list[onnx.ValueInfoProto]:
        """Graph inputs (N, *shape), flattened to (N, size) as the columns of B and D."""
        model, g = self.model, self.g
        if not model.inputs:
            raise ShapeError("to_onnx: the model has no inputs, so its graph would have no batch size to follow")
        segments, infos = [], []
        for spec, offset in zip(model.inputs, _offsets(model.inputs)):
            infos.append(g.tensor_info(spec.name, ["N", *spec.shape]))
            flat = g.node("Flatten", [spec.name], f"{spec.name}/flat", axis=1)
            segments.append(Segment(offset, offset + spec.size, flat))
        shape = g.node("Shape", [segments[0].tensor], "shape")
        g.batch = g.node("Slice", [shape, g.integers([0], "zero"), g.integers([1], "one")], "batch")
        self.inputs = Sources(segments)
        return infos

    def _output(self, spec, offset: int) -> onnx.ValueInfoProto:
        """y rows offset:offset + size, reshaped to the output's (N, *shape)."""
        g, structure = self.g, self.structure
        rows = slice(offset, offset + spec.size)
        contributions = row_products(g, structure.C, rows, self._state_sources(), spec.name)
        contributions += row_products(g, structure.D, rows, self.inputs, spec.name)
        flat = total(g, contributions, spec.size, self.model.bias_y[rows], spec.shape, f"{spec.name}/flat")
        g.node_into("Reshape", [flat, g.integers([0, *spec.shape], "shape")], [spec.name])
        return g.tensor_info(spec.name, ["N", *spec.shape])

    def _state_sources(self, override: dict[int, str] | None = None, only: set[int] | None = None) -> Sources:
        """The blocks computed so far as sources of A's and C's columns (``override``: other
        tensors for some blocks; ``only``: just these blocks)."""
        states = {**self.states, **(override or {})}
        blocks = self.model.blocks
        return Sources(
            [Segment(blocks[i].start, blocks[i].stop, t) for i, t in states.items() if only is None or i in only]
        )

    # ----------------------------------------------------------------------------- blocks
    def _pre_activation(self, block: StateBlock, sources: Sources, fixed: str | None, with_inputs: bool) -> str:
        """z = A[block] x (the columns in ``sources``) [+ B[block] u + b_x[block]] [+ fixed]."""
        g, structure = self.g, self.structure
        contributions = row_products(g, structure.A, block.slice, sources, block.name)
        bias = None
        if with_inputs:
            contributions += row_products(g, structure.B, block.slice, self.inputs, block.name)
            bias = self.model.bias_x[block.slice]
        if fixed is not None:
            contributions.append(Contribution(0, block.size, fixed))
        return total(g, contributions, block.size, bias, block.shape, f"{block.name}/z")

    def _block(self, index: int) -> None:
        """Forward substitution: x_b = phi_b(A[b] x + B[b] u + b_x[b])."""
        block = self.model.blocks[index]
        z = self._pre_activation(block, self._state_sources(), None, with_inputs=True)
        self.states[index] = apply_activation(self.g, z, block.activation, block.name)

    def _loop(self, members: tuple[int, ...], dependencies, residual_name: str) -> None:
        """A cyclic component as a Loop of accelerated Gauss-Seidel sweeps (module docstring)."""
        from ..runtime.cyclic import torn_blocks

        model, g = self.model, self.g
        g.reserve(residual_name)
        blocks = sorted(members, key=lambda i: model.blocks[i].start)
        torn = torn_blocks(blocks, lambda i: set(dependencies.predecessors(i)))
        fixed = {
            i: self._pre_activation(model.blocks[i], self._state_sources(), None, with_inputs=True) for i in blocks
        }
        tol = g.constant(np.array(self.tol, dtype=model.dtype), "fixed_point_tolerance")
        max_iter = g.constant(np.array(self.max_iter, dtype=np.int64), "fixed_point_max_iter")
        name = {i: model.blocks[i].name for i in blocks}
        carried = {i: g.fresh(f"{name[i]}/previous") for i in blocks}  # x of the last iterate
        last_steps = {i: g.fresh(f"{name[i]}/last_step") for i in torn}  # f = G(x) - x of the last sweep
        last_sweeps = {i: g.fresh(f"{name[i]}/last_sweep") for i in torn}  # G(x) of the last sweep
        iteration, running = g.fresh("sweep"), g.fresh("running")
        last_residual = g.fresh(f"{residual_name}/last")
        with g.body() as body_nodes:
            swept = self._sweep(blocks, carried, fixed)
            steps = {i: g.node("Sub", [swept[i], carried[i]], f"{name[i]}/step") for i in torn}
            residual = self._residual([steps[i] for i in torn], [swept[i] for i in torn], residual_name)
            worst = g.reduce("ReduceMax", residual, None, f"{residual_name}/worst")
            going_on = g.node("Greater", [worst, tol], "going_on")
            mixing = self._mixing(iteration, going_on, residual, last_residual)
            following = self._anderson(torn, swept, steps, last_steps, last_sweeps, mixing, name)
        sizes = {i: [None, model.blocks[i].size] for i in blocks}
        body = helper.make_graph(
            body_nodes,
            g.fresh("sweeps"),
            [
                g.tensor_info(iteration, [], onnx.TensorProto.INT64),
                g.tensor_info(running, [], onnx.TensorProto.BOOL),
                *(g.tensor_info(carried[i], sizes[i]) for i in blocks),
                g.tensor_info(last_residual, [None]),
                *(g.tensor_info(last_steps[i], sizes[i]) for i in torn),
                *(g.tensor_info(last_sweeps[i], sizes[i]) for i in torn),
            ],
            [
                g.tensor_info(going_on, [], onnx.TensorProto.BOOL),
                *(g.tensor_info(following.get(i, swept[i]), sizes[i]) for i in blocks),
                g.tensor_info(residual, [None]),
                *(g.tensor_info(steps[i], sizes[i]) for i in torn),
                *(g.tensor_info(swept[i], sizes[i]) for i in torn),
            ],
        )
        # the torn states start at 0 (as the runtime's); the others are computed before they are
        # read, so any tensor of their shape starts them: F_k, made already
        start = {
            i: g.filled(0.0, model.blocks[i].size, hint=f"{name[i]}/start") if i in torn else fixed[i] for i in blocks
        }
        outputs = [g.fresh(name[i]) for i in blocks]
        history = [g.fresh(f"{name[i]}/{what}") for what in ("final_step", "final_sweep") for i in torn]
        g.node_into(
            "Loop",
            [max_iter, g.constant(np.array(True), "true"), *start.values(), g.filled(np.inf, hint="residual_start"),
             *(start[i] for i in torn), *(start[i] for i in torn)],
            [*outputs, residual_name, *history],
            name=g.fresh(f"fixed_point_loop/{name[blocks[0]]}"),
            body=body,
        )  # fmt: skip
        g.nodes[-1].doc_string = fixed_point_marks(
            [
                FixedPointState(name[i], model.blocks[i].shape, carried[i], swept[i], output)
                for i, output in zip(blocks, outputs)
            ],
            residual_name,
        )
        self.states.update(zip(blocks, outputs))
        doc = (
            f"relative residual of the last sweep of the cyclic blocks {', '.join(name.values())}"
            f" (per sample): converged when <= fixed_point_tolerance ({self.tol:g}) within fixed_point_max_iter "
            f"({self.max_iter}) sweeps"
        )
        self.residuals.append(helper.make_tensor_value_info(residual_name, g.elem_type, ["N"], doc_string=doc))

    def _sweep(self, blocks: list[int], carried: dict[int, str], fixed: dict[int, str]) -> dict[int, str]:
        """One Gauss-Seidel sweep: each block from F_k and the component's newest states."""
        g, model = self.g, self.model
        current = dict(carried)
        for i in blocks:
            block = model.blocks[i]
            sources = self._state_sources(current, only=set(blocks))
            z = self._pre_activation(block, sources, fixed[i], with_inputs=False)
            value = apply_activation(g, z, block.activation, block.name)
            # (a body output must be made in the body: an identity of a carried value gets a node)
            current[i] = g.node("Identity", [value], f"{value}/next") if value in carried.values() else value
        return current

    def _mixing(self, iteration: str, going_on: str, residual: str, last_residual: str) -> str:
        """Where a sample takes the accelerated step, (N,) bool: from the second sweep on,
        while its residual shrinks, and not on the sweep that ends the loop (converged, or the
        last one), whose plain sweep G(x) is the answer."""
        g = self.g
        later = g.node("Greater", [iteration, g.scalar(0, np.int64)], "later")
        before_last = g.node("Less", [iteration, g.scalar(self.max_iter - 1, np.int64)], "before_last")
        shrinking = g.node("Less", [residual, last_residual], "shrinking")
        going = g.node("And", [g.node("And", [later, before_last], "going"), going_on], "going")
        return g.node("And", [going, shrinking], "mixing")

    def _anderson(self, torn, swept, steps, last_steps, last_sweeps, mixing: str, name) -> dict[int, str]:
        """Anderson acceleration of memory 1 on the torn states, per sample: with f = G(x) - x
        and the differences df, dg of f and G(x) from the last sweep,
        gamma = <f, df> / <df, df> and x' = G(x) - gamma dg (x' = G(x) where not ``mixing``)."""
        g = self.g
        products, squares, changes = [], [], {}
        for i in torn:
            df = g.node("Sub", [steps[i], last_steps[i]], f"{name[i]}/df")
            changes[i] = g.node("Sub", [swept[i], last_sweeps[i]], f"{name[i]}/dg")
            products.append(g.reduce("ReduceSum", g.node("Mul", [steps[i], df], "f_df"), [1], "f_df"))
            squares.append(g.reduce("ReduceSum", g.node("Mul", [df, df], "df_df"), [1], "df_df"))
        product = products[0] if len(products) == 1 else g.node("Sum", products, "f_df")
        square = squares[0] if len(squares) == 1 else g.node("Sum", squares, "df_df")
        gamma = g.node(
            "Div", [product, g.node("Max", [square, g.scalar(float(np.finfo(g.dtype).tiny))], "df_df")], "gamma"
        )
        gamma = g.reshape(g.node("Where", [mixing, gamma, g.scalar(0.0)], "gamma"), (1,), "gamma")
        return {
            i: g.node("Sub", [swept[i], g.node("Mul", [gamma, changes[i]], "mix")], f"{name[i]}/next") for i in torn
        }

    def _residual(self, steps: list[str], sweeps: list[str], hint: str) -> str:
        """max |f|_inf / max(|G(x)|_inf, tiny) over the torn blocks, per sample (N,)."""
        g = self.g
        largest_step = [g.reduce("ReduceMax", g.node("Abs", [f], hint), [1], f"{hint}/step") for f in steps]
        largest = [g.reduce("ReduceMax", g.node("Abs", [value], hint), [1], f"{hint}/size") for value in sweeps]
        step = largest_step[0] if len(largest_step) == 1 else g.node("Max", largest_step, f"{hint}/step")
        size = g.node("Max", [*largest, g.scalar(float(np.finfo(g.dtype).tiny))], f"{hint}/size")
        return g.node("Div", [step, size], hint)


def _residual_name(index: int, count: int) -> str:
    return RESIDUAL_OUTPUT if count == 1 else f"{RESIDUAL_OUTPUT}_{index}"


def _offsets(specs) -> list[int]:
    return [int(v) for v in np.cumsum([0, *(spec.size for spec in specs)])[:-1]]


def _check_names(model: ImplicitModel) -> None:
    """Graph inputs and outputs keep the model's names: they must differ, and the residual
    outputs' names must be free."""
    names = [spec.name for spec in (*model.inputs, *model.outputs)]
    if len(set(names)) != len(names):
        raise ShapeError(f"to_onnx: an input and an output (or two of them) share a name: {names}")
    taken = [name for name in names if name.startswith(RESIDUAL_OUTPUT)]
    if taken:
        raise ShapeError(f"to_onnx: {taken[0]!r} is the name of the residual outputs of cyclic components; rename it")
    for spec in (*model.inputs, *model.outputs):
        if 0 in spec.shape:
            raise ShapeError(f"to_onnx: {spec.name!r} has an empty dimension {spec.shape}; nothing to export for it")
