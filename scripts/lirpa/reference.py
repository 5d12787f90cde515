"""auto_LiRPA 0.3 IBP and CROWN bounds of an ONNX network on l_inf boxes: the reference of issue 18.

    .venv-lirpa/bin/python scripts/lirpa/reference.py NET.onnx INPUTS.npy --eps 0.001 0.01
        [--methods IBP CROWN] [--dtype auto|float32|float64] [--repeat 3] [--threads 1]
        [--json out.json]

Runs only in the separate reference environment made by ``scripts/setup_lirpa`` (auto_LiRPA 0.3
pins torch < 1.13; ``shims`` lets it run on torch 2.13 and numpy 2); the package never imports
it. Steps:

1. The ONNX graph is rebuilt as a torch module from its own weights (``OnnxModule``: Gemm,
   MatMul, Add, Sub, Mul, Div, Relu, Sigmoid, Tanh, Conv, MaxPool, AveragePool, Flatten,
   Reshape, Constant), and checked against onnxruntime (float32) on every input: the max abs
   difference is printed and must be below ``--atol``.
2. For each eps and method, ``BoundedModule.compute_bounds`` (auto_LiRPA's default options) on
   the box |u - u0| <= eps (``PerturbationLpNorm(norm=inf, eps)``, no clipping to a valid pixel
   range: plain boxes), --batch inputs per call (default 1); time per input = the time of all
   calls / N, best of --repeat passes, with torch on --threads threads. Building the
   BoundedModule (tracing) is timed apart (build_s) and not included.

   Why one input per call by default: auto_LiRPA 0.3 does not bound the samples of a batch
   independently. Its CROWN computes intermediate bounds only for the neurons that IBP finds
   unstable in *some* sample of the batch (``get_unstable_locations`` merges the masks over
   the batch axis) and keeps IBP's bounds for the others, without intersecting the two. So a
   sample's bound depends on the other samples in its batch, either way: LeNet-5 CROWN at eps
   0.01 has mean width 6.64 one input per call and 5.33 with its 20 inputs in one call (the
   MaxPool relaxation gains from CROWN bounds on more neurons; slower per input too), the MNIST
   MLP 0.742 and 0.765 (a neuron IBP proves stable can get a looser CROWN bound that is not).
   With --batch 1 each input gets the bound auto_LiRPA gives it alone (the issue's figures).
3. Reported per eps and method: mean width (mean over inputs and outputs of upper - lower),
   time per input, the dtype used, and the bounds themselves (or the error, where auto_LiRPA
   fails); as JSON to stdout or --json
   (progress lines go to stderr).

Dtype: auto_LiRPA 0.3's MaxPool CROWN relaxation makes tensors in torch's default dtype
(``torch.zeros(shape)`` in operators/pooling.py) and fails on float64 inputs with "scatter():
Expected self.dtype to be equal to src.dtype" (the failure issue 18 reports), so ``bounds``
sets torch's default dtype to the dtype it computes in, and LeNet-5's CROWN runs in float64
(float32 gives the same widths to 5 digits: 0.244719 against 0.244722 at eps 0.001).
``--dtype auto`` (default) computes in float64 and falls back to float32 for a method that
still fails in float64; the result says which dtype each row used, and the error that forced
the fallback. auto_LiRPA's bounds are not rounded outward in either dtype.

Beyond the two nets of issue 18, of the VNN-COMP nets in tests/onnx-corpus it also runs
oval21's cifar_base_kw and verivital's Convnet_maxpool (IBP and CROWN), ACAS Xu (IBP only:
auto_LiRPA 0.3's CROWN takes its 4-D input normalization for a convolution's patches and
fails); the others need Pad or Transpose, or have no batch axis.

INPUTS.npy holds N samples: shape (N, *input shape without its batch axis), or anything of
N * (size of one sample) values (reshaped). Exit status 0, or 1 when the torch module disagrees
with onnxruntime.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import shims  # noqa: E402,F401,I001  (before auto_LiRPA: puts back what numpy 2 / torch 2.13 removed)

# auto_LiRPA 0.3 decorates functions with torch.jit.script (deprecated in torch 2) and sets
# warnings.simplefilter("once") on import: swallow what its import warns, keep our filters.
with warnings.catch_warnings(record=True):
    from auto_LiRPA import BoundedModule, BoundedTensor, PerturbationLpNorm


class OnnxModule(nn.Module):
    """A torch module that evaluates a single-input, single-output ONNX graph node by node.

    Weights (initializers and Constant nodes) become frozen parameters; each node becomes the torch call
    that auto_LiRPA traces to its own bounded op. Only the ops of plain feed-forward nets are
    supported (see ``OPS``); anything else raises NotImplementedError naming the node.
    """

    def __init__(self, model: onnx.ModelProto) -> None:
        super().__init__()
        graph = model.graph
        initializers = {t.name for t in graph.initializer}
        inputs = [i for i in graph.input if i.name not in initializers]
        if len(inputs) != 1 or len(graph.output) != 1:
            raise NotImplementedError(f"expected one input and one output, got {len(inputs)} and {len(graph.output)}")
        self.input_name, self.output_name = inputs[0].name, graph.output[0].name
        self._buffers_by_name: dict[str, str] = {}
        for tensor in graph.initializer:
            self._add_constant(tensor.name, numpy_helper.to_array(tensor))
        self.nodes = []
        for node in graph.node:
            attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            if node.op_type == "Constant":
                self._add_constant(node.output[0], numpy_helper.to_array(attributes["value"]))
                continue
            if node.op_type not in OPS:
                raise NotImplementedError(f"node {node.name!r}: op {node.op_type} has no torch equivalent here")
            inputs = list(node.input)
            if node.op_type == "Reshape":  # a constant shape, read now rather than traced
                attributes["shape"] = [int(v) for v in getattr(self, self._buffers_by_name[inputs[1]]).tolist()]
                inputs = inputs[:1]
            if node.op_type in ELEMENTWISE:
                inputs = [self._without_batch_axis(name) for name in inputs]
            self.nodes.append((node.op_type, inputs, node.output[0], attributes))

    def _without_batch_axis(self, name: str) -> str:
        """A constant operand of an elementwise op shaped (1, ...) (e.g. ACAS Xu's mean image,
        subtracted from its (N, 1, 1, 5) input) as the same constant without its leading 1:
        the same broadcast result against an operand that has the batch axis, and the shape
        auto_LiRPA's backward broadcasting expects of a constant. Other operands unchanged."""
        key = self._buffers_by_name.get(name)
        value = None if key is None else getattr(self, key)
        if value is None or value.dim() < 2 or value.shape[0] != 1:
            return name
        self._add_constant(name + "/no-batch-axis", value[0].detach().numpy())
        return name + "/no-batch-axis"

    def _add_constant(self, name: str, value: np.ndarray) -> None:
        """Float weights as frozen parameters (auto_LiRPA reads its dtype off the first
        parameter in places), anything else (shapes, indices) as a buffer."""
        key = f"c{len(self._buffers_by_name)}"
        self._buffers_by_name[name] = key
        tensor = torch.from_numpy(np.array(value))
        if tensor.is_floating_point():
            self.register_parameter(key, nn.Parameter(tensor, requires_grad=False))
        else:
            self.register_buffer(key, tensor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values = {self.input_name: x}

        def get(name: str):
            if name in values:
                return values[name]
            return getattr(self, self._buffers_by_name[name])

        for op, inputs, output, attributes in self.nodes:
            values[output] = OPS[op]([get(i) if i else None for i in inputs], attributes)
        return values[self.output_name]


def _gemm(args, attributes):
    a, b, c = (args + [None])[:3]
    alpha, beta = attributes.get("alpha", 1.0), attributes.get("beta", 1.0)
    if attributes.get("transA", 0):
        a = a.transpose(-1, -2)
    weight = b if attributes.get("transB", 0) else b.transpose(0, 1)
    if alpha == 1.0 and beta == 1.0:
        return F.linear(a, weight, c)  # traced as one Gemm: auto_LiRPA's BoundLinear
    out = alpha * F.linear(a, weight)
    return out if c is None else out + beta * c


def _symmetric_pads(attributes, op: str) -> list[int]:
    pads = list(attributes.get("pads", [0, 0, 0, 0]))
    half = len(pads) // 2
    if pads[:half] != pads[half:] or attributes.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise NotImplementedError(f"{op}: only explicit symmetric pads are supported, got {pads}")
    return pads[:half]


def _conv(args, attributes):
    x, w, b = (args + [None])[:3]
    return F.conv2d(
        x,
        w,
        b,
        stride=attributes.get("strides", 1),
        padding=_symmetric_pads(attributes, "Conv"),
        dilation=attributes.get("dilations", 1),
        groups=attributes.get("group", 1),
    )


def _max_pool(args, attributes):
    if attributes.get("dilations", [1, 1]) != [1, 1] or attributes.get("storage_order", 0):
        raise NotImplementedError("MaxPool: dilations and storage_order are not supported")
    return F.max_pool2d(
        args[0],
        attributes["kernel_shape"],
        stride=attributes.get("strides", 1),
        padding=_symmetric_pads(attributes, "MaxPool"),
        ceil_mode=bool(attributes.get("ceil_mode", 0)),
    )


def _average_pool(args, attributes):
    return F.avg_pool2d(
        args[0],
        attributes["kernel_shape"],
        stride=attributes.get("strides", 1),
        padding=_symmetric_pads(attributes, "AveragePool"),
        ceil_mode=bool(attributes.get("ceil_mode", 0)),
        count_include_pad=bool(attributes.get("count_include_pad", 0)),
    )


def _flatten(args, attributes):
    x, axis = args[0], attributes.get("axis", 1)
    return x.reshape(math.prod(x.shape[:axis]), -1) if axis != 1 else torch.flatten(x, 1)


def _reshape(args, attributes):
    x, shape = args[0], attributes["shape"]
    if not attributes.get("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


ELEMENTWISE = ("Add", "Sub", "Mul", "Div")
OPS = {
    "Gemm": _gemm,
    "MatMul": lambda args, _: torch.matmul(args[0], args[1]),
    "Add": lambda args, _: args[0] + args[1],
    "Sub": lambda args, _: args[0] - args[1],
    "Mul": lambda args, _: args[0] * args[1],
    "Div": lambda args, _: args[0] / args[1],
    "Relu": lambda args, _: F.relu(args[0]),
    "Sigmoid": lambda args, _: torch.sigmoid(args[0]),
    "Tanh": lambda args, _: torch.tanh(args[0]),
    "Conv": _conv,
    "MaxPool": _max_pool,
    "AveragePool": _average_pool,
    "Flatten": _flatten,
    "Reshape": _reshape,
}


def load_inputs(path: Path, model: onnx.ModelProto) -> np.ndarray:
    """The N samples of INPUTS.npy shaped (N, *sample shape) from the ONNX input's shape."""
    initializers = {t.name for t in model.graph.initializer}
    (spec,) = [i for i in model.graph.input if i.name not in initializers]
    dims = [d.dim_value for d in spec.type.tensor_type.shape.dim][1:]
    if any(d <= 0 for d in dims):
        raise NotImplementedError(f"input {spec.name!r}: dynamic dimensions other than the batch axis {dims}")
    array = np.load(path)
    size = math.prod(dims)
    if array.size % size:
        raise ValueError(f"{path}: {array.size} values are not a whole number of samples of shape {dims}")
    return array.reshape(-1, *dims)


def onnxruntime_outputs(path: Path, inputs: np.ndarray) -> np.ndarray:
    """onnxruntime's float32 outputs, one sample at a time (some nets fix their batch axis to 1)."""
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[None].astype(np.float32)})[0] for x in inputs])


def bounds(module: nn.Module, inputs: np.ndarray, eps: float, method: str, dtype, repeat: int, batch: int) -> dict:
    """auto_LiRPA's bounds on the boxes |u - u0| <= eps around each input, ``batch`` inputs per
    compute_bounds call (0: all in one call). Time per input: the best of ``repeat`` passes over
    all inputs, divided by their number; building the BoundedModules is timed apart."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # auto_LiRPA makes some tensors in it (MaxPool's CROWN)
    try:
        return _bounds(module.to(dtype), torch.from_numpy(inputs).to(dtype), eps, method, repeat, batch)
    finally:
        torch.set_default_dtype(previous)


def _bounds(module: nn.Module, x: torch.Tensor, eps: float, method: str, repeat: int, batch: int) -> dict:
    chunks = torch.split(x, batch if batch > 0 else len(x))
    bounded, build = {}, 0.0
    for chunk in chunks:
        if len(chunk) not in bounded:
            start = time.perf_counter()
            bounded[len(chunk)] = BoundedModule(module, torch.empty_like(chunk), device="cpu")
            build += time.perf_counter() - start
    times = []
    for _ in range(repeat):
        lowers, uppers, elapsed = [], [], 0.0
        for chunk in chunks:
            box = BoundedTensor(chunk, PerturbationLpNorm(norm=float("inf"), eps=eps))
            start = time.perf_counter()
            with torch.no_grad():
                lower, upper = bounded[len(chunk)].compute_bounds(x=(box,), method=method)
            elapsed += time.perf_counter() - start
            lowers.append(lower.detach().double())
            uppers.append(upper.detach().double())
        times.append(elapsed)
    lower, upper = torch.cat(lowers).numpy(), torch.cat(uppers).numpy()
    return {
        "mean_width": float((upper - lower).mean()),
        "time_per_input_s": min(times) / len(x),
        "times_s": times,
        "build_s": build,
        "batch": len(chunks[0]),
        "dtype": str(x.dtype).replace("torch.", ""),
        "lower": lower.tolist(),
        "upper": upper.tolist(),
    }


def bounds_with_fallback(module, inputs, eps, method, dtype_option, repeat, batch) -> dict:
    """``bounds`` in the requested dtype; with 'auto', float64 first and float32 when it fails.
    When auto_LiRPA fails in every dtype tried, the row is {"error": what it raised}."""
    dtypes = [torch.float64, torch.float32] if dtype_option == "auto" else [getattr(torch, dtype_option)]
    errors = {}
    for dtype in dtypes:
        try:
            result = bounds(module, inputs, eps, method, dtype, repeat, batch)
        except Exception as error:  # noqa: BLE001  (any failure inside auto_LiRPA)
            errors[str(dtype).replace("torch.", "")] = f"{type(error).__name__}: {_first_line(error)}"
            continue
        if errors:
            result["float64_error"] = errors["float64"]
        return result
    return {"error": "; ".join(f"{dtype}: {error}" for dtype, error in errors.items())}


def _first_line(error: Exception) -> str:
    return str(error).splitlines()[0] if str(error) else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("onnx", type=Path, help="the network (.onnx)")
    parser.add_argument("inputs", type=Path, help="the box centers (.npy), N samples")
    parser.add_argument("--eps", type=float, nargs="+", default=[0.001, 0.01], help="l_inf radii")
    parser.add_argument("--methods", nargs="+", default=["IBP", "CROWN"], help="auto_LiRPA methods")
    parser.add_argument("--dtype", choices=["auto", "float32", "float64"], default="auto")
    parser.add_argument("--batch", type=int, default=1, help="inputs per compute_bounds call (0: all; default 1)")
    parser.add_argument("--repeat", type=int, default=3, help="timed passes per row (the best counts)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--atol", type=float, default=1e-4, help="largest torch-onnxruntime difference allowed")
    parser.add_argument("--json", type=Path, help="write the results here instead of stdout")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    model = onnx.load(args.onnx)
    inputs = load_inputs(args.inputs, model)
    module = OnnxModule(model).eval()
    with torch.no_grad():
        ours = module.to(torch.float32)(torch.from_numpy(inputs.astype(np.float32))).numpy()
    reference = onnxruntime_outputs(args.onnx, inputs)
    difference = float(np.abs(ours - reference).max())
    print(
        f"{args.onnx.name}: torch module vs onnxruntime (float32), {len(inputs)} inputs: max abs diff {difference:.3g}",
        file=sys.stderr,
    )
    if not difference <= args.atol:
        print(f"the torch module disagrees with onnxruntime by more than --atol {args.atol}", file=sys.stderr)
        return 1

    rows = []
    for eps in args.eps:
        for method in args.methods:
            result = bounds_with_fallback(
                module, inputs.astype(np.float64), eps, method, args.dtype, args.repeat, args.batch
            )
            rows.append({"eps": eps, "method": method, **result})
            if "error" in result:
                print(f"  eps {eps:g} {method:>5}: failed ({result['error']})", file=sys.stderr)
                continue
            note = f" (float64 failed: {result['float64_error']})" if "float64_error" in result else ""
            print(
                f"  eps {eps:g} {method:>5}: mean width {result['mean_width']:.6g}, "
                f"{1e3 * result['time_per_input_s']:.3f} ms/input in {result['dtype']}{note}",
                file=sys.stderr,
            )
    output = {
        "onnx": str(args.onnx),
        "inputs": int(len(inputs)),
        "auto_lirpa": _version("auto_LiRPA"),
        "torch": torch.__version__,
        "threads": args.threads,
        "batching": (
            f"{args.batch or len(inputs)} input(s) per compute_bounds call; time per input = the time of all "
            f"calls / N, best of {args.repeat} passes; BoundedModule construction (tracing) excluded (build_s)"
        ),
        "onnxruntime_max_abs_diff": difference,
        "rows": rows,
    }
    text = json.dumps(output)
    if args.json is None:
        print(text)
    else:
        args.json.write_text(text)
    return 0


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    raise SystemExit(main())
