"""Benchmark: the sparse runtime against onnxruntime and torch eager on the zoo networks.

    from implicit_compiler.bench import run_benchmark, write_report
    report = run_benchmark(models=("lenet5",), batches=(1, 32), include_torch=False)
    print(report.format_table())
    write_report(report, "out/bench")            # bench.json and bench.md, never overwriting

All engines run in this one process, side by side, on the same float32 input:

* onnxruntime: float32, CPUExecutionProvider, default session options with
  ``intra_op_num_threads`` = every core this process may use;
* torch eager (optional; imported lazily): float32, ``torch.inference_mode()``, torch's default
  thread count; weights loaded from the ONNX initializers when every parameter name maps, else
  the module's own random weights (and the report says so);
* ours: ``from_onnx(path, dtype=float32).predict(u)`` on float32 input.

Each is timed as the median of at least ``repeats`` runs, after ``warmup`` runs, and for at least
``min_seconds`` in all, the engines taking turns over ``rounds`` rounds (``time_side_by_side``)
so that a slow spell of the machine falls on all of them. Before timing, ours is checked against
onnxruntime at batch 32 (``CorrectnessError`` when the max abs difference exceeds
``check_tolerance`` times the largest |onnxruntime| output). Per model the report also holds
the compile time (median of ``compile_runs`` fresh ``from_onnx`` calls), the model memory next to
the float32 + int32 CSR ideal (nnz x 8 bytes), and the peak RSS increase of one compile measured
in a child process that only imports and compiles, next to twice the model memory.

Every timing also records how much of the machine other processes (or hypervisor steal) took while
it ran (``Timing.other_load``, from /proc/stat); above ``BUSY_THRESHOLD`` it is flagged with a *
in the tables and listed in the notes, as it may be too slow.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ImplicitCompilerError, OverwriteError

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ZOO = ROOT / "zoo"
DEFAULT_MODELS = ("lenet5", "resnet20")
DEFAULT_BATCHES = (1, 32, 256)
CHECK_BATCH = 32
BUSY_THRESHOLD = 0.10  # other processes' share of all cores above which a timing is flagged
REPORT_FILES = ("bench.json", "bench.md")
# Torch definitions of the zoo models, used when zoo/zoo.json does not name one ("file.py:Class").
TORCH_SOURCES = {"lenet5": "lenet5.py:LeNet5", "resnet20": "resnet20.py:ResNet20"}
# ImageNet-size networks built by ``bench_models.resnet`` (depth, image size): not in the zoo
# (ResNet-50's weights alone are 100 MB), written once into the temporary folder.
GENERATED = {"resnet18_224": (18, 224), "resnet50_224": (50, 224)}


class CorrectnessError(ImplicitCompilerError, AssertionError):
    """Ours and onnxruntime disagree by more than the benchmark's tolerance."""


# --------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class Timing:
    """One engine at one batch size: wall-clock seconds per call of the whole batch."""

    engine: str  # "onnxruntime", "torch" or "ours"
    batch: int
    runs: int  # timed runs (warm-up excluded)
    median_seconds: float
    min_seconds: float
    max_seconds: float
    # Fraction of the machine's cores that OTHER processes kept busy (or the hypervisor took: steal
    # time) during the timed runs: busy + steal CPU time from /proc/stat minus this process's own;
    # None where /proc/stat is missing.
    # Above BUSY_THRESHOLD the timing is flagged as possibly slowed by other work.
    other_load: float | None = None

    @property
    def images_per_second(self) -> float:
        return self.batch / self.median_seconds

    @property
    def disturbed(self) -> bool:
        return self.other_load is not None and self.other_load > BUSY_THRESHOLD


@dataclass(frozen=True)
class BatchResult:
    """The engines side by side at one batch size."""

    batch: int
    onnxruntime: Timing
    ours: Timing
    torch: Timing | None  # None when torch is not run
    max_abs_diff: float  # ours vs onnxruntime on this batch's input (last timed outputs)

    @property
    def ratio(self) -> float:
        """ours / onnxruntime in images per second (> 1: ours is faster)."""
        return self.ours.images_per_second / self.onnxruntime.images_per_second


@dataclass(frozen=True)
class ModelResult:
    """One zoo model: sizes, compile time and memory, correctness, and the timings per batch."""

    name: str
    onnx_path: str
    input_shape: tuple[int, ...]  # per sample, without the batch axis
    n: int
    nnz: int  # A, B, C and D together
    nnz_A: int
    memory_bytes: int  # model.memory_bytes of the float32 model
    compile_seconds: float  # median of compile_runs
    compile_runs_seconds: tuple[float, ...]
    compile_peak_rss_increase_bytes: int | None  # None when the child process failed
    compile_peak_note: str
    check_batch: int
    check_max_abs_diff: float  # ours vs onnxruntime
    check_max_rel_diff: float  # ... divided by max |onnxruntime output|
    torch_weights: str  # "onnx", "random" or "not run"
    torch_parity_max_abs_diff: float | None  # torch vs onnxruntime at the check batch, with ONNX weights
    batches: tuple[BatchResult, ...]

    @property
    def ideal_bytes(self) -> int:
        """nnz x (4-byte float32 value + 4-byte int32 column index): the CSR ideal, index pointers aside."""
        return self.nnz * 8

    @property
    def memory_ratio(self) -> float:
        return self.memory_bytes / self.ideal_bytes

    @property
    def compile_peak_ratio(self) -> float | None:
        """Peak RSS increase of one compile / (2 x model memory)."""
        if self.compile_peak_rss_increase_bytes is None:
            return None
        return self.compile_peak_rss_increase_bytes / (2 * self.memory_bytes)


@dataclass(frozen=True)
class MachineInfo:
    cpu_model: str
    logical_cores: int  # os.cpu_count()
    usable_cores: int  # cores this process may run on (affinity)
    ram_bytes: int | None
    platform: str
    python: str
    versions: tuple[tuple[str, str], ...]  # (package, version), "not installed" where absent
    threads: tuple[tuple[str, str], ...]  # thread settings: engines and environment variables
    blas: str  # the BLAS numpy runs, its kernels, and the variables that choose them
    git: str  # commit (+ "dirty" and the changed paths' count), or "unknown"
    load_average_start: tuple[float, float, float] | None  # os.getloadavg() before the benchmark (1, 5, 15 min)
    load_average_end: tuple[float, float, float] | None  # ... and after it (includes the benchmark itself)


@dataclass(frozen=True)
class Settings:
    models: tuple[str, ...]
    batches: tuple[int, ...]
    repeats: int
    warmup: int
    min_seconds: float
    rounds: int
    compile_runs: int
    include_torch: bool
    check_tolerance: float
    seed: int


@dataclass(frozen=True)
class BenchReport:
    started: str  # ISO 8601, local time with offset
    finished: str
    seconds: float
    settings: Settings
    machine: MachineInfo
    models: tuple[ModelResult, ...]
    notes: tuple[str, ...]

    # ------------------------------------------------------------------------- exports
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; derived numbers (images/s, ratios) included."""
        machine = dataclasses.asdict(self.machine)
        machine["versions"] = dict(self.machine.versions)
        machine["threads"] = dict(self.machine.threads)
        models = []
        for model in self.models:
            entry = {
                field.name: getattr(model, field.name) for field in dataclasses.fields(model) if field.name != "batches"
            }
            entry["input_shape"] = list(model.input_shape)
            entry["compile_runs_seconds"] = list(model.compile_runs_seconds)
            entry["ideal_bytes"] = model.ideal_bytes
            entry["memory_ratio"] = model.memory_ratio
            entry["twice_memory_bytes"] = 2 * model.memory_bytes
            entry["compile_peak_ratio"] = model.compile_peak_ratio
            entry["batches"] = [
                {
                    "batch": b.batch,
                    "onnxruntime": _timing_dict(b.onnxruntime),
                    "torch": _timing_dict(b.torch) if b.torch else None,
                    "ours": _timing_dict(b.ours),
                    "ours_over_onnxruntime": b.ratio,
                    "max_abs_diff": b.max_abs_diff,
                }
                for b in model.batches
            ]
            models.append(entry)
        return {
            "started": self.started,
            "finished": self.finished,
            "seconds": self.seconds,
            "settings": dataclasses.asdict(self.settings),
            "machine": machine,
            "models": models,
            "notes": self.all_notes(),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def format_table(self) -> str:
        """A plain-text table for the terminal, then the per-model compile and memory lines."""
        header = ("model", "batch", "ORT img/s", "torch img/s", "ours img/s", "ours/ORT", "max|ours-ORT|")
        rows = [header]
        for model in self.models:
            for b in model.batches:
                rows.append(
                    (
                        model.name,
                        str(b.batch),
                        _rate(b.onnxruntime),
                        _rate(b.torch) if b.torch else "-",
                        _rate(b.ours),
                        f"{b.ratio:.3f}",
                        f"{b.max_abs_diff:.1e}",
                    )
                )
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = [
            "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
            for row in rows
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append("")
        for model in self.models:
            lines.extend(_model_lines(model))
        lines.append("")
        lines.extend(_machine_lines(self.machine))
        lines.extend(f"note: {note}" for note in self.all_notes())
        return "\n".join(lines) + "\n"

    def disturbed(self) -> list[str]:
        """'model batch engine (other load)' for every timing taken while other processes were busy."""
        return [
            f"{model.name} batch {b.batch} {timing.engine} ({timing.other_load:.0%})"
            for model in self.models
            for b in model.batches
            for timing in (b.onnxruntime, b.torch, b.ours)
            if timing is not None and timing.disturbed
        ]

    def all_notes(self) -> list[str]:
        """The run's notes, plus one on timings taken while other processes were busy."""
        notes = list(self.notes)
        if self.disturbed():
            notes.append(
                f"* other processes (or hypervisor steal) took more than {BUSY_THRESHOLD:.0%} of the machine's "
                f"cores during these measurements, which may be too slow: {', '.join(self.disturbed())}"
            )
        return notes

    def to_markdown(self) -> str:
        out = [
            "# implicit_compiler benchmark",
            "",
            f"Run {self.started} ({self.seconds:.0f} s). Median of at least {self.settings.repeats} runs and "
            f"{self.settings.min_seconds:g} s after {self.settings.warmup} warm-up runs, the engines taking turns "
            f"over {self.settings.rounds} rounds, each turn after {SETTLE_SECONDS:g} s of rest and one untimed run; "
            "images per second "
            "(higher is better); ours/ORT > 1 means ours is faster.",
            "",
            "| model | batch | ORT img/s | torch img/s | ours img/s | ours/ORT |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for model in self.models:
            for b in model.batches:
                torch_rate = _rate(b.torch) if b.torch else "-"
                out.append(
                    f"| {model.name} | {b.batch} | {_rate(b.onnxruntime)} | {torch_rate} | {_rate(b.ours)} "
                    f"| {b.ratio:.3f} |"
                )
        out.append("")
        for model in self.models:
            out.append(f"## {model.name}")
            out.append("")
            out.extend(f"- {line.strip().removeprefix(model.name + ': ')}" for line in _model_lines(model))
            out.append("")
        out.append("## Machine")
        out.append("")
        out.extend(f"- {line}" for line in _machine_lines(self.machine))
        if self.all_notes():
            out.append("")
            out.append("## Notes")
            out.append("")
            out.extend(f"- {note}" for note in self.all_notes())
        return "\n".join(out) + "\n"


def _timing_dict(timing: Timing) -> dict[str, Any]:
    return {**dataclasses.asdict(timing), "images_per_second": timing.images_per_second, "disturbed": timing.disturbed}


def _rate(timing: Timing) -> str:
    """Images per second, with a * where other processes were busy during the measurement."""
    rate = timing.images_per_second
    return (f"{rate:,.0f}" if rate >= 100 else f"{rate:,.2f}") + ("*" if timing.disturbed else "")


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _model_lines(model: ModelResult) -> list[str]:
    runs = ", ".join(f"{s:.2f}" for s in model.compile_runs_seconds)
    if model.compile_peak_rss_increase_bytes is None:
        peak = f"compile peak RSS increase: not measured ({model.compile_peak_note})"
    else:
        peak = (
            f"compile peak RSS increase {_mib(model.compile_peak_rss_increase_bytes)} vs 2 x model memory "
            f"{_mib(2 * model.memory_bytes)} (ratio {model.compile_peak_ratio:.2f}; {model.compile_peak_note})"
        )
    if model.torch_weights == "onnx":
        torch_line = (
            f"torch: weights loaded from the ONNX initializers; max |torch - ORT| at batch {model.check_batch} "
            f"{model.torch_parity_max_abs_diff:.1e}"
        )
    elif model.torch_weights == "random":
        torch_line = "torch: same architecture, NOT the same weights (random init; ONNX names did not map)"
    else:
        torch_line = "torch: not run"
    return [
        f"{model.name}: n = {model.n:,}, nnz = {model.nnz:,} (A {model.nnz_A:,}), input {model.input_shape}",
        f"  compile (float32) median {model.compile_seconds:.2f} s of {len(model.compile_runs_seconds)} ({runs} s)",
        f"  model memory {_mib(model.memory_bytes)} vs nnz x 8 B = {_mib(model.ideal_bytes)} "
        f"(float32 + int32 CSR ideal; ratio {model.memory_ratio:.2f})",
        f"  {peak}",
        f"  correctness at batch {model.check_batch}: max |ours - ORT| {model.check_max_abs_diff:.2e} "
        f"= {model.check_max_rel_diff:.2e} x max |ORT output|",
        f"  {torch_line}",
    ]


def _load(load: tuple[float, float, float] | None) -> str:
    return "unknown" if load is None else " ".join(f"{x:.2f}" for x in load)


def _machine_lines(machine: MachineInfo) -> list[str]:
    ram = _mib(machine.ram_bytes).replace("MiB", "MiB RAM") if machine.ram_bytes else "RAM unknown"
    return [
        f"machine: {machine.cpu_model}, {machine.logical_cores} logical cores ({machine.usable_cores} usable), {ram}",
        f"platform: {machine.platform}; Python {machine.python}",
        "versions: " + ", ".join(f"{k} {v}" for k, v in machine.versions),
        "threads: " + ", ".join(f"{k}={v}" for k, v in machine.threads),
        f"BLAS: {machine.blas}",
        f"git: {machine.git}",
        f"load average (1, 5, 15 min): {_load(machine.load_average_start)} before, "
        f"{_load(machine.load_average_end)} after (the latter includes this benchmark)",
    ]


# --------------------------------------------------------------------------------- timing
# Seconds of rest before each engine's turn (``time_side_by_side``).
SETTLE_SECONDS = 0.2


def time_side_by_side(
    functions: dict[str, Callable[[], Any]],
    *,
    batch: int,
    repeats: int,
    warmup: int,
    min_seconds: float,
    rounds: int = 1,
) -> dict[str, tuple[Timing, Any]]:
    """Time the engines by turns: after ``warmup`` runs of each, ``rounds`` rounds in which each
    engine in turn runs at least repeats / rounds times and min_seconds / rounds seconds. Each gets
    at least ``repeats`` runs and ``min_seconds`` in all; returns its Timing and last result.

    Taking turns makes a slow spell of the machine (seconds long on a shared VM) fall on every
    engine rather than on whichever ran then; a turn of several runs keeps one engine's idle
    threads (which spin briefly after a run) from running during the next engine's runs but the
    first. Before each turn the machine rests ``SETTLE_SECONDS``, so that no engine's turn
    starts beside the previous one's spinning threads: ResNet-18 at 224 x 224 and batch 1 took
    72 ms (median) right after an onnxruntime run and 50 ms after a pause (2 cores)
    (onnxruntime's intra-op threads spin after a run; OpenBLAS's for about 0.1 s). Then one
    untimed run wakes the engine's own threads: after the rest alone, every timed run of a
    one-run turn (``--quick``) started cold (the trained classifier at batch 16: 2.3 ms against
    0.8-1.0 ms warm)."""
    rounds = max(1, min(rounds, repeats))
    runs_per_turn, seconds_per_turn = -(-repeats // rounds), min_seconds / rounds
    results: dict[str, Any] = {}
    for engine, function in functions.items():
        for _ in range(warmup):
            results[engine] = function()
    times: dict[str, list[float]] = {engine: [] for engine in functions}
    wall = dict.fromkeys(functions, 0.0)
    other_seconds: dict[str, float | None] = dict.fromkeys(functions, 0.0)
    for _ in range(rounds):
        for engine, function in functions.items():
            time.sleep(SETTLE_SECONDS)
            results[engine] = function()  # (untimed: the engine's own threads awake again)
            busy_before, own_before = _system_busy_seconds(), _own_cpu_seconds()
            started, turn = time.perf_counter(), []
            while len(turn) < runs_per_turn or time.perf_counter() - started < seconds_per_turn:
                t0 = time.perf_counter()
                results[engine] = function()
                turn.append(time.perf_counter() - t0)
            wall[engine] += time.perf_counter() - started
            times[engine] += turn
            busy_after, own_after = _system_busy_seconds(), _own_cpu_seconds()
            if busy_before is None or busy_after is None or other_seconds[engine] is None:
                other_seconds[engine] = None
            else:
                other_seconds[engine] += (busy_after - busy_before) - (own_after - own_before)
    timings = {}
    for engine, runs in times.items():
        other = other_seconds[engine]
        if other is not None and wall[engine] > 0:
            other = round(min(max(other / (wall[engine] * (os.cpu_count() or 1)), 0.0), 1.0), 3)
        timing = Timing(engine, batch, len(runs), statistics.median(runs), min(runs), max(runs), other)
        timings[engine] = (timing, results[engine])
    return timings


def _system_busy_seconds() -> float | None:
    """CPU seconds spent busy (user, nice, system, irq, softirq) or stolen by the hypervisor, from /proc/stat."""
    try:
        with open("/proc/stat") as stat:
            fields = stat.readline().split()
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


# --------------------------------------------------------------------------------- machine
def _cpu_model() -> str:
    """/proc/cpuinfo's model name, with family/model/stepping (VMs often show a generic name)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, sep, value = line.partition(":")
            key = key.strip().lower()
            if not sep:
                if fields:
                    break  # the first processor's entry is enough
                continue
            fields.setdefault(key, value.strip())
    except OSError:
        pass
    name = fields.get("model name") or fields.get("hardware") or platform.processor() or platform.machine()
    labels = (("cpu family", "family"), ("model", "model"), ("stepping", "stepping"))
    detail = ", ".join(f"{label} {fields[key]}" for key, label in labels if key in fields)
    return f"{name or 'unknown'} ({detail})" if detail else name or "unknown"


def _ram_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _version(module: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(module)
    except metadata.PackageNotFoundError:
        return "not installed"


def _git_state() -> str:
    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return "unknown"
        status = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        changed = [line for line in status.stdout.splitlines() if line.strip()]
        return commit.stdout.strip() + (f" + {len(changed)} modified tracked file(s)" if changed else " (clean)")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _load_average() -> tuple[float, float, float] | None:
    try:
        return tuple(round(x, 2) for x in os.getloadavg())  # type: ignore[return-value]
    except (AttributeError, OSError):
        return None


def _blas() -> str:
    """numpy's BLAS and the kernels it picked (threadpoolctl), with OPENBLAS_CORETYPE and
    OPENBLAS_L2_SIZE: a machine may set them to older kernels (Haswell's here, half the speed of
    the SkylakeX kernels OpenBLAS picks by itself on the convolutions' GEMMs)."""
    variables = ", ".join(f"{var}={os.environ.get(var, 'unset')}" for var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"))
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return f"unknown (threadpoolctl not installed); {variables}"
    found = [info for info in threadpool_info() if info.get("user_api") == "blas"]
    described = "; ".join(
        f"{info.get('internal_api')} {info.get('version')}, {info.get('architecture', 'unknown')} kernels"
        for info in found
    )
    return f"{described or 'none loaded'}; {variables}"


def machine_info(
    ort_threads: int,
    torch_module: Any | None,
    load_average_start: tuple[float, float, float] | None = None,
) -> MachineInfo:
    """The machine, versions and thread settings; call it after the runs (numba's threads are known then)."""
    from . import __version__

    versions = [("implicit_compiler", __version__)]
    versions += [(name, _version(name)) for name in ("numpy", "scipy", "numba", "onnx", "onnxruntime")]
    versions.append(("torch", torch_module.__version__ if torch_module is not None else "not used"))
    threads = [("onnxruntime intra_op_num_threads", str(ort_threads))]
    if torch_module is not None:
        threads.append(("torch.get_num_threads()", str(torch_module.get_num_threads())))
        threads.append(("torch.get_num_interop_threads()", str(torch_module.get_num_interop_threads())))
    numba = sys.modules.get("numba")  # only if the runtime imported it: never imported here
    if numba is not None:
        threads.append(("numba.get_num_threads()", str(numba.get_num_threads())))
        try:
            threads.append(("numba.threading_layer()", str(numba.threading_layer())))
        except Exception:  # ValueError until a parallel function has run
            threads.append(("numba.threading_layer()", "not initialised"))
    threads += [
        (var, os.environ.get(var, "unset"))
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS")
    ]
    return MachineInfo(
        cpu_model=_cpu_model(),
        logical_cores=os.cpu_count() or 1,
        usable_cores=usable_cores(),
        ram_bytes=_ram_bytes(),
        platform=platform.platform(),
        python=platform.python_version(),
        versions=tuple(versions),
        threads=tuple(threads),
        blas=_blas(),
        git=_git_state(),
        load_average_start=load_average_start,
        load_average_end=_load_average(),
    )


# --------------------------------------------------------------------------------- engines
def _onnx_input(path: Path) -> tuple[str, tuple[int, ...], str]:
    """The single input's name and per-sample shape, and the single output's name."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    initializers = {init.name for init in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in initializers]
    if len(inputs) != 1 or len(proto.graph.output) != 1:
        raise ValueError(f"{path.name}: the benchmark needs one input and one output, got {len(inputs)} and "
                         f"{len(proto.graph.output)}")  # fmt: skip
    dims = inputs[0].type.tensor_type.shape.dim
    shape = []
    for index, dim in enumerate(dims[1:], start=1):
        if not dim.HasField("dim_value"):
            raise ValueError(f"{path.name}: input {inputs[0].name!r} has a dynamic dimension {index} besides the batch")
        shape.append(dim.dim_value)
    return inputs[0].name, tuple(shape), proto.graph.output[0].name


def _ort_session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def _import_torch() -> tuple[Any | None, str]:
    try:
        import torch
    except Exception as error:  # ImportError, or a broken install raising something else
        return None, f"torch is not importable ({type(error).__name__}: {error}); the torch column is skipped"
    return torch, ""


def _torch_source(name: str, zoo: Path) -> str | None:
    try:
        entry = json.loads((zoo / "zoo.json").read_text())["models"][name]["source"]
        return entry.removeprefix("zoo/")
    except (OSError, ValueError, KeyError, TypeError):
        return TORCH_SOURCES.get(name)


def _torch_module(name: str, path: Path, zoo: Path, torch: Any) -> tuple[Any | None, str, str]:
    """(module in eval mode, "onnx" | "random", a note) or (None, "not run", why)."""
    source = _torch_source(name, zoo)
    if source is None or ":" not in source:
        return None, "not run", f"{name}: no torch definition known; torch column skipped"
    file_name, class_name = source.split(":", 1)
    spec = importlib.util.spec_from_file_location(f"_bench_zoo_{name}", zoo / file_name)
    if spec is None or spec.loader is None or not (zoo / file_name).exists():
        return None, "not run", f"{name}: {zoo / file_name} not found; torch column skipped"
    module_code = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module_code)
    torch.manual_seed(0)
    module = getattr(module_code, class_name)().eval()

    import onnx
    from onnx import numpy_helper

    initializers = {
        init.name: numpy_helper.to_array(init)
        for init in onnx.load(str(path), load_external_data=False).graph.initializer
    }
    state = module.state_dict()
    loaded, missing = {}, []
    for key, tensor in state.items():
        if key.endswith("num_batches_tracked"):
            loaded[key] = tensor
        elif key in initializers and tuple(initializers[key].shape) == tuple(tensor.shape):
            loaded[key] = torch.from_numpy(np.array(initializers[key], dtype=np.float32))
        else:
            missing.append(key)
    if missing:
        note = (
            f"{name}: torch timings are for the same architecture, NOT the same weights ({len(missing)} of "
            f"{len(state)} parameters have no ONNX initializer of that name and shape, e.g. {missing[0]!r})"
        )
        return module, "random", note
    module.load_state_dict(loaded, strict=True)
    return module, "onnx", ""


# --------------------------------------------------------------------------------- compile memory
_CHILD = r"""
import json, resource, sys
sys.path.insert(0, sys.argv[1])
import numpy as np
import implicit_compiler
from implicit_compiler.frontend import from_onnx

def status(key):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None

def peak():
    hwm = status("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

before = peak()
model = from_onnx(sys.argv[2], dtype=np.float32)
after = peak()
print(json.dumps({"before": before, "after": after, "memory_bytes": model.memory_bytes,
                  "source": "VmHWM" if status("VmHWM") is not None else "ru_maxrss"}))
"""


def compile_peak_memory(path: Path, timeout: float = 1800) -> tuple[int | None, str]:
    """Peak RSS increase of one float32 ``from_onnx`` in a child process that only imports and compiles."""
    try:
        child = subprocess.run(
            [sys.executable, "-c", _CHILD, str(ROOT), str(path)], capture_output=True, text=True, timeout=timeout
        )
    except (OSError, subprocess.SubprocessError) as error:
        return None, f"child process failed: {error}"
    if child.returncode != 0:
        last = (child.stderr.strip().splitlines() or ["no output"])[-1]
        return None, f"child process exited {child.returncode}: {last}"
    data = json.loads(child.stdout.strip().splitlines()[-1])
    return data["after"] - data["before"], f"peak {data['source']} after compile minus after imports, child process"


# --------------------------------------------------------------------------------- benchmark
def _resolve_model(name: str, zoo: Path) -> Path:
    """zoo/<name>.onnx, or for an ImageNet-size network (``GENERATED``) the file built by
    ``bench_models.resnet`` into the temporary folder (once; seeded, so always the same)."""
    if name in GENERATED:
        return _generated_model(name)
    path = zoo / f"{name}.onnx"
    if not path.exists():
        known = sorted(p.stem for p in zoo.glob("*.onnx")) if zoo.is_dir() else []
        raise ValueError(
            f"unknown model {name!r}: {path} not found (zoo models: {', '.join(known) or 'none'}; "
            f"generated: {', '.join(GENERATED)})"
        )
    return path


def _generated_model(name: str) -> Path:
    import tempfile

    import onnx

    from .bench_models import resnet

    depth, size = GENERATED[name]
    folder = Path(tempfile.gettempdir()) / "implicit_compiler_bench"
    path = folder / f"{name}.onnx"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        partial = folder / f"{name}.{os.getpid()}.partial"
        onnx.save(resnet(depth, size), str(partial))
        os.replace(partial, path)  # (a concurrent run writes the same bytes)
    return path


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))))


def run_benchmark(
    models: Sequence[str] = DEFAULT_MODELS,
    batches: Sequence[int] = DEFAULT_BATCHES,
    repeats: int = 5,
    warmup: int = 2,
    min_seconds: float = 1.0,
    include_torch: bool = True,
    *,
    rounds: int = 5,
    compile_runs: int = 3,
    check_tolerance: float = 1e-3,
    measure_compile_memory: bool = True,
    seed: int = 0,
    zoo: str | os.PathLike | None = None,
    progress: Callable[[str], None] | None = None,
) -> BenchReport:
    """Benchmark onnxruntime, torch eager and ours on zoo models; see the module docstring.

    Raises:
        ValueError: an unknown model, a batch size < 1, repeats < 1.
        CorrectnessError: ours disagrees with onnxruntime at batch 32 by more than
            ``check_tolerance`` x max |onnxruntime output| (raised before that model is timed).
    """
    zoo_dir = Path(zoo) if zoo is not None else DEFAULT_ZOO
    models = tuple(models)
    batches = tuple(int(b) for b in batches)
    if not models:
        raise ValueError("no models to benchmark")
    if not batches or min(batches) < 1:
        raise ValueError(f"batch sizes must be positive integers, got {batches}")
    if repeats < 1 or rounds < 1 or warmup < 0 or min_seconds < 0 or compile_runs < 1:
        raise ValueError("repeats, rounds and compile_runs must be >= 1, warmup and min_seconds >= 0")
    paths = {name: _resolve_model(name, zoo_dir) for name in models}
    say = progress or (lambda message: None)
    notes: list[str] = []
    started_wall, started = datetime.datetime.now().astimezone(), time.perf_counter()

    torch = None
    if include_torch:
        torch, why = _import_torch()
        if torch is None:
            notes.append(why)
    else:
        notes.append("torch not run (--no-torch)")
    threads = usable_cores()
    load_average_start = _load_average()
    rounds = min(rounds, repeats)  # as time_side_by_side runs them
    settings = Settings(models, batches, repeats, warmup, min_seconds, rounds, compile_runs, torch is not None,
                        check_tolerance, seed)  # fmt: skip
    timing = dict(repeats=repeats, warmup=warmup, min_seconds=min_seconds, rounds=rounds)

    results = []
    for name in models:
        results.append(
            _bench_model(
                name,
                paths[name],
                zoo_dir,
                batches,
                torch,
                threads,
                compile_runs,
                measure_compile_memory,
                check_tolerance,
                seed,
                timing,
                notes,
                say,
            )
        )

    machine = machine_info(threads, torch, load_average_start)
    return BenchReport(
        started=started_wall.isoformat(timespec="seconds"),
        finished=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        seconds=time.perf_counter() - started,
        settings=settings,
        machine=machine,
        models=tuple(results),
        notes=tuple(notes),
    )


def _bench_model(
    name: str,
    path: Path,
    zoo_dir: Path,
    batches: tuple[int, ...],
    torch: Any | None,
    threads: int,
    compile_runs: int,
    measure_compile_memory: bool,
    check_tolerance: float,
    seed: int,
    timing: dict[str, Any],
    notes: list[str],
    say: Callable[[str], None],
) -> ModelResult:
    """Compile, measure memory, check, then time every engine at every batch size for one model."""
    from .frontend import from_onnx

    input_name, input_shape, output_name = _onnx_input(path)
    say(f"{name}: compiling x{compile_runs} (float32)")
    compile_times, model = [], None
    for _ in range(compile_runs):
        model = None  # free the previous one first
        t0 = time.perf_counter()
        model = from_onnx(path, dtype=np.float32)
        compile_times.append(time.perf_counter() - t0)
    assert model is not None
    if measure_compile_memory:
        say(f"{name}: compile peak memory (child process)")
        peak, peak_note = compile_peak_memory(path)
    else:
        peak, peak_note = None, "skipped"
    session = _ort_session(path, threads)

    def run_ort(u: np.ndarray) -> np.ndarray:
        return session.run([output_name], {input_name: u})[0]

    u_check = np.random.default_rng(seed).standard_normal((CHECK_BATCH, *input_shape)).astype(np.float32)
    y_ort = run_ort(u_check)
    y_ours = np.asarray(model.predict(u_check)).reshape(y_ort.shape)
    check_abs = _max_abs(y_ours, y_ort)
    scale = max(float(np.max(np.abs(y_ort))), float(np.finfo(np.float32).tiny))
    check_rel = check_abs / scale
    say(f"{name}: max |ours - ORT| at batch {CHECK_BATCH} = {check_abs:.2e} (relative {check_rel:.2e})")
    if not check_rel <= check_tolerance:  # NaN fails too
        raise CorrectnessError(
            f"{name}: ours and onnxruntime disagree at batch {CHECK_BATCH}: max abs difference {check_abs:.3e} "
            f"is {check_rel:.3e} of max |onnxruntime| {scale:.3e}, above the tolerance {check_tolerance:g}"
        )

    torch_module, torch_weights, parity = None, "not run", None
    if torch is not None:
        torch_module, torch_weights, note = _torch_module(name, path, zoo_dir, torch)
        if note:
            notes.append(note)
        if torch_module is not None and torch_weights == "onnx":
            with torch.inference_mode():
                y_torch = torch_module(torch.from_numpy(u_check)).numpy()
            parity = _max_abs(y_torch, y_ort)
            say(f"{name}: max |torch - ORT| at batch {CHECK_BATCH} = {parity:.2e}")

    def run_torch(tu: Any) -> Any:
        with torch.inference_mode():
            return torch_module(tu)

    batch_results = []
    for batch in batches:
        u = np.random.default_rng([seed, batch]).standard_normal((batch, *input_shape)).astype(np.float32)
        functions = {"onnxruntime": lambda u=u: run_ort(u)}
        if torch_module is not None:
            tu = torch.from_numpy(u)
            functions["torch"] = lambda tu=tu: run_torch(tu)
        functions["ours"] = lambda u=u: model.predict(u)
        timed = time_side_by_side(functions, batch=batch, **timing)
        (ort_timing, y_ort), (ours_timing, y_ours) = timed["onnxruntime"], timed["ours"]
        torch_timing = timed["torch"][0] if "torch" in timed else None
        diff = _max_abs(np.asarray(y_ours).reshape(y_ort.shape), y_ort)
        result = BatchResult(batch, ort_timing, ours_timing, torch_timing, diff)
        batch_results.append(result)
        torch_text = f", torch {_rate(torch_timing)}" if torch_timing else ""
        say(f"{name} batch {batch}: ORT {_rate(ort_timing)}{torch_text}, ours {_rate(ours_timing)} img/s "
            f"(ours/ORT {result.ratio:.3f}, max |ours - ORT| {diff:.1e})")  # fmt: skip

    return ModelResult(
        name=name,
        onnx_path=str(path),
        input_shape=input_shape,
        n=model.n,
        nnz=model.nnz,
        nnz_A=model.structure.A.nnz,
        memory_bytes=model.memory_bytes,
        compile_seconds=statistics.median(compile_times),
        compile_runs_seconds=tuple(compile_times),
        compile_peak_rss_increase_bytes=peak,
        compile_peak_note=peak_note,
        check_batch=CHECK_BATCH,
        check_max_abs_diff=check_abs,
        check_max_rel_diff=check_rel,
        torch_weights=torch_weights,
        torch_parity_max_abs_diff=parity,
        batches=tuple(batch_results),
    )


# --------------------------------------------------------------------------------- output
def check_writable(out_dir: str | os.PathLike, overwrite: bool = False) -> None:
    """Raise OverwriteError if bench.json or bench.md exists in out_dir (unless overwrite)."""
    for name in REPORT_FILES:
        path = Path(out_dir) / name
        if path.exists() and not overwrite:
            raise OverwriteError(f"{path} exists; pass --overwrite to replace it")


def write_report(report: BenchReport, out_dir: str | os.PathLike, overwrite: bool = False) -> tuple[Path, Path]:
    """Write bench.json and bench.md into out_dir (created if needed); refuse to replace files unless asked."""
    check_writable(out_dir, overwrite)
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    json_path, md_path = (folder / name for name in REPORT_FILES)
    json_path.write_text(report.to_json())
    md_path.write_text(report.to_markdown())
    return json_path, md_path
