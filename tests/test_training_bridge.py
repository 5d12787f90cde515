"""ImplicitModule: forward against the numpy runtime, implicit gradients against finite
differences, conversions, projected training, and the penalties."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from conftest import contractive_matrix, model_with_blocks

from implicit_compiler import ConvergenceError, ImplicitModel, NotWellPosedError, ShapeError
from implicit_compiler.analysis import sensitivity
from implicit_compiler.runtime import execution_order
from implicit_compiler.training import (
    ImplicitModule,
    column_group_lasso,
    norm_sensitivity_bound,
    project_rows_l1,
    prox_column_group_lasso_,
    sensitivity_bound,
    sensitivity_matrix,
    torch_bridge,
)

WEIGHTS = ("A_values", "B_values", "bias_x", "C_values", "D_values", "bias_y")


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Run single-threaded: these models are tiny, and torch's thread pool, entered by BLAS and the
    sparse kernels, stalls for milliseconds per call when other processes share the CPUs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def dense_model(rng, activation, n=6, p=3, q=2, norm=0.7) -> ImplicitModel:
    return ImplicitModel.from_matrices(
        contractive_matrix(rng, n, norm), rng.normal(size=(n, p)), rng.normal(size=(q, n)), rng.normal(size=(q, p)),
        activation, rng.normal(size=n), rng.normal(size=q),
    )  # fmt: skip


def cyclic_sparse_model(
    seed=0, n_blocks=((4, "leaky_relu(0.1)"), (5, "tanh"), (3, "sigmoid")), norm=0.8
) -> ImplicitModel:
    """A cyclic model with a random sparse A (the blocks feed each other) and ||A||_inf = norm."""
    rng = np.random.default_rng(seed)
    n = sum(size for size, _ in n_blocks)
    A = sp.random_array((n, n), density=0.35, rng=rng, format="csr")
    A.data = rng.normal(size=A.nnz)
    A = project_rows_l1(A.toarray() * 10, norm)
    blocks = [(f"block{i}", size, activation) for i, (size, activation) in enumerate(n_blocks)]
    model = model_with_blocks(A, blocks, p=3, q=2, seed=seed)
    assert any(component.cyclic for component in execution_order(model))
    return model


def check_gradients_by_finite_differences(module: ImplicitModule, u: torch.Tensor) -> None:
    """torch.autograd.gradcheck (central differences) on every weight and on the input u."""
    weights = tuple(getattr(module, name).detach().clone().requires_grad_(True) for name in WEIGHTS)

    def predict(*tensors):
        *values, inputs = tensors
        return torch.func.functional_call(module, dict(zip(WEIGHTS, values)), (inputs,))

    inputs = u.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(predict, (*weights, inputs), eps=1e-6, atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("activation", ["tanh", "relu", "leaky_relu(-0.5)"])
def test_gradients_match_finite_differences_on_a_dense_contractive_model(rng, activation):
    module = dense_model(rng, activation).to_torch(tol=1e-14)
    u = torch.tensor(rng.normal(size=(4, 3)))
    check_gradients_by_finite_differences(module, u)


@pytest.mark.parametrize("kernel", ["gather", "csr"])
def test_gradients_match_finite_differences_on_a_cyclic_sparse_model(monkeypatch, kernel):
    if kernel == "csr":  # the torch sparse CSR kernels that large models use
        monkeypatch.setattr(torch_bridge, "SMALL_PRODUCT", 0)
    model = cyclic_sparse_model(n_blocks=((3, "leaky_relu(0.1)"), (3, "tanh"), (2, "sigmoid")), norm=0.6)
    module = model.to_torch(tol=1e-14)
    assert not module.A_pattern.full and module.A_pattern.nnz < model.n**2
    u = torch.tensor(np.random.default_rng(5).normal(size=(3, 3)))
    check_gradients_by_finite_differences(module, u)


@pytest.mark.parametrize("kernel", ["gather", "csr"])
def test_gradients_of_one_sparse_cyclic_block(rng, monkeypatch, kernel):
    """One block with a sparse A (not a full pattern): its forward and adjoint solves iterate
    the block as one map (``equilibrium.solve_blocks``) through the sparse products."""
    if kernel == "csr":
        monkeypatch.setattr(torch_bridge, "SMALL_PRODUCT", 0)
    n = 9
    A = np.where(rng.random((n, n)) < 0.35, rng.normal(size=(n, n)), 0.0)
    A *= 0.7 / np.abs(A).sum(axis=1).max()
    model = ImplicitModel.from_matrices(sp.csr_array(A), rng.normal(size=(n, 3)), rng.normal(size=(2, n)),
                                        rng.normal(size=(2, 3)), activation="tanh", bias_x=rng.normal(size=n))  # fmt: skip
    module = model.to_torch(tol=1e-14)
    assert len(model.blocks) == 1 and not module.A_pattern.full
    u = torch.tensor(rng.normal(size=(3, 3)))
    np.testing.assert_allclose(module(u).detach().numpy(), model.predict(u.numpy()), atol=1e-12)
    check_gradients_by_finite_differences(module, u)
    assert module.last_solve.forward_iterations > 0 and module.last_solve.backward_iterations > 0


def test_gradients_through_acyclic_and_cyclic_components_and_a_square_block(rng):
    """block0 (acyclic) -> a cyclic component (block1 <-> block2, with a 'square' block) ->
    block3 (acyclic): forward substitution, sweeps forward and in reverse for the adjoint."""
    sizes = (3, 3, 2, 2)
    starts = np.cumsum((0, *sizes))
    n = starts[-1]
    A = np.zeros((n, n))

    def part(i, j, scale):
        A[starts[i] : starts[i + 1], starts[j] : starts[j + 1]] = scale * rng.normal(size=(sizes[i], sizes[j]))

    part(1, 0, 0.3), part(1, 2, 0.2), part(2, 1, 0.15), part(2, 2, 0.1), part(3, 2, 0.4), part(3, 1, 0.3)
    blocks = [
        ("block0", 3, "tanh"),
        ("block1", 3, "leaky_relu(0.1)"),
        ("block2", 2, "square"),
        ("block3", 2, "sigmoid"),
    ]
    model = model_with_blocks(A, blocks, p=3, q=2, seed=1)
    components = execution_order(model)
    assert [c.cyclic for c in components] == [False, True, False]
    module = model.to_torch(tol=1e-14)
    u = torch.tensor(0.3 * rng.normal(size=(3, 3)))
    np.testing.assert_allclose(module(u).detach().numpy(), model.predict(u.numpy()), atol=1e-12)
    check_gradients_by_finite_differences(module, u)
    assert module.last_solve.backward_iterations > 0


def test_gradients_match_the_closed_form_jacobian(rng):
    """dy/du = C (I - Gamma A)^{-1} Gamma B + D with Gamma = diag(phi'(z*)), from numpy."""
    model = dense_model(rng, "tanh")
    module = model.to_torch()
    u0 = rng.normal(size=3)
    jacobian = torch.autograd.functional.jacobian(module, torch.tensor(u0)).numpy()
    x = model.solve(u0, tol=1e-14).x
    A, B, C, D = (getattr(model, name).toarray() for name in "ABCD")
    gamma = np.diag(1 - np.tanh(A @ x + B @ u0 + model.bias_x) ** 2)
    expected = C @ np.linalg.solve(np.eye(model.n) - gamma @ A, gamma @ B) + D
    np.testing.assert_allclose(jacobian, expected, atol=1e-9)


def test_only_trainable_weights_are_parameters(rng):
    module = dense_model(rng, "relu").to_torch(trainable=("A", "bias_x"))
    assert {name for name, _ in module.named_parameters()} == {"A_values", "bias_x"}
    module(torch.tensor(rng.normal(size=(2, 3)))).sum().backward()
    assert module.A_values.grad is not None and module.bias_x.grad is not None
    with pytest.raises(ShapeError, match="trainable"):
        dense_model(rng, "relu").to_torch(trainable=("E",))


# --------------------------------------------------------------------------------- forward
def test_forward_matches_a_numpy_mlp_by_forward_substitution(mlp, rng):
    model = mlp.implicit()
    module = model.to_torch()
    u = rng.normal(size=(5, mlp.sizes[0]))
    y = module(torch.tensor(u)).detach().numpy()
    np.testing.assert_allclose(y, mlp.forward(u), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(y, model.predict(u), rtol=1e-12, atol=1e-12)
    # acyclic blocks: each computed once, exactly, with no iteration (forward and adjoint alike)
    assert module.last_solve.forward_iterations == 0 and module.last_solve.forward_residual == 0.0
    module(torch.tensor(u, requires_grad=True)).sum().backward()
    assert module.last_solve.backward_iterations == 0


def test_forward_matches_the_runtime_on_a_cyclic_model():
    model = cyclic_sparse_model(seed=3)
    u = np.random.default_rng(3).normal(size=(7, 3))
    module = model.to_torch()
    np.testing.assert_allclose(module(torch.tensor(u)).detach().numpy(), model.predict(u), atol=1e-9)
    np.testing.assert_allclose(module.equilibrium(torch.tensor(u)).detach().numpy(), model.solve(u).x, atol=1e-9)
    single = module(torch.tensor(u[0])).detach().numpy()
    np.testing.assert_allclose(single, model.predict(u[0]), atol=1e-9)


def test_float32_module_matches_the_runtime(rng):
    model = dense_model(rng, "tanh").astype(np.float32)
    module = model.to_torch()
    assert module.dtype == torch.float32
    u = rng.normal(size=(4, 3)).astype(np.float32)
    np.testing.assert_allclose(module(torch.tensor(u)).detach().numpy(), model.predict(u), atol=1e-4)


def test_a_model_without_an_equilibrium_raises_convergence_error():
    # x = relu(2 x + 1) has no fixed point (x >= 0 would need x = -1): the iterates grow without end
    model = ImplicitModel.from_matrices(2 * np.eye(1), np.ones((1, 1)), np.ones((1, 1)), np.zeros((1, 1)), "relu")
    module = model.to_torch(max_iter=50)
    with pytest.raises(ConvergenceError, match=r"project_\(kappa\)") as error:
        module(torch.ones(2, 1))
    assert 1 <= error.value.iterations <= 50  # Anderson: stopped at max_iter, or diverged sooner
    module.anderson_memory = 0  # plain sweeps: no extrapolation, the iterates double until max_iter
    with pytest.raises(ConvergenceError, match=r"did not converge in 50 of max_iter=50") as error:
        module(torch.ones(2, 1))
    assert error.value.iterations == 50


def test_wrong_input_width_raises_shape_error(rng):
    module = dense_model(rng, "relu").to_torch()
    with pytest.raises(ShapeError, match=r"\(batch, 3\)"):
        module(torch.ones(2, 4, dtype=torch.float64))


# --------------------------------------------------------------------------------- conversion
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
def test_model_to_torch_to_model_round_trips_exactly(mlp, dtype):
    model = mlp.implicit().astype(dtype)
    back = ImplicitModel.from_torch(model.to_torch())
    for name in "ABCD":
        original, restored = getattr(model, name), getattr(back, name)
        assert restored.dtype == original.dtype
        for part in ("data", "indices", "indptr"):
            assert np.array_equal(getattr(restored, part), getattr(original, part)), (name, part)
    assert np.array_equal(back.bias_x, model.bias_x) and np.array_equal(back.bias_y, model.bias_y)
    assert (back.blocks, back.inputs, back.outputs) == (model.blocks, model.inputs, model.outputs)


def test_to_model_copies_the_weights(rng):
    module = dense_model(rng, "relu").to_torch()
    model = module.to_model()
    before = model.A.data.copy()
    with torch.no_grad():
        module.A_values.mul_(0.5)
    assert np.array_equal(model.A.data, before)


def test_random_modules_start_inside_the_ball_with_the_requested_structure():
    dense = ImplicitModule.random(8, 3, 2, activation="tanh", kappa=0.9, seed=0)
    assert dense.A_pattern.full and dense.state_matrix_norm() <= 0.9
    triangular = ImplicitModule.random(8, 3, 2, structure="triangular", seed=0)
    A = triangular.to_model().A.toarray()
    assert triangular.A_pattern.nnz == 8 * 7 // 2 and np.all(np.triu(A) == 0)
    triangular(torch.ones(4, 3, dtype=torch.float64))
    assert triangular.last_solve.forward_iterations <= 8 + 1
    assert ImplicitModule.random(8, 3, 2, seed=1).to_model().D.nnz == 2 * 3  # zeros stored, so trainable
    with pytest.raises(ShapeError, match="structure"):
        ImplicitModule.random(4, 2, 1, structure="banded")


# --------------------------------------------------------------------------------- training
def test_projected_adam_reduces_the_loss_and_keeps_the_bound():
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(64, 4, generator=generator, dtype=torch.float64)
    targets = torch.sin(inputs[:, :1] * 1.5) + 0.5 * inputs[:, 1:2] * inputs[:, 2:3]
    module = ImplicitModule.random(12, 4, 1, activation="tanh", kappa=0.9, seed=0, tol=1e-8)
    optimizer = torch.optim.Adam(module.parameters(), lr=0.05)
    losses = []
    for _ in range(60):
        optimizer.zero_grad()
        loss = torch.mean((module(inputs) - targets) ** 2)
        loss.backward()
        optimizer.step()
        module.project_(0.9)
        assert module.state_matrix_norm() <= 0.9 * (1 + 1e-12)
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.3 * losses[0]


def test_project_keeps_the_pattern_and_applies_masks(rng):
    model = cyclic_sparse_model(seed=1)
    module = model.to_torch()
    with torch.no_grad():
        module.A_values.mul_(10)
    module.project_(0.5)
    projected = module.to_model().A
    assert np.array_equal(projected.indices, model.A.indices) and abs(projected).sum(axis=1).max() <= 0.5 + 1e-12
    dense = dense_model(rng, "relu").to_torch()
    dense.project_(0.5, mask="triangular")
    assert np.all(np.triu(dense.to_model().A.toarray()) == 0)


# --------------------------------------------------------------------------------- penalties
def test_column_group_lasso_and_its_gradient(rng):
    module = dense_model(rng, "relu").to_torch()
    B = module.to_model().B.toarray()
    penalty = column_group_lasso(module)
    assert float(penalty.detach()) == pytest.approx(np.linalg.norm(B, axis=0).sum(), rel=1e-14)
    penalty.backward()
    expected = (B / np.linalg.norm(B, axis=0)).ravel()  # full pattern: values are B in row-major order
    np.testing.assert_allclose(module.B_values.grad.numpy(), expected, rtol=1e-12)
    assert column_group_lasso(B) == pytest.approx(float(penalty.detach()))
    assert float(column_group_lasso(module.B).detach()) == pytest.approx(float(penalty.detach()))


def test_prox_step_zeroes_small_columns_and_shrinks_the_others(rng):
    module = dense_model(rng, "relu").to_torch()
    with torch.no_grad():
        module.B_values.view(6, 3)[:, 1].mul_(1e-3)
    B = module.to_model().B.toarray()
    norms = np.linalg.norm(B, axis=0)
    step = 0.5 * min(norms[0], norms[2])
    kept = prox_column_group_lasso_(module, step)
    after = module.to_model().B.toarray()
    assert kept.tolist() == [True, False, True]
    assert np.all(after[:, 1] == 0)
    np.testing.assert_allclose(after[:, [0, 2]], B[:, [0, 2]] * (1 - step / norms[[0, 2]]), rtol=1e-13)
    assert float(column_group_lasso(module).detach()) == pytest.approx(norms[[0, 2]].sum() - 2 * step)


def test_sensitivity_matrix_matches_the_analysis_and_bounds_the_outputs():
    model = cyclic_sparse_model(seed=2)
    module = model.to_torch()
    S = sensitivity_matrix(module).detach().numpy()
    np.testing.assert_allclose(S, sensitivity(model).matrix, rtol=1e-10, atol=1e-12)
    bound = float(sensitivity_bound(module).detach())
    assert bound == pytest.approx(S.sum(axis=1).max())
    assert float(norm_sensitivity_bound(module).detach()) >= bound * (1 - 1e-12)
    rng = np.random.default_rng(0)
    u = rng.normal(size=(20, 3))
    du = rng.uniform(-0.1, 0.1, size=u.shape)
    change = np.abs(model.predict(u + du) - model.predict(u)).max(axis=1)
    assert np.all(change <= bound * np.abs(du).max(axis=1) + 1e-9)
    sensitivity_bound(module).backward()  # differentiable
    assert torch.isfinite(module.A_values.grad).all()


def test_sensitivity_needs_a_well_posed_model(rng):
    module = dense_model(rng, "relu", norm=1.5).to_torch()
    with pytest.raises(NotWellPosedError, match="project"):
        norm_sensitivity_bound(module)
    square = dense_model(rng, "square", norm=0.5).to_torch()
    with pytest.raises(NotWellPosedError, match="square"):
        sensitivity_bound(square)
