"""RNN, GRU and LSTM lowerings against onnxruntime (float32) and the float64 reference.

onnxruntime has no kernels for layout=1 (batch-first): for those cases the float32 oracle is
onnxruntime on the equivalent layout-0 graph (Transpose nodes around the op). onnx.reference
implements neither the non-default activations, nor clip, input_forget or sequence_lens: for
those the float64 oracle is ``spec_recurrence``, a direct numpy transcription of the ONNX
operator spec written here, independent of the lowering.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_helpers import assert_matches_onnxruntime, random_inputs

import implicit_compiler as ic

GATES = {"RNN": 1, "GRU": 3, "LSTM": 4}
SEQ, INPUT, HIDDEN = 5, 3, 4


def recurrent_model(
    kind: str,
    direction: str = "forward",
    layout: int = 0,
    bias: bool = True,
    initial_h: bool = False,
    initial_c: bool = False,
    peepholes: bool = False,
    sequence_lens: list[int] | None = None,
    downstream: bool = False,
    opset: int = 14,
    seed: int = 0,
    **attributes,
) -> onnx.ModelProto:
    """One recurrent node with random constant weights; X is the only runtime input."""
    rng = np.random.default_rng(seed)
    gates, dirs = GATES[kind], 2 if direction == "bidirectional" else 1

    def constant(name, shape, scale=0.5):
        return numpy_helper.from_array((rng.normal(size=shape) * scale).astype(np.float32), name)

    initializers = [constant("W", (dirs, gates * HIDDEN, INPUT)), constant("R", (dirs, gates * HIDDEN, HIDDEN))]
    inputs = ["X", "W", "R"]
    inputs.append("B" if bias else "")
    if bias:
        initializers.append(constant("B", (dirs, 2 * gates * HIDDEN), 0.3))
    inputs.append("lens" if sequence_lens else "")
    if sequence_lens:
        initializers.append(numpy_helper.from_array(np.array(sequence_lens, dtype=np.int32), "lens"))
    state_shape = (dirs, 1, HIDDEN) if layout == 0 else (1, dirs, HIDDEN)
    for flag, name in ((initial_h, "h0"), (initial_c, "c0")):
        inputs.append(name if flag else "")
        if flag:
            initializers.append(constant(name, state_shape))
    if kind == "LSTM":
        inputs.append("P" if peepholes else "")
        if peepholes:
            initializers.append(constant("P", (dirs, 3 * HIDDEN)))
    while inputs[-1] == "":
        inputs.pop()
    outputs = ["Y", "Y_h"] + (["Y_c"] if kind == "LSTM" else [])
    node = helper.make_node(
        kind,
        inputs,
        outputs,
        hidden_size=HIDDEN,
        direction=direction,
        **({"layout": layout} if layout else {}),
        **attributes,
    )
    batch = "N" if not sequence_lens and not initial_h and not initial_c else 1
    x_shape = [SEQ, batch, INPUT] if layout == 0 else [batch, SEQ, INPUT]
    y_shape = [SEQ, dirs, batch, HIDDEN] if layout == 0 else [batch, SEQ, dirs, HIDDEN]
    h_shape = [dirs, batch, HIDDEN] if layout == 0 else [batch, dirs, HIDDEN]
    nodes = [node]
    graph_outputs = [helper.make_tensor_value_info("Y", TensorProto.FLOAT, y_shape)]
    graph_outputs += [helper.make_tensor_value_info(name, TensorProto.FLOAT, h_shape) for name in outputs[1:]]
    if downstream:  # Y_h feeds a linear layer
        initializers.append(constant("V", (dirs * HIDDEN, 2)))
        shape = numpy_helper.from_array(np.array([-1, dirs * HIDDEN], dtype=np.int64), "flat_shape")
        initializers.append(shape)
        nodes += [
            helper.make_node("Transpose", ["Y_h"], ["Y_h_t"], perm=[1, 0, 2]) if layout == 0 else
            helper.make_node("Identity", ["Y_h"], ["Y_h_t"]),
            helper.make_node("Reshape", ["Y_h_t", "flat_shape"], ["flat"]),
            helper.make_node("MatMul", ["flat", "V"], ["logits"]),
        ]  # fmt: skip
        graph_outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 2])]
    graph = helper.make_graph(
        nodes, "rnn", [helper.make_tensor_value_info("X", TensorProto.FLOAT, x_shape)], graph_outputs, initializers
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def as_layout0(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same network with the recurrent node in layout 0 between Transposes (onnxruntime can run it)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    node = next(n for n in graph.node if n.op_type in GATES)
    for attribute in node.attribute:
        if attribute.name == "layout":
            attribute.i = 0
    renamed = {name: f"{name}_seq_first" for name in node.output}
    node.input[0], original_x = "X_seq_first", node.input[0]
    extra = [helper.make_node("Transpose", [original_x], ["X_seq_first"], perm=[1, 0, 2])]
    for index, name in enumerate(node.output):
        perm = [2, 0, 1, 3] if index == 0 else [1, 0, 2]
        extra.append(helper.make_node("Transpose", [renamed[name]], [name], perm=perm))
        node.output[index] = renamed[name]
    for state_index in (5, 6):
        if len(node.input) > state_index and node.input[state_index]:
            state = node.input[state_index]
            extra.insert(0, helper.make_node("Transpose", [state], [f"{state}_seq_first"], perm=[1, 0, 2]))
            node.input[state_index] = f"{state}_seq_first"
    nodes = [
        *extra[: len(extra) - len(node.output)],
        node,
        *extra[len(extra) - len(node.output) :],
        *[n for n in graph.node if n is not node],
    ]
    del graph.node[:]
    graph.node.extend(nodes)
    return model


SPEC_ACTIVATIONS = {
    "Tanh": lambda z, a, b: np.tanh(z),
    "Sigmoid": lambda z, a, b: 1 / (1 + np.exp(-z)),
    "Relu": lambda z, a, b: np.maximum(z, 0),
    "LeakyRelu": lambda z, a, b: np.where(z >= 0, z, a * z),
    "Affine": lambda z, a, b: a * z + b,
    "ScaledTanh": lambda z, a, b: a * np.tanh(b * z),
    "HardSigmoid": lambda z, a, b: np.clip(a * z + b, 0, 1),
}
SPEC_DEFAULTS = {"LeakyRelu": (0.01, 0.0), "Affine": (1.0, 0.0), "ScaledTanh": (1.0, 1.0), "HardSigmoid": (0.2, 0.5)}


def spec_recurrence(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    """The ONNX RNN/GRU/LSTM spec in float64 numpy, for one sample of a layout-0 model (batch 1)."""
    node = next(n for n in model.graph.node if n.op_type in GATES)
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    constants = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    get = lambda i: constants[node.input[i]] if len(node.input) > i and node.input[i] else None  # noqa: E731
    kind, hidden = node.op_type, attributes["hidden_size"]
    gates, direction = GATES[kind], attributes.get("direction", b"forward").decode()
    dirs = 2 if direction == "bidirectional" else 1
    W, R = get(1), get(2)
    B = get(3) if get(3) is not None else np.zeros((dirs, 2 * gates * hidden))
    seq = x.shape[0]
    length = int(get(4)[0]) if get(4) is not None else seq
    h0 = get(5) if get(5) is not None else np.zeros((dirs, 1, hidden))
    c0 = get(6) if get(6) is not None else np.zeros((dirs, 1, hidden))
    P = get(7) if get(7) is not None else np.zeros((dirs, 3 * hidden))
    names = [n.decode() for n in attributes.get("activations", [])] or {
        "RNN": ["Tanh"], "GRU": ["Sigmoid", "Tanh"], "LSTM": ["Sigmoid", "Tanh", "Tanh"]
    }[kind] * dirs  # fmt: skip
    alphas, betas = list(attributes.get("activation_alpha", [])), list(attributes.get("activation_beta", []))
    functions = []
    for name in names:
        a, b = SPEC_DEFAULTS.get(name, (0.0, 0.0))
        if name in SPEC_DEFAULTS and alphas:
            a = alphas.pop(0)
        if name in ("Affine", "ScaledTanh", "HardSigmoid") and betas:
            b = betas.pop(0)
        clip = attributes.get("clip")
        functions.append(
            lambda z, f=SPEC_ACTIVATIONS[name], a=a, b=b, clip=clip: f(
                z if clip is None else np.clip(z, -clip, clip), a, b
            )
        )
    per_direction = len(functions) // dirs
    Y = np.zeros((seq, dirs, 1, hidden))
    Y_h, Y_c = np.zeros((dirs, 1, hidden)), np.zeros((dirs, 1, hidden))
    for d in range(dirs):
        f = functions[d * per_direction : (d + 1) * per_direction]
        Wb, Rb = B[d, : gates * hidden], B[d, gates * hidden :]
        h, c = h0[d, 0], c0[d, 0]
        reverse = direction == "reverse" or d == 1
        for t in range(length - 1, -1, -1) if reverse else range(length):
            xt = x[t, 0]
            if kind == "RNN":
                h = f[0](xt @ W[d].T + h @ R[d].T + Wb + Rb)
            elif kind == "GRU":
                Wz, Wr, Wh = np.split(W[d], 3)
                Rz, Rr, Rh = np.split(R[d], 3)
                Wbz, Wbr, Wbh = np.split(Wb, 3)
                Rbz, Rbr, Rbh = np.split(Rb, 3)
                z = f[0](xt @ Wz.T + h @ Rz.T + Wbz + Rbz)
                r = f[0](xt @ Wr.T + h @ Rr.T + Wbr + Rbr)
                if attributes.get("linear_before_reset", 0):
                    candidate = f[1](xt @ Wh.T + r * (h @ Rh.T + Rbh) + Wbh)
                else:
                    candidate = f[1](xt @ Wh.T + (r * h) @ Rh.T + Rbh + Wbh)
                h = (1 - z) * candidate + z * h
            else:
                Wi, Wo, Wf, Wc = np.split(W[d], 4)
                Ri, Ro, Rf, Rc = np.split(R[d], 4)
                bi, bo, bf, bc = np.split(Wb + Rb, 4)
                Pi, Po, Pf = np.split(P[d], 3)
                i = f[0](xt @ Wi.T + h @ Ri.T + Pi * c + bi)
                forget = 1 - i if attributes.get("input_forget", 0) else f[0](xt @ Wf.T + h @ Rf.T + Pf * c + bf)
                candidate = f[1](xt @ Wc.T + h @ Rc.T + bc)
                c = forget * c + i * candidate
                o = f[0](xt @ Wo.T + h @ Ro.T + Po * c + bo)
                h = o * f[2](c)
            Y[t, d, 0] = h
        Y_h[d, 0], Y_c[d, 0] = h, c
    return [Y, Y_h] + ([Y_c] if kind == "LSTM" else [])


def check(model: onnx.ModelProto, layout: int = 0, spec_oracle: bool = False) -> ic.ImplicitModel:
    """Our lowering against onnxruntime (on the layout-0 equivalent if needed) and, in float64,
    the reference (or the numpy spec where the reference lacks the feature)."""
    if spec_oracle:
        compiled = assert_matches_onnxruntime(model, batch=6, check_reference=False)
        feeds = random_inputs(model, batch=6, seed=1)
        predictions = compiled.predict(feeds)
        for index in range(6):
            expected = spec_recurrence(model, feeds["X"][index].reshape(SEQ, 1, INPUT))
            for spec, value in zip(compiled.outputs, expected):
                ours = predictions[spec.name][index] if isinstance(predictions, dict) else predictions[index]
                error = np.abs(ours.ravel() - value.ravel()).max() / np.abs(value).max()
                assert error <= 1e-9, f"{spec.name}: relative error {error:.2e} vs the numpy spec"
        return compiled
    if layout == 0:
        return assert_matches_onnxruntime(model, batch=6)
    feeds = random_inputs(model, batch=6)
    assert_matches_onnxruntime(as_layout0(model), feeds=feeds, check_reference=False)
    return assert_matches_onnxruntime(model, feeds=feeds, check_reference=True, check_onnxruntime=False)


DIRECTIONS = [
    (kind, direction, layout)
    for kind in GATES
    for direction in ("forward", "reverse", "bidirectional")
    for layout in (0, 1)
]


@pytest.mark.parametrize("kind,direction,layout", DIRECTIONS, ids=[f"{k}-{d}-layout{l}" for k, d, l in DIRECTIONS])
def test_directions_and_layouts(kind, direction, layout):
    compiled = check(recurrent_model(kind, direction=direction, layout=layout), layout)
    assert np.allclose(np.triu(compiled.A.toarray()), 0), "unrolled: strictly lower triangular"


VARIANTS = {
    "rnn-relu": ("RNN", dict(activations=["Relu"])),
    "rnn-leaky-relu": ("RNN", dict(activations=["LeakyRelu"], activation_alpha=[0.2])),
    "rnn-sigmoid-clip": ("RNN", dict(activations=["Sigmoid"], clip=0.6)),
    "rnn-no-bias": ("RNN", dict(bias=False)),
    "rnn-initial-state": ("RNN", dict(initial_h=True)),
    "rnn-bidirectional-two-activations": ("RNN", dict(direction="bidirectional", activations=["Tanh", "Relu"])),
    "rnn-affine": ("RNN", dict(activations=["Affine"], activation_alpha=[0.5], activation_beta=[0.1])),
    "gru-linear-before-reset": ("GRU", dict(linear_before_reset=1)),
    "gru-linear-before-reset-bidirectional": ("GRU", dict(linear_before_reset=1, direction="bidirectional")),
    "gru-activations": (
        "GRU",
        dict(activations=["HardSigmoid", "Relu"], activation_alpha=[0.3], activation_beta=[0.4]),
    ),
    "gru-clip": ("GRU", dict(clip=0.5)),
    "gru-initial-state-no-bias": ("GRU", dict(initial_h=True, bias=False)),
    "lstm-peepholes": ("LSTM", dict(peepholes=True)),
    "lstm-peepholes-bidirectional": ("LSTM", dict(peepholes=True, direction="bidirectional")),
    "lstm-input-forget": ("LSTM", dict(input_forget=1)),
    "lstm-initial-states": ("LSTM", dict(initial_h=True, initial_c=True)),
    "lstm-clip": ("LSTM", dict(clip=0.7)),
    "lstm-activations": (
        "LSTM",
        dict(
            activations=["HardSigmoid", "Tanh", "ScaledTanh"], activation_alpha=[0.25, 1.5], activation_beta=[0.5, 0.8]
        ),
    ),
    "lstm-leaky-relu-cell": ("LSTM", dict(activations=["Sigmoid", "LeakyRelu", "Tanh"], activation_alpha=[0.1])),
    "lstm-no-bias": ("LSTM", dict(bias=False)),
    "rnn-sequence-lens": ("RNN", dict(sequence_lens=[3])),
    "gru-sequence-lens-reverse": ("GRU", dict(sequence_lens=[2], direction="reverse")),
    "lstm-sequence-lens-bidirectional": ("LSTM", dict(sequence_lens=[4], direction="bidirectional")),
    "lstm-downstream": ("LSTM", dict(downstream=True, direction="bidirectional")),
    "gru-downstream": ("GRU", dict(downstream=True)),
    "rnn-opset7": ("RNN", dict(opset=7)),
    "lstm-opset7": ("LSTM", dict(opset=7)),
    "gru-opset7": ("GRU", dict(opset=7, linear_before_reset=1)),
}


# Features onnx.reference does not implement: checked in float64 against the numpy spec instead.
SPEC_ORACLE = {"activations", "clip", "input_forget", "sequence_lens"}


@pytest.mark.parametrize("kind,options", list(VARIANTS.values()), ids=list(VARIANTS))
def test_attribute_variants(kind, options):
    check(recurrent_model(kind, **options), spec_oracle=bool(SPEC_ORACLE & set(options)))


@pytest.mark.parametrize(
    "kind,options",
    [VARIANTS[k] for k in ("lstm-peepholes-bidirectional", "gru-linear-before-reset", "rnn-initial-state")],
    ids=["lstm", "gru", "rnn"],
)
def test_numpy_spec_oracle_agrees_with_the_reference(kind, options):
    """The numpy spec used above is itself checked against onnx.reference where both apply."""
    from onnx.reference import ReferenceEvaluator

    from implicit_compiler.frontend.graph import to_float64

    model = recurrent_model(kind, **options)
    x = np.random.default_rng(5).normal(size=(SEQ, 1, INPUT))
    expected = ReferenceEvaluator(to_float64(model)).run(None, {"X": x})
    for ours, reference in zip(spec_recurrence(model, x), expected):
        np.testing.assert_allclose(ours.ravel(), reference.ravel(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", list(GATES), ids=list(GATES))
def test_attribute_variants_batch_first(kind):
    options = dict(initial_h=True, peepholes=kind == "LSTM", initial_c=kind == "LSTM", direction="bidirectional")
    check(recurrent_model(kind, layout=1, **options), layout=1)


def test_lstm_gate_products_are_square_blocks():
    compiled = check(recurrent_model("LSTM"))
    names = [block.activation.name for block in compiled.blocks]
    assert names.count("square") == 2 * 2 * SEQ, "two products per step (f*C and i*c~ share a pair), each two squares"
    assert all(block.name.startswith("Y/forward/t") for block in compiled.blocks)


def test_variable_sequence_length_needs_input_shapes():
    model = recurrent_model("RNN")
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "S"
    with pytest.raises(ic.GraphError, match=r"dynamic dimension 'N' at axis 1.*input_shapes=\{'X': \(None, 8, 3\)\}"):
        ic.from_onnx(model)
    compiled = ic.from_onnx(model, input_shapes={"X": (SEQ, None, INPUT)})
    assert compiled.inputs[0].shape == (SEQ, INPUT)


@pytest.mark.parametrize("activation", ["Elu", "Softsign", "Softplus", "ThresholdedRelu"])
def test_inexact_activations_are_refused(activation):
    model = recurrent_model("RNN", activations=[activation])
    with pytest.raises(
        ic.UnsupportedAttributeError,
        match=rf"\(RNN, opset 14\): attribute activations=.*{activation} cannot be lowered exactly",
    ):
        ic.from_onnx(model)


def test_weights_as_runtime_inputs_are_refused():
    model = recurrent_model("GRU")
    weight = model.graph.initializer[1]
    model.graph.input.append(helper.make_tensor_value_info("R", TensorProto.FLOAT, list(weight.dims)))
    del model.graph.initializer[1]
    with pytest.raises(ic.GraphError, match=r"\(GRU, opset 14\): R \(input 2\) depends on the model input"):
        ic.from_onnx(model)
