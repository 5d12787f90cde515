"""scikit-learn estimators that fit an implicit model x = phi(A x + B u + b_x), y = C x + D u + b_y.

``ImplicitRegressor`` minimises the mean squared error, ``ImplicitClassifier`` the cross-entropy
of the logits y (softmax over classes, or one sigmoid logit for two classes). Both train an
``ImplicitModule`` (``torch_bridge``: the equilibrium is solved by the runtime's block sweeps
and differentiated implicitly) with Adam (or plain SGD) on mini-batches and, after every step,

    B <- prox_{lr * column_linf * sum_j ||B e_j||_inf}(B)   (column l_inf prox: exact zero columns)
    B <- prox_{lr * group_lasso * sum_j ||B e_j||_2}(B)    (column group soft threshold)
    A <- row-wise projection onto {||A_i:||_1 <= kappa}     (so ||A||_inf <= kappa < 1: well-posed)

The loss is  data loss + (alpha / 2) (||A||_F^2 + ||B||_F^2 + ||C||_F^2 + ||D||_F^2)
+ robustness * (||B||_inf^2 + ||C||_inf^2) / (2 (1 - ||A||_inf)) + robustness * ||D||_inf  on each
mini-batch (the two column penalties enter only through their proximal steps; see ``penalties``).

Standardization. Inputs are standardized, u = (X - mu) / s, and regression targets too,
t = (Y - nu) / r; the network is trained on (u, t). Each input scale has a floor, the median of the
features' standard deviations (``_mean_and_scale``): a near-constant input (a corner pixel) is not
blown up into a huge weight that a single in-range change of it would then multiply. The fitted
``model_`` maps raw X to raw predictions: with S = diag(s), R = diag(r),

    B' = B S^-1,  b_x' = b_x - B S^-1 mu,
    C' = R C,     D' = R D S^-1,  b_y' = R (b_y - D S^-1 mu) + nu,

so ``model_.predict(X)`` equals ``predict(X)`` (regressor) or ``decision_function(X)`` logits
(classifier). Zero columns of B stay zero, so the selected features read off ``model_.B``.

Solvers. "adam" (the default; "gradient" is another name for it) and "sgd" are the gradient
training above. "bcd" trains by block-coordinate descent on the Fenchel relaxation of the
equilibrium with dual ascent (``bcd.py``, relu and leaky relu): full-batch block steps of size 1 / L, rounds of
``type_of_training`` ("two_loops": sweeps until the objective's relative decrease is under ``tol``,
at most ``max_epochs`` per round, then a dual step; "one_loop": one sweep and one dual step);
``rounds``, ``dual_learning_rate``, ``tol_fenchel``, ``starting_lambda``. Its per-round history is
``history_`` (``bcd.BCDHistory``; ``plots.plot_bcd_history`` draws it); ``model_`` is the implicit
model with the trained weights, predicting through the real equilibrium.

Early stopping. With ``early_stopping=True`` a stratified (classifier) or plain split of
``validation_fraction`` of the training set is held out; training stops when the validation
loss has not improved by more than ``tol`` for ``n_iter_no_change`` epochs, and the parameters
of the best epoch are restored. Otherwise (or when the set is too small to split) the same rule
applies to the training loss. torch is imported only by ``fit``: predicting runs the numpy
runtime on ``model_``. Small models train on one torch thread (``SINGLE_THREAD_NONZEROS``).
"""

from __future__ import annotations

import copy
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import scipy.sparse as sp
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import accuracy_score, r2_score
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import LabelEncoder
from sklearn.utils import check_random_state
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_array, check_is_fitted, validate_data

from .. import arguments
from ..errors import ShapeError
from ..model import ImplicitModel

TORCH_DTYPES = ("float64", "float32")
SOLVERS = ("adam", "sgd", "gradient", "bcd", "frank_wolfe")  # "gradient" is "adam"; see bcd.py, frank_wolfe.py
SOLVER_TOLERANCE = {"float64": 1e-6, "float32": 1e-5}  # training solves: gradients need no more
SCHEDULES = ("constant", "adaptive")
ADAPTIVE_DECAY = 5.0  # "adaptive": the step size is divided by this on each plateau ...
ADAPTIVE_FLOOR = 1e-3  # ... until it falls under this fraction of the initial one
MIN_VALIDATION_SAMPLES = 2  # below this the validation split is skipped (training loss is watched instead)
# Models storing at most this many weights train on one thread: their products are too small to gain
# from threads, whose start-up then dominates (10x slower on two busy cores).
SINGLE_THREAD_NONZEROS = 200_000
SCALE_FLOOR = 1.0  # input scales are at least this times the median feature's standard deviation


# ------------------------------------------------------------------------------- standardization
def standardize_model(
    model: ImplicitModel,
    input_mean: np.ndarray,
    input_scale: np.ndarray,
    output_mean: np.ndarray | None = None,
    output_scale: np.ndarray | None = None,
) -> ImplicitModel:
    """The model X -> r * model((X - mu) / s) + nu, with the affine maps folded into B, D and the biases.

    B' = B S^-1, b_x' = b_x - B S^-1 mu, C' = R C, D' = R D S^-1, b_y' = R (b_y - D S^-1 mu) + nu
    (S = diag(s), R = diag(r)). The inverse map is the same function with mu -> -mu / s,
    s -> 1 / s, nu -> -nu / r, r -> 1 / r. Blocks, input and output specs are kept.
    """
    dtype = model.dtype
    mu, s = np.asarray(input_mean, dtype=np.float64), np.asarray(input_scale, dtype=np.float64)
    nu = np.zeros(model.q) if output_mean is None else np.asarray(output_mean, dtype=np.float64)
    r = np.ones(model.q) if output_scale is None else np.asarray(output_scale, dtype=np.float64)
    if mu.shape != (model.p,) or s.shape != (model.p,) or nu.shape != (model.q,) or r.shape != (model.q,):
        raise ShapeError(
            f"standardization: expected input mean/scale of length p = {model.p} and output mean/scale of "
            f"length q = {model.q}, got {mu.shape}, {s.shape}, {nu.shape}, {r.shape}"
        )
    inverse_scale = sp.diags_array(1.0 / s)
    output_diag = sp.diags_array(r)
    B, D = model.B.astype(np.float64), model.D.astype(np.float64)
    shift = mu / s
    return ImplicitModel(
        model.A,
        sp.csr_array(B @ inverse_scale).astype(dtype),
        sp.csr_array(output_diag @ model.C.astype(np.float64)).astype(dtype),
        sp.csr_array(output_diag @ D @ inverse_scale).astype(dtype),
        (model.bias_x - B @ shift).astype(dtype),
        (r * (model.bias_y - D @ shift) + nu).astype(dtype),
        model.blocks,
        model.inputs,
        model.outputs,
    )


def _mean_and_scale(values: np.ndarray, floor: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Column means and scales: standard deviations, at least ``SCALE_FLOOR`` x their median.

    Why a floor. Standardizing divides column j by its spread s_j, and the fitted model folds that
    into B' = B S^-1: a change d of input j moves the network's input by d / s_j. A near-constant
    feature (on sklearn's 8x8 digits, pixels with standard deviations of 0.02-0.1 that are 0 in
    all but a few images) then turns an ordinary in-range value into tens or hundreds of
    standardized units, through weights that training has barely touched, and one such pixel
    flipped every prediction of a default ``ImplicitClassifier``. Its training spread says nothing
    about the values it can take, so the scale of the data as a whole is the safer unit:

        s_j = max(std_j, SCALE_FLOOR * median_k std_k)   (median over the non-constant features),

    i.e. no feature's unit change counts for more than the typical feature's. Features already
    in common units (pixels, spectra) are then scaled as the typical one is; with mixed units a
    feature spread less than the median enters with a standard deviation below 1 (std_j /
    median), which the weights make up for (Adam's steps do not depend on their scale). The
    median, unlike the mean or the largest spread, is not moved by a few large-unit features.
    Constant features (spread under 10 eps |mean|) get the floor too; 1 when every feature is
    constant. ``floor=False`` (the regressor's targets: a small output scale shrinks, never
    amplifies) keeps each standard deviation, a constant column's replaced by 1.
    """
    mean = values.mean(axis=0)
    spread = values.std(axis=0)
    constant = spread < 10 * np.finfo(np.float64).eps * np.maximum(1.0, np.abs(mean))
    if not floor or constant.all():
        return mean, np.where(constant, 1.0, spread)
    lowest = SCALE_FLOOR * float(np.median(spread[~constant]))
    return mean, np.where(constant, lowest, np.maximum(spread, lowest))


# ------------------------------------------------------------------------------- shared fitting
class _ImplicitEstimator(BaseEstimator):
    """Parameters and the training loop shared by ``ImplicitRegressor`` and ``ImplicitClassifier``.

    Args:
        n_states: number of hidden states n (ignored with ``init_model``).
        activation: the componentwise activation phi (ignored with ``init_model``).
        kappa: the bound kept on ||A||_inf after every step (< 1: the model stays well-posed).
        structure: "dense" (A full, cyclic) or "triangular" (A strictly lower triangular: acyclic).
        feedthrough: train the direct term D (y = C x + D u + b_y). False keeps D as it starts (zero
            for a random start): inputs then reach y only through B and the states, which makes
            the penalties on B's columns a feature selection (else D can carry the inputs they drop).
        solver: "adam" (alias "gradient"), "sgd" (plain stochastic gradient: with ``column_linf`` or
            ``group_lasso`` each step is then an exact proximal gradient step, so the columns whose
            gradient stays under lambda end exactly zero; Adam's per-weight steps keep moving zeroed
            columns), "bcd" (block-coordinate descent on the Fenchel relaxation, ``bcd.py``: relu /
            leaky relu, no group lasso; learning_rate, batch_size, early_stopping and the schedule do
            not apply), or "frank_wolfe": Frank-Wolfe steps on A over ||A||_inf <= kappa from A = 0
            (sparse A, no projection), Adam on the rest (``frank_wolfe.py``; ``frank_wolfe_history_``
            holds the gap).
        learning_rate: the optimizer's (initial) step size.
        learning_rate_schedule: "constant", or "adaptive": when the watched loss has not improved for
            ``n_iter_no_change`` epochs the step size is divided by 5 and training goes on; it stops
            once the step size falls under ``learning_rate`` / 1000.
        max_epochs: the most passes over the training set.
        batch_size: samples per mini-batch (capped at the training set size).
        alpha: the L2 penalty (alpha / 2) ||W||_F^2 on A, B, C and D.
        column_linf: lambda of the feature-selection penalty lambda sum_j ||B e_j||_inf, applied by
            its exact prox after each step (columns whose l1 norm is under lr * lambda become
            exactly zero: the input is dropped). With ``solver="sgd"`` each step is a proximal
            gradient step. With Adam, whose per-weight steps the prox does not match, we saw no
            column zeroed until lambda zeroed them all (docs/training.md); use "sgd", started
            from a fitted model (``init_model``) when a large lambda kills every column at once,
            and with a small ``alpha``: B alone penalized, C grows as B shrinks (relu is positively
            homogeneous) and zeroed columns come back.
        group_lasso: lambda of the column group lasso lambda sum_j ||B e_j||_2 (an l2 alternative).
        robustness: weight of the robustness penalty (||B||_inf^2 + ||C||_inf^2) / (2 (1 - ||A||_inf))
            + ||D||_inf (``penalties.robustness_penalty``, a bound on the l_inf Lipschitz constant
            of the standardized model for 1-Lipschitz activations) added to the loss.
        early_stopping: hold out ``validation_fraction`` of the data and stop on its loss.
        validation_fraction: the held-out share, in (0, 1).
        n_iter_no_change: epochs without an improvement larger than ``tol`` before stopping.
        tol: the improvement of the watched loss that counts.
        solver_tol: the tolerance of the training solves (forward and adjoint), on each sample's
            estimated relative error; None: 1e-6 in float64, 1e-5 in float32. ``predict`` solves ``model_`` to
            the runtime's default (1e-10 in float64).
        init_model: an ImplicitModel to start from (X -> y or logits, raw units); its sparsity
            pattern is kept, its A projected to ||A||_inf <= kappa first (``analysis.rescale`` it
            beforehand when that is far off). ``from_model`` builds a fitted estimator from one
            without training.
        dtype: "float64" (default) or "float32", for torch and for ``model_``.
        random_state: seeds the initial model, the validation split and the shuffling.
        verbose: > 0 prints one line per epoch (per round for "bcd") on stderr.
        type_of_training: "bcd" only: "two_loops" or "one_loop".
        rounds: "bcd" only: dual steps (rounds) to run.
        dual_learning_rate: "bcd" only: lambda_i += dual_learning_rate * F_i where F_i > tol_fenchel.
        tol_fenchel: "bcd" only: the divergence above which a unit's dual variable grows.
        starting_lambda: "bcd" only: the dual variables' initial value.

    ``fit(X, y, eval_set=(X_val, y_val))`` watches (X_val, y_val): for "bcd" its loss is recorded per
    round (``history_.eval_loss``, nothing is selected on it); for the gradient solvers it replaces the
    held-out split and is watched for early stopping (even with ``early_stopping=False``).
    """

    def __init__(
        self,
        n_states: int = 20,
        activation: str = "relu",
        kappa: float = 0.95,
        structure: str = "dense",
        feedthrough: bool = True,
        solver: str = "adam",
        learning_rate: float = 1e-2,
        learning_rate_schedule: str = "constant",
        max_epochs: int = 200,
        batch_size: int = 64,
        alpha: float = 0.0,
        column_linf: float = 0.0,
        group_lasso: float = 0.0,
        robustness: float = 0.0,
        early_stopping: bool = True,
        validation_fraction: float = 0.1,
        n_iter_no_change: int = 10,
        tol: float = 1e-4,
        solver_tol: float | None = None,
        init_model: ImplicitModel | None = None,
        dtype: str = "float64",
        random_state: Any = None,
        verbose: int = 0,
        type_of_training: str = "two_loops",
        rounds: int = 20,
        dual_learning_rate: float = 10.0,
        tol_fenchel: float = 1e-4,
        starting_lambda: float = 10.0,
    ):
        self.n_states = n_states
        self.activation = activation
        self.kappa = kappa
        self.structure = structure
        self.feedthrough = feedthrough
        self.solver = solver
        self.learning_rate = learning_rate
        self.learning_rate_schedule = learning_rate_schedule
        self.max_epochs = max_epochs
        self.batch_size = batch_size
        self.alpha = alpha
        self.column_linf = column_linf
        self.group_lasso = group_lasso
        self.robustness = robustness
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.n_iter_no_change = n_iter_no_change
        self.tol = tol
        self.solver_tol = solver_tol
        self.init_model = init_model
        self.dtype = dtype
        self.random_state = random_state
        self.verbose = verbose
        self.type_of_training = type_of_training
        self.rounds = rounds
        self.dual_learning_rate = dual_learning_rate
        self.tol_fenchel = tol_fenchel
        self.starting_lambda = starting_lambda

    # Subclasses define: _loss(torch, outputs, targets), _validation_score(outputs, targets),
    # _split_stratify(targets) and the target standardization handed to _train.

    def _check_params(self) -> None:
        if not 0 < self.kappa < 1:
            raise ValueError(f"kappa must be in (0, 1) for a well-posed model, got {self.kappa!r}")
        if self.dtype not in TORCH_DTYPES:
            raise ValueError(f"dtype must be one of {TORCH_DTYPES}, got {self.dtype!r}")
        arguments.choice(self.solver, SOLVERS, "solver")  # ArgumentValueError / ArgumentTypeError
        if self.learning_rate_schedule not in SCHEDULES:
            raise ValueError(f"learning_rate_schedule must be one of {SCHEDULES}, got {self.learning_rate_schedule!r}")
        if self.structure not in ("dense", "triangular"):
            raise ValueError(f"structure must be 'dense' or 'triangular', got {self.structure!r}")
        for name in ("n_states", "max_epochs", "batch_size", "n_iter_no_change"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0 < self.validation_fraction < 1:
            raise ValueError(f"validation_fraction must be in (0, 1), got {self.validation_fraction!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate!r}")
        if self.solver_tol is not None and not self.solver_tol > 0:
            raise ValueError(f"solver_tol must be positive or None, got {self.solver_tol!r}")
        for name in ("alpha", "column_linf", "group_lasso", "robustness", "tol"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be non-negative, got {getattr(self, name)!r}")
        if self.solver == "bcd":
            from .bcd import check_estimator

            check_estimator(self)

    def _initial_module(
        self,
        torch: Any,
        n_features: int,
        n_outputs: int,
        seed: int,
        output_mean: np.ndarray,
        output_scale: np.ndarray,
    ) -> Any:
        """The module to train: random, or ``init_model`` moved to standardized coordinates."""
        from .torch_bridge import ImplicitModule

        torch_dtype = getattr(torch, self.dtype)
        if self.init_model is None:
            return ImplicitModule.random(
                self.n_states,
                n_features,
                n_outputs,
                activation=self.activation,
                kappa=self.kappa,
                structure=self.structure,
                seed=seed,
                dtype=torch_dtype,
                tol=self._solver_tol(),
                trainable=self._trainable(),
            )
        model = self.init_model
        if (model.p, model.q) != (n_features, n_outputs):
            raise ShapeError(
                f"init_model maps p = {model.p} inputs to q = {model.q} outputs, but the data have "
                f"{n_features} features and {n_outputs} outputs"
            )
        standardized = standardize_model(
            model.astype(np.float64),
            -self.input_mean_ / self.input_scale_,
            1.0 / self.input_scale_,
            -output_mean / output_scale,
            1.0 / output_scale,
        )
        return ImplicitModule.from_model(
            standardized, dtype=torch_dtype, tol=self._solver_tol(), trainable=self._trainable()
        )

    def _solver_tol(self) -> float:
        if self.solver_tol is not None:
            return float(self.solver_tol)
        return SOLVER_TOLERANCE[self.dtype]

    def _trainable(self) -> tuple[str, ...]:
        """The names of the module's trained weights (D only with ``feedthrough``)."""
        return ("A", "B", "C", "D", "bias_x", "bias_y") if self.feedthrough else ("A", "B", "C", "bias_x", "bias_y")

    def _train(
        self,
        X: np.ndarray,
        targets: np.ndarray,
        n_outputs: int,
        output_mean: np.ndarray,
        output_scale: np.ndarray,
        eval_set: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> None:
        """Standardize X, train the module on (u, targets) and set the fitted attributes.

        ``eval_set``: (X_val, targets_val) in the same units as (X, targets), or None.
        """
        import torch

        self._check_params()
        rng = check_random_state(self.random_state)
        seed = int(rng.randint(np.iinfo(np.int32).max))
        self.input_mean_, self.input_scale_ = _mean_and_scale(X)
        torch_dtype = getattr(torch, self.dtype)
        module = self._initial_module(torch, X.shape[1], n_outputs, seed, output_mean, output_scale)
        module.project_(self.kappa)
        if self.solver == "bcd":
            from .bcd import fit_estimator

            standardized = fit_estimator(self, module.to_model(), X, targets, eval_set)
            self.model_ = standardize_model(
                standardized.astype(np.float64), self.input_mean_, self.input_scale_, output_mean, output_scale
            ).astype(self.dtype)
            return
        train_rows, validation_rows = self._split(targets, rng)
        if eval_set is not None:  # the eval rows follow the training rows and replace the split
            train_rows, validation_rows = np.arange(len(X)), np.arange(len(X), len(X) + len(eval_set[0]))
            X, targets = np.concatenate([X, eval_set[0]]), np.concatenate([targets, eval_set[1]])
        inputs = torch.as_tensor((X - self.input_mean_) / self.input_scale_, dtype=torch_dtype)
        target_tensor = torch.as_tensor(targets, dtype=torch_dtype if targets.dtype.kind == "f" else torch.int64)
        stored = sum(getattr(module, f"{name}_pattern").nnz for name in "ABCD")
        with _torch_threads(torch, 1 if stored <= SINGLE_THREAD_NONZEROS else None):
            converged = self._optimize(torch, module, inputs, target_tensor, train_rows, validation_rows, rng)
        if not converged:
            warnings.warn(
                f"{type(self).__name__}: stopped at max_epochs = {self.max_epochs} while the loss was still "
                "improving; raise max_epochs or learning_rate",
                ConvergenceWarning,
                stacklevel=3,
            )
        standardized = module.to_model().astype(np.float64)
        self.model_ = standardize_model(
            standardized, self.input_mean_, self.input_scale_, output_mean, output_scale
        ).astype(self.dtype)

    def _optimize(
        self,
        torch: Any,
        module: Any,
        inputs: Any,
        targets: Any,
        train_rows: np.ndarray,
        validation_rows: np.ndarray | None,
        rng: np.random.RandomState,
    ) -> bool:
        """Epochs of mini-batch steps (``_GradientSteps``: the optimizer, then the prox and the
        projection; or ``frank_wolfe.FrankWolfeSteps``); True when stopped early.

        Sets ``loss_curve_``, ``validation_loss_curve_``, ``validation_scores_``, ``n_iter_`` and
        ``best_loss_``; restores the best epoch's parameters when a validation split is watched.
        """
        batch_size = min(self.batch_size, len(train_rows))
        if self.solver == "frank_wolfe":
            from .frank_wolfe import FrankWolfeSteps

            steps = FrankWolfeSteps(self, torch, module, -(-len(train_rows) // batch_size))
        else:
            steps = _GradientSteps(self, torch, module)
        step_size = self.learning_rate
        self.loss_curve_, self.validation_scores_, self.validation_loss_curve_ = [], [], []
        best_loss, best_state, epochs_without_improvement = np.inf, None, 0
        self.n_iter_, stopped, start = 0, False, time.perf_counter()
        for epoch in range(1, self.max_epochs + 1):
            order = rng.permutation(train_rows)
            total = 0.0
            for first in range(0, len(order), batch_size):
                rows = torch.as_tensor(order[first : first + batch_size])
                module.zero_grad()
                loss = self._loss(torch, module(inputs[rows]), targets[rows]) + self._penalty(module)
                loss.backward()
                steps.step(step_size)
                total += float(loss.detach()) * len(rows)
            self.loss_curve_.append(total / len(order))
            self.n_iter_ = epoch
            watched = self.loss_curve_[-1]
            if validation_rows is not None:
                with torch.no_grad():
                    outputs = module(inputs[validation_rows])
                    watched = float(self._loss(torch, outputs, targets[validation_rows]))
                self.validation_loss_curve_.append(watched)
                score = self._validation_score(outputs.numpy(), targets[validation_rows].numpy())
                self.validation_scores_.append(score)
            if self.verbose:
                self._print_epoch(epoch, time.perf_counter() - start)
            epochs_without_improvement = 0 if watched < best_loss - self.tol else epochs_without_improvement + 1
            if watched < best_loss:
                best_loss = watched
                if validation_rows is not None:
                    best_state = copy.deepcopy(module.state_dict())
            if steps.end_epoch():
                stopped = True
                break
            if epochs_without_improvement < self.n_iter_no_change:
                continue
            smaller = step_size / ADAPTIVE_DECAY
            if self.learning_rate_schedule == "adaptive" and smaller >= ADAPTIVE_FLOOR * self.learning_rate:
                step_size, epochs_without_improvement = smaller, 0
                steps.set_learning_rate(step_size)
                if self.verbose:
                    print(f"plateau: learning rate divided by {ADAPTIVE_DECAY:g}, now {step_size:.3g}", file=sys.stderr)
                continue
            stopped = True
            break
        if best_state is not None:
            module.load_state_dict(best_state)
        self.best_loss_ = float(best_loss)
        steps.finish()
        return stopped

    def _split(self, targets: np.ndarray, rng: np.random.RandomState) -> tuple[np.ndarray, np.ndarray | None]:
        """Training rows and validation rows (None without early stopping or with too few samples)."""
        rows = np.arange(len(targets))
        n_validation = int(np.ceil(self.validation_fraction * len(rows)))
        if not self.early_stopping or n_validation < MIN_VALIDATION_SAMPLES or len(rows) - n_validation < 1:
            return rows, None
        stratify = self._split_stratify(targets, n_validation)
        train_rows, validation_rows = train_test_split(
            rows, test_size=n_validation, random_state=rng.randint(np.iinfo(np.int32).max), stratify=stratify
        )
        return np.sort(train_rows), np.sort(validation_rows)

    def _penalty(self, module: Any) -> Any:
        """The penalties added to the loss: ``_l2`` and ``_robustness``."""
        return self._l2(module) + self._robustness(module)

    def _prox_(self, module: Any, step_size: float) -> None:
        """The column penalties' proximal steps on B after an optimizer step of size ``step_size``."""
        from .penalties import prox_column_group_lasso_, prox_column_linf_

        if self.column_linf > 0:
            prox_column_linf_(module, step_size * self.column_linf)
        if self.group_lasso > 0:
            prox_column_group_lasso_(module, step_size * self.group_lasso)

    def _l2(self, module: Any) -> Any:
        """(alpha / 2) times the squared Frobenius norms of A, B, C and D (0 when alpha = 0)."""
        if self.alpha == 0:
            return 0.0
        return 0.5 * self.alpha * sum((values**2).sum() for values in _matrix_values(module))

    def _robustness(self, module: Any) -> Any:
        """robustness x ``penalties.robustness_penalty(module)`` (0 when robustness = 0)."""
        if self.robustness == 0:
            return 0.0
        from .penalties import robustness_penalty

        return self.robustness * robustness_penalty(module)

    def _print_epoch(self, epoch: int, seconds: float) -> None:
        line = f"epoch {epoch:>4}/{self.max_epochs}: loss {self.loss_curve_[-1]:.6f}"
        if self.validation_scores_:
            line += f", validation loss {self.validation_loss_curve_[-1]:.6f}, score {self.validation_scores_[-1]:.4f}"
        print(f"{line} ({seconds:.1f} s)", file=sys.stderr, flush=True)

    def _set_fitted_from(self, model: ImplicitModel) -> None:
        """Fitted attributes for an estimator that predicts exactly as ``model`` (no training)."""
        self.model_ = model
        self.n_features_in_ = model.p
        self.input_mean_, self.input_scale_ = np.zeros(model.p), np.ones(model.p)
        self.loss_curve_, self.validation_scores_, self.validation_loss_curve_ = [], [], []
        self.n_iter_ = 0

    def _equilibrium_outputs(self, X: Any) -> np.ndarray:
        """y = C x + D X + b_y of ``model_`` at the equilibrium, (n_samples, q)."""
        check_is_fitted(self, "model_")
        X = validate_data(self, X, reset=False, dtype=np.float64)
        return self.model_.solve(X.astype(self.model_.dtype, copy=False)).y


class _GradientSteps:
    """The mini-batch steps of the gradient solvers: Adam (or SGD) on every weight, then the
    column penalties' prox and the projection onto ||A||_inf <= kappa."""

    def __init__(self, estimator: _ImplicitEstimator, torch: Any, module: Any):
        optimizer_class = torch.optim.SGD if estimator.solver == "sgd" else torch.optim.Adam
        # fused: one kernel per step for all the weights (Adam on 250k float64 values: 0.34 ms
        # against 1.7 ms for the loop over tensors)
        self.optimizer = optimizer_class(module.parameters(), lr=estimator.learning_rate, fused=True)
        self.estimator, self.torch, self.module = estimator, torch, module

    def step(self, step_size: float) -> None:
        self.optimizer.step()
        with self.torch.no_grad():
            self.estimator._prox_(self.module, step_size)
            self.module.project_(self.estimator.kappa)

    def set_learning_rate(self, step_size: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = step_size

    def end_epoch(self) -> bool:
        return False  # no stopping rule of its own

    def finish(self) -> None:
        pass


@contextmanager
def _torch_threads(torch: Any, count: int | None) -> Iterator[None]:
    """Run with ``count`` torch threads (None: leave the setting alone), restored afterwards."""
    previous = torch.get_num_threads()
    if count is None or count == previous:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _check_eval_set(estimator: Any, eval_set: Any, y_numeric: bool) -> tuple[np.ndarray, np.ndarray]:
    """(X_val, y_val) as float64 X with the training features and a y of the same length."""
    if not isinstance(eval_set, (tuple, list)) or len(eval_set) != 2:
        raise ShapeError(f"eval_set: expected a pair (X_val, y_val), got {type(eval_set).__name__}")
    eval_X = check_array(eval_set[0], dtype=np.float64)
    eval_y = np.asarray(eval_set[1], dtype=np.float64 if y_numeric else None)
    if eval_X.shape[1] != estimator.n_features_in_ or len(eval_y) != len(eval_X):
        raise ShapeError(
            f"eval_set: expected X_val with {estimator.n_features_in_} features and one y_val per row, got "
            f"X_val {eval_X.shape} and y_val {eval_y.shape}"
        )
    return eval_X, eval_y


def _matrix_values(module: Any) -> list[Any]:
    """The trainable values of A, B, C and D in an ImplicitModule (biases excluded)."""
    return [parameter for name, parameter in module.named_parameters() if name.split("_")[0] in ("A", "B", "C", "D")]


# ------------------------------------------------------------------------------- regressor
class ImplicitRegressor(RegressorMixin, _ImplicitEstimator):
    """An implicit model fitted by mean squared error; one or several outputs.

    Fitted attributes: ``model_`` (the ImplicitModel from raw X to raw y), ``n_features_in_``,
    ``loss_curve_`` (training loss per epoch, standardized units), ``validation_scores_`` (R^2 on
    the held-out split per epoch), ``validation_loss_curve_``, ``n_iter_`` (epochs run),
    ``input_mean_``, ``input_scale_``, ``target_mean_``, ``target_scale_``.
    """

    def fit(self, X: Any, y: Any, eval_set: tuple[Any, Any] | None = None) -> ImplicitRegressor:
        """Train on X (n_samples, n_features) and y (n_samples,) or (n_samples, n_outputs).

        ``eval_set``: (X_val, y_val) watched during training (see the class parameters).
        """
        X, y = validate_data(self, X, y, multi_output=True, y_numeric=True, dtype=np.float64)
        Y = np.asarray(y, dtype=np.float64)
        self._single_output = Y.ndim == 1
        Y = Y.reshape(len(Y), -1)
        self.target_mean_, self.target_scale_ = _mean_and_scale(Y, floor=False)
        targets = (Y - self.target_mean_) / self.target_scale_
        evaluation = None
        if eval_set is not None:
            eval_X, eval_y = _check_eval_set(self, eval_set, y_numeric=True)
            eval_Y = eval_y.astype(np.float64).reshape(len(eval_y), -1)
            if eval_Y.shape[1] != Y.shape[1]:
                raise ShapeError(f"eval_set: y_val has {eval_Y.shape[1]} outputs, the training y {Y.shape[1]}")
            evaluation = (eval_X, (eval_Y - self.target_mean_) / self.target_scale_)
        self._train(X, targets, Y.shape[1], self.target_mean_, self.target_scale_, evaluation)
        return self

    def predict(self, X: Any) -> np.ndarray:
        """The equilibrium prediction y for each row of X."""
        outputs = self._equilibrium_outputs(X)
        return outputs.ravel() if getattr(self, "_single_output", outputs.shape[1] == 1) else outputs

    @classmethod
    def from_model(cls, model: ImplicitModel, **params: Any) -> ImplicitRegressor:
        """A fitted estimator predicting exactly ``model.solve(X).y`` (raveled when q = 1).

        ``init_model`` is set to ``model``, so a later ``fit`` fine-tunes it (pattern kept).
        """
        estimator = cls(init_model=model, n_states=model.n, **params)
        estimator._set_fitted_from(model)
        estimator._single_output = model.q == 1
        estimator.target_mean_, estimator.target_scale_ = np.zeros(model.q), np.ones(model.q)
        return estimator

    def _loss(self, torch: Any, outputs: Any, targets: Any) -> Any:
        return torch.nn.functional.mse_loss(outputs, targets)

    def _validation_score(self, outputs: np.ndarray, targets: np.ndarray) -> float:
        return float(r2_score(targets, outputs))

    def _split_stratify(self, targets: np.ndarray, n_validation: int) -> None:
        return None

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags


# ------------------------------------------------------------------------------- classifier
class ImplicitClassifier(ClassifierMixin, _ImplicitEstimator):
    """An implicit model whose outputs are class logits, fitted by cross-entropy.

    Two classes: one logit y, P(classes_[1]) = sigmoid(y). K > 2 classes: K logits,
    P = softmax(y). Fitted attributes as ``ImplicitRegressor`` (``validation_scores_`` hold the
    held-out accuracy) plus ``classes_``.
    """

    def fit(self, X: Any, y: Any, eval_set: tuple[Any, Any] | None = None) -> ImplicitClassifier:
        """Train on X (n_samples, n_features) and class labels y (n_samples,).

        ``eval_set``: (X_val, y_val) watched during training, labels among y's (see the class parameters).
        """
        X, y = validate_data(self, X, y, dtype=np.float64)
        check_classification_targets(y)
        encoder = LabelEncoder().fit(y)
        self.classes_ = encoder.classes_
        if len(self.classes_) < 2:
            raise ValueError(
                f"ImplicitClassifier needs samples of at least 2 classes, got 1 class: {self.classes_[0]!r}"
            )
        codes = encoder.transform(y)
        binary = len(self.classes_) == 2
        targets = codes.astype(np.float64).reshape(-1, 1) if binary else codes.astype(np.int64)
        n_outputs = 1 if binary else len(self.classes_)
        evaluation = None
        if eval_set is not None:
            eval_X, eval_y = _check_eval_set(self, eval_set, y_numeric=False)
            eval_codes = encoder.transform(eval_y)
            eval_targets = eval_codes.astype(np.float64).reshape(-1, 1) if binary else eval_codes.astype(np.int64)
            evaluation = (eval_X, eval_targets)
        self._train(X, targets, n_outputs, np.zeros(n_outputs), np.ones(n_outputs), evaluation)
        return self

    def decision_function(self, X: Any) -> np.ndarray:
        """The logits: (n_samples,) for two classes, (n_samples, n_classes) otherwise."""
        logits = self._equilibrium_outputs(X)
        return logits.ravel() if len(self.classes_) == 2 else logits

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities (n_samples, n_classes): sigmoid or softmax of the logits."""
        logits = self._equilibrium_outputs(X).astype(np.float64)
        if len(self.classes_) == 2:
            positive = 0.5 * (1.0 + np.tanh(0.5 * logits[:, 0]))  # sigmoid without overflow
            return np.column_stack([1.0 - positive, positive])
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        return shifted / shifted.sum(axis=1, keepdims=True)

    def predict_log_proba(self, X: Any) -> np.ndarray:
        """Logarithm of ``predict_proba``."""
        with np.errstate(divide="ignore"):
            return np.log(self.predict_proba(X))

    def predict(self, X: Any) -> np.ndarray:
        """The most probable class of each row of X."""
        logits = self._equilibrium_outputs(X)
        codes = (logits[:, 0] > 0).astype(int) if len(self.classes_) == 2 else logits.argmax(axis=1)
        return self.classes_[codes]

    @classmethod
    def from_model(cls, model: ImplicitModel, classes: Any = None, **params: Any) -> ImplicitClassifier:
        """A fitted estimator whose logits are ``model.solve(X).y``.

        Args:
            model: maps X to one logit (two classes) or to one logit per class.
            classes: the class labels, default 0..q-1 (0, 1 when q = 1).
        """
        if classes is None:
            classes = np.arange(2 if model.q == 1 else model.q)
        classes = np.asarray(classes)
        expected = 2 if model.q == 1 else model.q
        if len(classes) != expected:
            raise ShapeError(f"a model with q = {model.q} logits stands for {expected} classes, got {len(classes)}")
        estimator = cls(init_model=model, n_states=model.n, **params)
        estimator._set_fitted_from(model)
        estimator.classes_ = classes
        return estimator

    def _loss(self, torch: Any, outputs: Any, targets: Any) -> Any:
        if targets.dtype == torch.int64:
            return torch.nn.functional.cross_entropy(outputs, targets)
        return torch.nn.functional.binary_cross_entropy_with_logits(outputs, targets)

    def _validation_score(self, outputs: np.ndarray, targets: np.ndarray) -> float:
        predicted = (outputs[:, 0] > 0).astype(int) if outputs.shape[1] == 1 else outputs.argmax(axis=1)
        return float(accuracy_score(targets.ravel().astype(int), predicted))

    def _split_stratify(self, targets: np.ndarray, n_validation: int) -> np.ndarray | None:
        labels = targets.ravel().astype(int)
        counts = np.bincount(labels)
        n_classes = int((counts > 0).sum())
        if counts[counts > 0].min() < 2 or n_validation < n_classes or len(labels) - n_validation < n_classes:
            return None
        return labels
