"""Loop: the fixed-point Loops that ``to_onnx`` writes, read back as the fixed point they compute.

A cyclic component K of an implicit model is exported as a ``Loop`` of accelerated sweeps
(``export.onnx_export``): with F_k the part of block k's pre-activation fixed before the loop
(inputs, blocks solved before, bias), one sweep G is

    x_k' = G_k(x) = phi_k(F_k + sum_{j in K} A[k, j] x_j*)      for k in K, in order

(x_j* the new x_j' for j before k, the carried x_j otherwise), and the Loop's state outputs are
the x with x = G(x) (to its tolerance). The Loop is marked (``export.fixed_point_marks``: which
body inputs are the carried states, which body tensors are the sweep's results G_k, which
outputs the fixed point). Read back exactly:

    at the fixed point the carried x_k and the sweep's result G_k(x) are the same states, so
    each state k is one block X_k, reserved before its expression is known
    (``LoweringContext.reserve_block``: a forward reference); the sweep's part of the body is
    lowered with the carried x_k and, once computed, the tensor G_k both bound to X_k
    (x_j* = x_j at the fixed point: the Gauss-Seidel order of the sweep gives the same
    equations); G_k's rows become X_k's:

        X_k = phi_k(F_k + sum_j A[k, j] X_j)      (A cyclic: X_k reads itself and later blocks)

    When the node computing G_k made one block equal to G_k (an activation op: Relu, Tanh...),
    that block is X_k (``move_last_block_into``: the model's block, no copy); otherwise (an
    activation written as a formula of several ops, or none) X_k = G_k as an identity block
    reading the formula's blocks: the same fixed point, with more states.

Only the sweep's part of the body (the nodes from the carried states and outer-scope values to
the G_k) is lowered; the Anderson acceleration and the residual are how onnxruntime reaches
the fixed point, not what it is, and are not read. The residual output ("fixed_point_residual",
0 at the fixed point) is dropped from the model: ``predict`` reports non-convergence itself.
The iteration count, tolerance and cap of the file are not kept: the runtime solves the
model with its own.

A Loop without the marks (any other ONNX Loop) is refused (UnsupportedOpError); a marked Loop
whose body does not match its marks (an edited file) is a GraphError naming the node.
"""

from __future__ import annotations

import math

import onnx

from ...errors import GraphError, UnsupportedOpError
from ...export.fixed_point_marks import FixedPointMarks, read_fixed_point_marks
from ..context import LoweringContext, NodeView, Value, as_affine
from ..expression import Affine
from ..graph import node_reads, tensor_array, topological_nodes
from ..registry import lowers

FIRST_STATE_INPUT = 2  # body inputs: the iteration number, the condition, then the carried values


def fixed_point_marks(node: NodeView) -> FixedPointMarks:
    """The node's marks, checked against its body; UnsupportedOpError for a Loop without them,
    GraphError for marks its body does not match."""
    try:
        marks = read_fixed_point_marks(node.proto.doc_string)
    except ValueError as error:
        raise GraphError(f"{node.where}: the fixed-point marks in its doc_string are malformed: {error}") from None
    if marks is None:
        raise UnsupportedOpError(
            f"{node.where}: only the fixed-point Loops written by implicit_compiler's to_onnx are read (marked in "
            "the node's doc_string), and this Loop is not one. Unroll it (its iterations as plain nodes), or for a "
            "file to_onnx wrote whose marks were removed, export the model again"
        )
    body: onnx.GraphProto = node.attr("body")
    body_inputs = [value.name for value in body.input]
    for k, state in enumerate(marks.states):
        position = FIRST_STATE_INPUT + k
        if position >= len(body_inputs) or body_inputs[position] != state.carried:
            _mismatch(node, f"state {state.block!r}: {state.carried!r} is not body input {position}")
        if k >= len(node.proto.output) or node.proto.output[k] != state.output:
            _mismatch(node, f"state {state.block!r}: {state.output!r} is not the Loop's output {k}")
    if marks.residual not in node.proto.output[len(marks.states) :]:
        _mismatch(node, f"the residual {marks.residual!r} is no output of the Loop")
    sweeps = [state.sweep for state in marks.states]
    if len(set(sweeps)) != len(sweeps):
        _mismatch(node, "two states share one sweep tensor")
    _sweep_nodes(node, body, marks)
    producer = {output: n for n in body.node for output in n.output if output}
    for k, state in enumerate(marks.states):
        following = body.output[1 + k].name if 1 + k < len(body.output) else ""
        if not _is_sweep_step(following, state.sweep, producer):
            _mismatch(node, f"state {state.block!r}: the body's next value {following!r} is not its sweep's step")
    return marks


def _is_sweep_step(following: str, sweep: str, producer: dict[str, onnx.NodeProto]) -> bool:
    """Whether the state's next iterate (a body output) is its sweep G(x), or the accelerated
    step G(x) - gamma dg (a Sub whose first operand is G(x)), as to_onnx writes them."""
    if following == sweep:
        return True
    step = producer.get(following)
    return step is not None and step.op_type == "Sub" and step.input[0] == sweep


def _mismatch(node: NodeView, what: str) -> None:
    raise GraphError(
        f"{node.where}: its body does not match its fixed-point marks ({what}); the file was changed after "
        "to_onnx wrote it: export the model again"
    )


def _sweep_nodes(node: NodeView, body: onnx.GraphProto, marks: FixedPointMarks) -> list[onnx.NodeProto]:
    """The body's nodes that compute the sweep's results from the carried states (and outer-scope
    values), in order; the sweep may read no other body input (the acceleration's)."""
    ordered = topological_nodes(body)
    producer = {output: n for n in ordered for output in n.output if output}
    missing = [state.sweep for state in marks.states if state.sweep not in producer]
    if missing:
        _mismatch(node, f"no body node computes the sweep tensor {missing[0]!r}")
    states = {state.carried for state in marks.states}
    others = {value.name for value in body.input} - states
    needed, pending = set(), [state.sweep for state in marks.states]
    while pending:
        name = pending.pop()
        if name in others:
            _mismatch(node, f"the sweep reads the body input {name!r}, which is no state")
        if name in producer and id(producer[name]) not in needed:
            needed.add(id(producer[name]))
            pending.extend(node_reads(producer[name]))
    return [n for n in ordered if id(n) in needed]


def _check(node: NodeView) -> None:
    """Before lowering anything: the Loop is ours and matches its marks, and every node of its
    sweep has a lowering."""
    from ..lower import _lowering_for

    marks = fixed_point_marks(node)
    for index, proto in enumerate(_sweep_nodes(node, node.attr("body"), marks)):
        _lowering_for(NodeView(proto, node.opset, index))


@lowers("Loop", attributes=["body"], check=_check)
def loop(ctx: LoweringContext, node: NodeView, inputs: list[Value | None]) -> list[Value | None]:
    """Only the fixed-point Loops to_onnx writes (marked): their fixed point x = G(x), A cyclic; others refused.

    (module docstring)"""
    from ..lower import _lower_node

    marks = fixed_point_marks(node)
    body: onnx.GraphProto = node.attr("body")
    reserved, bound = {}, {}  # sweep tensor -> reserved block; body name -> value
    for k, state in enumerate(marks.states):
        start = inputs[FIRST_STATE_INPUT + k]
        shape = start.shape if isinstance(start, Affine) else tuple(start.shape)
        if math.prod(shape) != math.prod(state.shape) or (ctx.batched and shape[:1] != (1,)):
            _mismatch(node, f"state {state.block!r} of shape {state.shape} starts from a value of shape {shape}")
        index, states = ctx.reserve_block(shape, state.shape, state.block)
        reserved[state.sweep] = (index, states)
        bound[state.carried] = states
    bound.update({tensor.name: tensor_array(tensor) for tensor in body.initializer})
    sweep = _sweep_nodes(node, body, marks)
    last_use = {name: index for index, proto in enumerate(sweep) for name in proto.input}
    kept = {state.carried for state in marks.states} | set(reserved)
    loop_node = ctx.node
    try:
        for index, proto in enumerate(sweep):
            ctx.node = NodeView(proto, node.opset, index)
            blocks_before = len(ctx.blocks)
            values = _lower_node(ctx, ctx.node, [_read(name, bound, ctx, node) for name in proto.input])
            for name, value in zip(proto.output, values):
                bound[name] = value
                if name in reserved:
                    bound[name] = _fixed_point_block(ctx, node, name, value, *reserved[name], blocks_before)
            for name in set(proto.input) - kept:  # drop body values nothing reads any more: they can be large
                if last_use.get(name) == index:
                    bound.pop(name, None)
    finally:
        ctx.node = loop_node
    ctx.dropped_outputs.add(marks.residual)
    outputs = {state.output: bound[state.carried] for state in marks.states}
    return [outputs.get(name) for name in node.proto.output]


def _read(name: str, bound: dict[str, Value], ctx: LoweringContext, node: NodeView) -> Value | None:
    """A body node's operand: a body value, else the graph's value of that name (outer scope)."""
    if not name:
        return None
    if name in bound:
        return bound[name]
    if name in ctx.scope:
        return ctx.scope[name]
    raise GraphError(f"{node.where}: its body reads {name!r}, which nothing computes before the Loop")


def _fixed_point_block(
    ctx: LoweringContext, node: NodeView, name: str, value: Value, index: int, states: Affine, blocks_before: int
) -> Affine:
    """The sweep's result G_k as the reserved block X_k's rows (module docstring): the block the
    node made for it when that block is G_k, else X_k = G_k (an identity block). Returns X_k."""
    value = as_affine(value, ctx.width)  # (a constant: a block that reads nothing after all)
    if value.shape != states.shape:
        _mismatch(node, f"the sweep tensor {name!r} has shape {value.shape}, its state {states.shape}")
    if ctx.is_last_block(value, since=blocks_before):
        ctx.move_last_block_into(index)
    else:
        ctx.fill_block(index, value, "identity")
    return states
