"""The benchmark through the CLI: quick mode, LeNet-5 only, no torch (about 10 s in all)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from implicit_compiler import bench

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["bench", "--models", "lenet5", "--batches", "1", "4", "--quick", "--no-torch", "--rounds", "2"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "implicit_compiler.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("bench")
    return run_cli(*ARGS, "--out", str(out)), out


def test_bench_writes_json_and_markdown(bench_run):
    result, out = bench_run
    assert result.returncode == 0, result.stderr
    assert "ours/ORT" in result.stdout and "lenet5" in result.stdout

    report = json.loads((out / "bench.json").read_text())
    assert {"started", "finished", "seconds", "settings", "machine", "models", "notes"} <= report.keys()
    machine = report["machine"]
    assert machine["cpu_model"] and machine["logical_cores"] >= 1 and machine["usable_cores"] >= 1
    assert {"numpy", "scipy", "numba", "onnxruntime", "torch"} <= machine["versions"].keys()
    assert "onnxruntime intra_op_num_threads" in machine["threads"]
    assert report["settings"]["batches"] == [1, 4] and report["settings"]["include_torch"] is False
    assert report["settings"]["rounds"] == 2 and "taking turns over 2 rounds" in (out / "bench.md").read_text()
    assert any("torch" in note for note in report["notes"])

    (model,) = report["models"]
    assert model["name"] == "lenet5"
    for key in ("n", "nnz", "nnz_A", "memory_bytes", "ideal_bytes", "memory_ratio", "compile_seconds"):
        assert model[key] > 0, key
    assert model["ideal_bytes"] == 8 * model["nnz"]
    assert model["twice_memory_bytes"] == 2 * model["memory_bytes"]
    assert model["compile_peak_rss_increase_bytes"] is None or model["compile_peak_rss_increase_bytes"] > 0
    assert model["torch_weights"] == "not run"

    assert [b["batch"] for b in model["batches"]] == [1, 4]
    for entry in model["batches"]:
        assert entry["torch"] is None
        for engine in ("onnxruntime", "ours"):
            timing = entry[engine]
            assert timing["runs"] >= 2 and timing["median_seconds"] > 0 and timing["images_per_second"] > 0
            assert "other_load" in timing and "disturbed" in timing
        assert entry["ours_over_onnxruntime"] > 0
        assert entry["max_abs_diff"] < 1e-3

    markdown = (out / "bench.md").read_text()
    assert "| model | batch | ORT img/s | torch img/s | ours img/s | ours/ORT |" in markdown
    assert "| lenet5 | 1 |" in markdown and "| lenet5 | 4 |" in markdown
    assert "compile" in markdown and "nnz x 8" in markdown and machine["cpu_model"] in markdown


def test_bench_correctness_check_is_small(bench_run):
    result, out = bench_run
    assert result.returncode == 0, result.stderr
    (model,) = json.loads((out / "bench.json").read_text())["models"]
    assert model["check_batch"] == 32
    assert 0 <= model["check_max_abs_diff"] < 1e-4
    assert model["check_max_rel_diff"] < 1e-5


def test_bench_refuses_to_overwrite(bench_run):
    result, out = bench_run
    assert result.returncode == 0, result.stderr
    before = (out / "bench.json").read_text()
    again = run_cli(*ARGS, "--out", str(out))
    assert again.returncode == 2
    lines = again.stderr.strip().splitlines()
    assert len(lines) == 1 and "exists" in lines[0] and "--overwrite" in lines[0]
    assert (out / "bench.json").read_text() == before


def test_bench_unknown_model_is_bad_input(tmp_path):
    result = run_cli("bench", "--models", "no_such_model", "--quick", "--no-torch", "--out", str(tmp_path))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "no_such_model" in result.stderr
    assert not (tmp_path / "bench.json").exists()


def test_torch_is_optional(monkeypatch):
    from implicit_compiler import bench

    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    torch, note = bench._import_torch()
    assert torch is None and "torch column is skipped" in note


def test_engines_take_turns():
    from implicit_compiler import bench

    calls: list[str] = []

    def engine(name: str):
        def run() -> str:
            calls.append(name)
            return name

        return run

    timed = bench.time_side_by_side(
        {"onnxruntime": engine("onnxruntime"), "ours": engine("ours")},
        batch=4, repeats=6, warmup=1, min_seconds=0.0, rounds=3,
    )  # fmt: skip
    # warm-up, then three rounds of two timed runs each after an untimed one, taking turns
    assert calls == ["onnxruntime", "ours"] + (["onnxruntime"] * 3 + ["ours"] * 3) * 3
    for name, (timing, result) in timed.items():
        assert result == name and timing.engine == name and timing.batch == 4 and timing.runs == 6
        assert 0 < timing.min_seconds <= timing.median_seconds <= timing.max_seconds


def test_implicit_bench_contenders_solve_the_same_equilibrium():
    """Every dense contender (ours, the torch Picard loop, and the peers that are installed)
    reaches the tolerance, by the true residual computed the same way for all."""
    from implicit_compiler import bench_implicit

    A, B, b = bench_implicit.dense_problem(120, 0.95, signed=False)
    u = np.random.default_rng(3).normal(size=(5, bench_implicit.P))
    x_star = bench_implicit._reference(A, B, b, u)
    assert bench_implicit.dense_residual(A, B, b, u, x_star) <= 1e-11
    assert bench_implicit.dense_residual(A, B, b, u, 1.01 * x_star) > 1e-3
    contenders = bench_implicit._dense_contenders(A, B, b, u, np.float64, bench_implicit._peers(), np.abs(x_star).max())
    assert {"ours", "torch picard"} <= set(contenders)
    for name, solve in contenders.items():
        x = solve()
        assert bench_implicit.dense_residual(A, B, b, u, x) <= 2 * bench_implicit.TOL, name
        np.testing.assert_allclose(x, x_star, rtol=0, atol=1e-4 * np.abs(x_star).max(), err_msg=name)
    timed = bench.time_side_by_side(contenders, batch=5, repeats=1, warmup=0, min_seconds=0.0)
    residuals = {name: bench_implicit.dense_residual(A, B, b, u, x) for name, (_, x) in timed.items()}
    rows = bench_implicit._rows("dense", 5, "float64", timed, residuals)
    ours = next(row for row in rows if row.engine == "ours")
    others = [row.median_ms for row in rows if row.engine != "ours"]
    assert ours.ratio == pytest.approx(min(others) / ours.median_ms)
    table = bench_implicit.format_table({"tol": 1e-6, "peers": ["torch"], "rows": [vars(r) for r in rows]})
    assert "| dense | 5 | float64 | ours |" in table


def test_implicit_bench_trained_classifier_is_a_cyclic_dense_model_its_contenders_solve():
    from implicit_compiler import bench_implicit

    A, B, b, digits = bench_implicit.trained_classifier(quick=True)
    assert A.shape == (50, 50) and B.shape == (50, 64) and digits.shape == (797, 64)
    assert np.abs(A).sum(axis=1).max() <= 0.95 + 1e-9 and np.count_nonzero(np.triu(A)) > 0  # cyclic
    u = digits[:7]
    x_star = bench_implicit._reference(A, B, b, u)
    contenders = bench_implicit._dense_contenders(A, B, b, u, np.float32, bench_implicit._peers(), np.abs(x_star).max())
    for name, solve in contenders.items():
        assert bench_implicit.dense_residual(A, B, b, u, solve()) <= 5 * bench_implicit.TOL, name
