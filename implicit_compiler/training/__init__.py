"""Training implicit models x = phi(A x + B u + b_x), y = C x + D u + b_y with torch.

- ``ImplicitModule``: a torch module over sparse A, B, C, D (fixed patterns, trainable values);
  forward solves the equilibrium by the runtime's block sweeps, backward by implicit differentiation.
  ``ImplicitModel.to_torch()`` and ``ImplicitModel.from_torch(module)`` convert.
- ``project_rows_l1`` / ``project_inf_norm``: the exact projection onto ||A||_inf <= kappa, which
  keeps a model well-posed during training (``ImplicitModule.project_``).
- ``bcd``: ``solver="bcd"`` of the estimators, block-coordinate descent on the Fenchel relaxation
  with dual ascent (``BCDHistory``; ``plot_bcd_history`` draws one); ``frank_wolfe``:
  ``solver="frank_wolfe"``, conditional gradient over ||A||_inf <= kappa (sparse A).
- Penalties: ``column_linf_penalty`` (sum_j ||B e_j||_inf) with its exact prox
  ``prox_column_linf_`` / ``prox_column_linf`` (feature selection: exact zero columns), the l2
  group lasso ``column_group_lasso`` / ``prox_column_group_lasso_``, ``robustness_penalty``
  ((||B||^2 + ||C||^2) / (2 (1 - ||A||)) + ||D||, induced inf norms), and the certified bounds
  ``sensitivity_bound`` and ``norm_sensitivity_bound``.

Everything here but the projection needs torch (``pip install torch``), imported on first use of
a name that needs it; ``import implicit_compiler`` does not import this package.
"""

from __future__ import annotations

from .projection import project_inf_norm, project_rows_l1, row_l1_norms

# torch loads on first use: the projection and predicting with a trained ImplicitModel need only numpy.
_TORCH_NAMES = {
    "ImplicitModule": "torch_bridge",
    "SolveRecord": "torch_bridge",
    "SparsityPattern": "torch_bridge",
    "column_group_lasso": "penalties",
    "column_linf_norms": "penalties",
    "column_linf_penalty": "penalties",
    "column_norms": "penalties",
    "norm_sensitivity_bound": "penalties",
    "prox_column_group_lasso_": "penalties",
    "prox_column_linf": "penalties",
    "prox_column_linf_": "penalties",
    "robustness_penalty": "penalties",
    "sensitivity_bound": "penalties",
    "sensitivity_matrix": "penalties",
}
_TORCH_NAMES.update(ImplicitClassifier="estimators", ImplicitRegressor="estimators")  # need scikit-learn
_TORCH_NAMES.update(BCDHistory="bcd", plot_bcd_history="plots")  # solver="bcd" (numpy) and its figure


def __getattr__(name: str):
    if name in _TORCH_NAMES:
        from importlib import import_module

        return getattr(import_module(f".{_TORCH_NAMES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ImplicitModule",
    "SolveRecord",
    "SparsityPattern",
    "column_group_lasso",
    "column_linf_norms",
    "column_linf_penalty",
    "column_norms",
    "norm_sensitivity_bound",
    "project_inf_norm",
    "project_rows_l1",
    "prox_column_group_lasso_",
    "prox_column_linf",
    "prox_column_linf_",
    "robustness_penalty",
    "row_l1_norms",
    "sensitivity_bound",
    "sensitivity_matrix",
]
