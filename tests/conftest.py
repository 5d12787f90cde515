"""Shared fixtures: small hand-made implicit models with independent numpy references."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from implicit_compiler import ImplicitModel, StateBlock, TensorSpec


class MLP:
    """A 2-hidden-layer ReLU MLP: its weights, a numpy forward pass and its implicit form."""

    def __init__(self, rng: np.random.Generator, sizes=(6, 8, 7, 3)):
        p, n1, n2, q = sizes
        self.W1, self.b1 = rng.normal(size=(n1, p)), rng.normal(size=n1)
        self.W2, self.b2 = rng.normal(size=(n2, n1)) / 2, rng.normal(size=n2)
        self.W3, self.b3 = rng.normal(size=(q, n2)), rng.normal(size=q)
        self.sizes = sizes

    def forward(self, u: np.ndarray) -> np.ndarray:
        """numpy forward pass, u of shape (batch, p)."""
        h1 = np.maximum(u @ self.W1.T + self.b1, 0)
        h2 = np.maximum(h1 @ self.W2.T + self.b2, 0)
        return h2 @ self.W3.T + self.b3

    def implicit(self) -> ImplicitModel:
        """x = [h1; h2]: A holds W2 below the diagonal, B feeds u to h1, C reads h2."""
        p, n1, n2, q = self.sizes
        A = sp.bmat([[None, sp.csr_array((n1, n2))], [self.W2, None]], format="csr")
        B = sp.vstack([self.W1, sp.csr_array((n2, p))], format="csr")
        C = sp.hstack([sp.csr_array((q, n1)), self.W3], format="csr")
        D = sp.csr_array((q, p))
        blocks = (StateBlock("h1", 0, n1, "relu", (n1,)), StateBlock("h2", n1, n1 + n2, "relu", (n2,)))
        return ImplicitModel(
            A, B, C, D, np.concatenate([self.b1, self.b2]), self.b3, blocks,
            (TensorSpec("u", (p,)),), (TensorSpec("y", (q,)),),
        )  # fmt: skip


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def mlp(rng) -> MLP:
    return MLP(rng)


def contractive_matrix(rng: np.random.Generator, n: int, norm: float) -> np.ndarray:
    """A dense random matrix scaled so that ||A||_inf = norm."""
    A = rng.normal(size=(n, n))
    return A * (norm / np.abs(A).sum(axis=1).max())


def model_with_blocks(A, blocks, p=3, q=2, seed=0, dtype=np.float64, random_feedthrough=True) -> ImplicitModel:
    """A model with state matrix A and blocks [(name, size, activation)], random B and C, and
    random D and biases (or D = 0 and no biases with ``random_feedthrough=False``)."""
    rng = np.random.default_rng(seed)
    n = A.shape[0]
    states, start = [], 0
    for name, size, activation in blocks:
        states.append(StateBlock(name, start, start + size, activation, (size,)))
        start += size
    B, C = rng.normal(size=(n, p)).astype(dtype), rng.normal(size=(q, n)).astype(dtype)
    if random_feedthrough:
        D, bias_x, bias_y = (rng.normal(size=shape).astype(dtype) for shape in ((q, p), n, q))
    else:
        D, bias_x, bias_y = np.zeros((q, p), dtype), None, None
    return ImplicitModel(
        sp.csr_array(np.asarray(A).astype(dtype)), B, C, D, bias_x, bias_y, tuple(states),
        (TensorSpec("u", (p,)),), (TensorSpec("y", (q,)),),
    )  # fmt: skip


def run_readme_block(section: str, folder, monkeypatch) -> dict:
    """The namespace left by the README's first python block after the heading ``section``, run
    as written in ``folder``."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = text.index("```python", text.index(section)) + len("```python")
    block = text[start : text.index("```", start)]
    monkeypatch.chdir(folder)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    return namespace
