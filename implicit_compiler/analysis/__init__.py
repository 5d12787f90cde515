"""Analyses of implicit models: well-posedness, rescaling, sensitivity and bounds, sparse attacks.

Each analysis returns a frozen report (or a new model) and prints nothing:

- ``wellposedness``: is the equilibrium unique for every input? (lambda_pf(|A_cc|) per loop)
- ``rescale``: an equivalent model with ||A||_inf < 1 by a positive diagonal similarity.
- ``sensitivity`` and ``output_bounds``: |y(u) - y(u')| <= S |u - u'| and bounds over a box
  (CROWN, interval or sensitivity bounds, acyclic and cyclic models).
- ``certify_robustness``: VNN-COMP-style verdicts (robust / not proved) over l_inf boxes.
- ``sparse_attack``: change at most k inputs by at most sigma to push an output up.
- ``perron_frobenius_eigenvalue``: the spectral radius of a nonnegative matrix, robustly.
"""

from __future__ import annotations

from .attack import AttackResult, sparse_attack
from .bounds import OutputBounds, SensitivityReport, output_bounds, sensitivity
from .rescaling import rescale, rescaling_diagonal
from .robustness import RobustnessReport, certify_robustness
from .spectral import perron_frobenius_eigenvalue
from .well_posedness import ComponentReport, WellPosednessReport, wellposedness

__all__ = [
    "AttackResult",
    "ComponentReport",
    "OutputBounds",
    "RobustnessReport",
    "SensitivityReport",
    "WellPosednessReport",
    "certify_robustness",
    "output_bounds",
    "perron_frobenius_eigenvalue",
    "rescale",
    "rescaling_diagonal",
    "sensitivity",
    "sparse_attack",
    "wellposedness",
]
