"""Pictures: spy patterns checked against the permuted matrix, PNG sizes, overwrite refusal."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import scipy.sparse as sp

import implicit_compiler as ic
from implicit_compiler import ImplicitModel, OverwriteError, ShapeError, StateBlock, TensorSpec, viz
from implicit_compiler.errors import NonFiniteError
from implicit_compiler.runtime import execution_order

ZOO = Path(__file__).resolve().parents[1] / "zoo"
SIZES = {"a": 5, "b": 4, "c": 3}  # a reads u, b reads a, c reads a and b (and itself when looped)
READS = {"a": (), "b": ("a",), "c": ("a", "b")}


def _three_blocks(stored: str, loop: bool = False, seed: int = 0) -> ImplicitModel:
    """Blocks a, b, c stored in the order given (e.g. "bac"), random sparse weights per edge."""
    rng = np.random.default_rng(seed)
    starts = dict(zip(stored, (int(s) for s in np.cumsum([0] + [SIZES[name] for name in stored]))))
    n, p, q = sum(SIZES.values()), 3, 2
    A, B, C = np.zeros((n, n)), np.zeros((n, p)), np.zeros((q, n))
    rows = lambda name: slice(starts[name], starts[name] + SIZES[name])
    sparse_block = lambda shape: rng.normal(size=shape) * (rng.random(shape) < 0.6)
    for target, sources in READS.items():
        for source in sources + (("c",) if loop and target == "c" else ()):
            A[rows(target), rows(source)] = sparse_block((SIZES[target], SIZES[source])) * 0.2
    B[rows("a")] = sparse_block((SIZES["a"], p))
    C[:, rows("c")] = sparse_block((q, SIZES["c"]))
    blocks = tuple(
        StateBlock(name, starts[name], starts[name] + SIZES[name], "relu", (SIZES[name],)) for name in stored
    )
    return ImplicitModel(
        A, B, C, sp.csr_array((q, p)), None, None, blocks, (TensorSpec("u", (p,)),), (TensorSpec("y", (q,)),)
    )


def _expected_pattern(model: ImplicitModel, names: str, whole: bool) -> np.ndarray:
    """The 0/1 pattern of the matrix with its blocks in the given order, from the dense matrix."""
    order = np.concatenate([np.arange(model.block(name).start, model.block(name).stop) for name in names])
    if not whole:
        return (model.A.toarray()[np.ix_(order, order)] != 0).astype(np.int64)
    whole_matrix = sp.bmat([[model.A, model.B], [model.C, model.D]]).toarray()
    rows = np.concatenate([order, model.n + np.arange(model.q)])
    columns = np.concatenate([order, model.n + np.arange(model.p)])
    return (whole_matrix[np.ix_(rows, columns)] != 0).astype(np.int64)


def _binned(pattern: np.ndarray, size: int) -> np.ndarray:
    """Sum size x size tiles of the pattern (zero-padded to whole tiles)."""
    height, width = -(-pattern.shape[0] // size), -(-pattern.shape[1] // size)
    padded = np.zeros((height * size, width * size), dtype=np.int64)
    padded[: pattern.shape[0], : pattern.shape[1]] = pattern
    return padded.reshape(height, size, width, size).sum(axis=(1, 3))


def _png_size(path: Path) -> tuple[int, int]:
    """(width, height) in pixels of a PNG, read back with matplotlib."""
    height, width = matplotlib.image.imread(path).shape[:2]
    return width, height


# --------------------------------------------------------------------------------- patterns
# stored order, then the block order expected for each picture order: paper is the reverse of
# the execution order (a before b before c), topological the execution order, state as stored.
ARRANGEMENTS = [
    pytest.param("abc", {"paper": "cba", "topological": "abc", "state": "abc"}, id="stored-topological"),
    pytest.param("bca", {"paper": "cba", "topological": "abc", "state": "bca"}, id="stored-shuffled"),
    pytest.param("cba", {"paper": "cba", "topological": "abc", "state": "cba"}, id="stored-last-first"),
]
ORDERS = [pytest.param(order, id=order) for order in viz.ORDERS]
WHOLE = [pytest.param(False, id="A"), pytest.param(True, id="whole")]


@pytest.mark.parametrize("whole", WHOLE)
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("stored, expected", ARRANGEMENTS)
def test_exact_pattern_is_the_permuted_matrix(stored, expected, order, whole):
    model = _three_blocks(stored)
    pattern = viz.spy_pattern(model, order=order, whole=whole, resolution=1000)
    np.testing.assert_array_equal(pattern, _expected_pattern(model, expected[order], whole))


@pytest.mark.parametrize("whole", WHOLE)
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("stored, expected", ARRANGEMENTS)
def test_density_pattern_counts_the_permuted_matrix_per_pixel(stored, expected, order, whole):
    model = _three_blocks(stored)
    exact = _expected_pattern(model, expected[order], whole)
    pattern = viz.spy_pattern(model, order=order, whole=whole, resolution=4)  # 12 or 15 entries a side
    size = math.ceil(max(exact.shape) / 4)
    assert pattern.shape == (math.ceil(exact.shape[0] / size), math.ceil(exact.shape[1] / size))
    np.testing.assert_array_equal(pattern, _binned(exact, size))
    assert pattern.sum() == exact.sum()


@pytest.mark.parametrize("resolution", [pytest.param(1000, id="exact"), pytest.param(5, id="density")])
@pytest.mark.parametrize("stored", ["abc", "bca", "cba"])
def test_feedforward_is_upper_in_paper_order_and_lower_in_topological_order(stored, resolution):
    model = _three_blocks(stored)
    paper = viz.spy_pattern(model, order="paper", resolution=resolution)
    topological = viz.spy_pattern(model, order="topological", resolution=resolution)
    assert paper.sum() == topological.sum() == np.count_nonzero(model.A.toarray())
    assert np.tril(paper, -1).sum() == 0 and np.triu(paper).sum() > 0
    assert np.triu(topological, 1).sum() == 0 and np.tril(topological).sum() > 0
    if resolution == 1000:  # exact: the diagonal blocks are empty too
        assert np.trace(paper) == 0 and np.trace(topological) == 0


def test_mlp_pattern_in_each_order(mlp):
    model = mlp.implicit()  # blocks h1 (8), h2 (7): W2 below the diagonal as stored
    W2 = (mlp.W2 != 0).astype(np.int64)
    topological = np.zeros((15, 15), dtype=np.int64)
    topological[8:, :8] = W2
    paper = np.zeros((15, 15), dtype=np.int64)
    paper[:7, 7:] = W2
    np.testing.assert_array_equal(viz.spy_pattern(model, "state"), topological)
    np.testing.assert_array_equal(viz.spy_pattern(model, "topological"), topological)
    np.testing.assert_array_equal(viz.spy_pattern(model, "paper"), paper)


@pytest.mark.parametrize("stored", ["abc", "bca", "cba"])
def test_cyclic_model_is_drawn_in_the_runtime_execution_order(stored):
    model = _three_blocks(stored, loop=True)  # c reads itself: a cyclic component
    executed = [model.blocks[i].name for component in execution_order(model) for i in component.blocks]
    assert "".join(executed) == "abc"
    assert [model.blocks[i].name for i in viz._execution_blocks(model)] == executed
    pattern = viz.spy_pattern(model, order="topological")
    np.testing.assert_array_equal(pattern, _expected_pattern(model, "abc", whole=False))
    assert pattern[9:, 9:].sum() > 0  # the loop sits in c's diagonal block


def test_whole_pattern_is_n_plus_q_by_n_plus_p(mlp):
    model = mlp.implicit()
    pattern = viz.spy_pattern(model, order="state", whole=True)
    assert pattern.shape == (model.n + model.q, model.n + model.p)
    np.testing.assert_array_equal(pattern[model.n :, model.n :], 0)  # D = 0
    np.testing.assert_array_equal(pattern[: model.n, model.n :], (model.B.toarray() != 0).astype(int))
    np.testing.assert_array_equal(pattern[model.n :, : model.n], (model.C.toarray() != 0).astype(int))


@pytest.mark.parametrize("chunk", [1, 5, 64])
@pytest.mark.parametrize("resolution", [pytest.param(1000, id="exact"), pytest.param(4, id="density")])
def test_counting_in_chunks_of_rows_changes_nothing(monkeypatch, mlp, chunk, resolution):
    model = mlp.implicit()  # h1's rows of A are empty
    expected = viz.spy_pattern(model, "paper", whole=True, resolution=resolution)
    monkeypatch.setattr(viz, "_CHUNK_ENTRIES", chunk)
    np.testing.assert_array_equal(viz.spy_pattern(model, "paper", whole=True, resolution=resolution), expected)


def test_stored_zeros_are_not_drawn():
    A = sp.csr_array((np.array([0.0, 2.0]), np.array([0, 1]), np.array([0, 0, 2])), shape=(2, 2))
    assert A.nnz == 2
    model = ImplicitModel.from_matrices(A, np.ones((2, 1)), np.ones((1, 2)), np.zeros((1, 1)))
    np.testing.assert_array_equal(viz.spy_pattern(model, "state"), [[0, 0], [0, 1]])


@pytest.mark.parametrize(
    "kwargs",
    [pytest.param({"order": "reversed"}, id="unknown-order"), pytest.param({"resolution": 0}, id="no-pixels")],
)
def test_spy_rejects_bad_options(tmp_path, kwargs):
    with pytest.raises(ShapeError):
        viz.spy(_three_blocks("abc"), tmp_path / "x.png", **kwargs)
    assert not (tmp_path / "x.png").exists()


# ---------------------------------------------------------------------------------- labels
def test_labels_never_closer_than_the_gap_and_biggest_blocks_first():
    segments = [(f"b{i}", 10 * i, 10 * i + 10) for i in range(100)] + [("big", 1000, 3000)]
    chosen = viz._legible(segments, total=3000, axis_px=600, min_gap_px=20)
    centers = sorted((segments[i][1] + segments[i][2]) / 2 / 3000 * 600 for i in chosen)
    assert 100 in chosen
    assert min(np.diff(centers)) >= 20
    assert 5 <= len(chosen) < 20


def test_inputs_and_outputs_are_labelled_before_blocks():
    segments = [("big", 0, 990), ("y: out", 990, 1000)]
    assert viz._legible(segments, total=1000, axis_px=100, min_gap_px=60, first=990) == [1]


def test_long_names_are_shortened_in_the_middle():
    name = "a_really_long_block_name/with_a_suffix"
    short = viz._abbreviate(name, limit=20)
    assert len(short) == 20 and short.startswith("a_really") and short.endswith("suffix") and "…" in short
    assert viz._abbreviate("relu_3") == "relu_3"


def test_spy_with_many_blocks_renders(tmp_path):
    n = 400
    A = sp.diags_array(np.ones(n - 1), offsets=-1, format="csr")
    blocks = tuple(StateBlock(f"layer_{i}", i, i + 1, "relu", (1,)) for i in range(n))
    model = ImplicitModel(
        A, np.ones((n, 1)), np.ones((1, n)), np.zeros((1, 1)), None, None, blocks,
        (TensorSpec("u", (1,)),), (TensorSpec("y", (1,)),),
    )  # fmt: skip
    path = viz.spy(model, tmp_path / "many.png", resolution=100)
    assert _png_size(path) == viz.SPY_SIZE_PX


# ------------------------------------------------------------------------------- PNG files
@pytest.mark.parametrize("whole", WHOLE)
@pytest.mark.parametrize("order", ORDERS)
def test_spy_writes_a_png_of_the_documented_size(tmp_path, mlp, order, whole):
    path = viz.spy(mlp.implicit(), tmp_path / "nested" / "spy.png", order=order, whole=whole)
    assert path == tmp_path / "nested" / "spy.png"
    assert _png_size(path) == viz.SPY_SIZE_PX == (1200, 1200)


def test_spy_density_writes_a_png_of_the_documented_size(tmp_path):
    path = viz.spy(_three_blocks("abc"), tmp_path / "density.png", resolution=4, title="density")
    assert _png_size(path) == viz.SPY_SIZE_PX


@pytest.mark.parametrize(
    "q, columns, height",
    [pytest.param(10, 5, 90 + 2 * 240, id="10-outputs"), pytest.param(3, 5, 90 + 400, id="3-outputs-narrowed")],
)
def test_sensitivity_image_size(tmp_path, rng, q, columns, height):
    path = viz.sensitivity_image(rng.random((q, 16)), tmp_path / "s.png", columns=columns)
    assert _png_size(path) == (viz.SENSITIVITY_WIDTH_PX, height)


class _Report:
    """Stands in for the analysis SensitivityReport: ``.matrix`` (and ``.model`` where given)."""

    def __init__(self, matrix, model=None):
        self.matrix = matrix
        if model is not None:
            self.model = model


def _one_input_model(shape: tuple[int, ...]) -> ImplicitModel:
    p = math.prod(shape)
    return ImplicitModel(
        sp.csr_array((1, 1)), np.ones((1, p)), np.ones((1, 1)), np.zeros((1, p)), None, None,
        (StateBlock("x", 0, 1, "relu", (1,)),), (TensorSpec("image", shape),), (TensorSpec("y", (1,)),),
    )  # fmt: skip


@pytest.mark.parametrize(
    "p, image_shape, source, expected",
    [
        pytest.param(24, (4, 6), None, (4, 6), id="given"),
        pytest.param(24, (1, 4, 6), None, (4, 6), id="given-size-1-axis-dropped"),
        pytest.param(24, None, _one_input_model((2, 3, 4)), (2, 3, 4), id="model-input-channels-first"),
        pytest.param(24, None, _Report(None, model=_one_input_model((1, 4, 6))), (4, 6), id="report-model-input"),
        pytest.param(24, None, _one_input_model((5, 5)), (1, 24), id="model-input-of-other-size-ignored"),
        pytest.param(25, None, None, (5, 5), id="square"),
        pytest.param(24, None, None, (1, 24), id="strip"),
        pytest.param(24, (24,), None, (1, 24), id="given-1d"),
    ],
)
def test_sensitivity_panel_shape(p, image_shape, source, expected):
    assert viz._panel_shape(p, image_shape, source) == expected


def test_sensitivity_image_accepts_a_report_and_labels(tmp_path, rng):
    report = _Report(rng.random((2, 12)))
    path = viz.sensitivity_image(report, tmp_path / "s.png", image_shape=(3, 4), labels=["cat", "dog"], columns=2)
    assert _png_size(path) == (1200, 90 + 600)


@pytest.mark.parametrize(
    "matrix, kwargs, error",
    [
        pytest.param(np.ones((2, 12)), {"image_shape": (5, 5)}, ShapeError, id="wrong-image-shape"),
        pytest.param(np.ones((2, 12)), {"labels": ["one"]}, ShapeError, id="too-few-labels"),
        pytest.param(np.ones(12), {}, ShapeError, id="not-2d"),
        pytest.param(np.full((2, 4), np.inf), {}, NonFiniteError, id="invalid-report"),
    ],
)
def test_sensitivity_image_rejects(tmp_path, matrix, kwargs, error):
    with pytest.raises(error):
        viz.sensitivity_image(matrix, tmp_path / "s.png", **kwargs)


def _looped_solution(mlp) -> ic.Solution:
    """A solution with one cyclic component: h2 fed back into h1 with a small gain."""
    model = mlp.implicit()
    A = model.A.toarray()
    A[:8, 8:] = 0.05 * np.random.default_rng(0).normal(size=(8, 7))
    looped = ImplicitModel(
        A, model.B, model.C, model.D, model.bias_x, model.bias_y, model.blocks, model.inputs, model.outputs
    )
    return looped.solve(np.ones(6))


@pytest.mark.parametrize(
    "source",
    [
        pytest.param("solution", id="solution"),
        pytest.param([1.0, 0.1, 1e-3, 0.0, 1e-8], id="sequence"),
        pytest.param({"picard": [1.0, 0.5, 0.25], "anderson": [1.0, 0.1, 1e-4]}, id="mapping"),
        pytest.param("feedforward", id="no-iterations"),
    ],
)
def test_residual_plot_size(tmp_path, mlp, source):
    if source == "solution":
        source = _looped_solution(mlp)
        assert source.component_histories and source.component_histories[0][0] == ("h1", "h2")
    elif source == "feedforward":
        source = mlp.implicit().solve(np.ones(6))
        assert not source.residual_history
    path = viz.residual_plot(source, tmp_path / "r.png", tolerance=1e-6)
    assert _png_size(path) == viz.RESIDUAL_SIZE_PX == (1200, 750)


def test_residual_curves_are_named_by_component_blocks(mlp):
    curves = viz._residual_curves(_looped_solution(mlp))
    assert list(curves) == ["h1, h2"]
    assert viz._component_label(("a", "b", "c", "d", "e")) == "a, b, c (+2 more)"


def test_residual_plot_rejects_mismatched_labels(tmp_path):
    with pytest.raises(ShapeError):
        viz.residual_plot([1.0, 0.1], tmp_path / "r.png", labels=["one", "two"])


PLOTS = [
    pytest.param(lambda path, **kw: viz.spy(_three_blocks("abc"), path, **kw), id="spy"),
    pytest.param(lambda path, **kw: viz.sensitivity_image(np.ones((2, 4)), path, **kw), id="sensitivity"),
    pytest.param(lambda path, **kw: viz.residual_plot([1.0, 0.1], path, **kw), id="residual"),
]


@pytest.mark.parametrize("plot", PLOTS)
def test_overwrite_false_refuses_an_existing_file_and_leaves_it(tmp_path, plot):
    path = tmp_path / "existing.png"
    path.write_bytes(b"keep me")
    with pytest.raises(OverwriteError):
        plot(path, overwrite=False)
    assert path.read_bytes() == b"keep me"
    assert plot(tmp_path / "sub" / "new.png", overwrite=False).exists()  # a new file is fine
    with pytest.raises(OverwriteError, match="pass overwrite=True"):
        plot(path)  # the default refuses too
    assert path.read_bytes() == b"keep me"
    plot(path, overwrite=True)
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_save_refuses_a_file_that_appeared_after_the_check(tmp_path, monkeypatch):
    path = tmp_path / "late.png"
    figure = viz._figure((300, 300))
    path.write_bytes(b"first")
    monkeypatch.setattr(viz, "_check_target", lambda path, overwrite: Path(path))  # the check passed earlier
    with pytest.raises(OverwriteError):
        viz._save(figure, path, overwrite=False)
    assert path.read_bytes() == b"first"


# ------------------------------------------------------------------------------------- zoo
@pytest.mark.slow
@pytest.mark.parametrize("whole", WHOLE)
def test_lenet5_spy(tmp_path, whole):
    model = ic.from_onnx(ZOO / "lenet5.onnx")
    nnz = sum(np.count_nonzero(m.data) for m in ((model.A, model.B, model.C, model.D) if whole else (model.A,)))
    for order, triangle in (("paper", np.tril), ("topological", np.triu)):
        pattern = viz.spy_pattern(model, order=order, whole=whole)
        assert max(pattern.shape) <= 1000 and pattern.sum() == nnz
        if not whole:
            assert triangle(pattern, -1 if order == "paper" else 1).sum() == 0
        path = viz.spy(model, tmp_path / f"lenet5_{order}.png", order=order, whole=whole)
        assert _png_size(path) == viz.SPY_SIZE_PX
