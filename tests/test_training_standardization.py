"""The estimators' input standardization: a floor on the scales, so that near-constant features
(corner pixels of the 8x8 digits) are not blown up into weights that one in-range value flips."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from implicit_compiler.training.estimators import SCALE_FLOOR, ImplicitClassifier, _mean_and_scale

pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")  # short trainings


def test_scales_have_a_floor_at_the_median_spread():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(500, 5)) * [3.0, 1.0, 0.01, 2.0, 5.0] + [1.0, 0.0, 4.0, -2.0, 0.0]
    X[:, 1] = 7.0  # constant
    mean, scale = _mean_and_scale(X)
    spread = X.std(axis=0)
    median = np.median(spread[[0, 2, 3, 4]])  # the non-constant features
    np.testing.assert_allclose(mean, X.mean(axis=0))
    np.testing.assert_allclose(scale, [spread[0], median, median, median, spread[4]])
    assert SCALE_FLOOR == 1.0 and median == pytest.approx(2.5, rel=0.1)  # (3 + 2) / 2
    _, unfloored = _mean_and_scale(X, floor=False)  # the regressor's targets
    np.testing.assert_allclose(unfloored, np.where(spread > 0, spread, 1.0))
    _, all_constant = _mean_and_scale(np.ones((4, 3)))
    np.testing.assert_array_equal(all_constant, np.ones(3))


def test_one_in_range_pixel_cannot_flip_most_digit_predictions():
    X, y = load_digits(return_X_y=True)  # pixels 0..16; 3 constant, several with std < 0.1
    X_train, X_test, y_train, _ = train_test_split(X, y, test_size=100, random_state=0, stratify=y)
    classifier = ImplicitClassifier(max_epochs=10, random_state=0).fit(X_train, y_train)
    predictions = classifier.predict(X_test)
    values = np.array([0.0, 4.0, 8.0, 12.0, 16.0])  # the range's ends and inside it
    changed = np.repeat(X_test[None, None], X.shape[1], axis=0).repeat(len(values), axis=1)
    for pixel in range(X.shape[1]):
        changed[pixel, :, :, pixel] = values[:, None]
    after = classifier.predict(changed.reshape(-1, X.shape[1])).reshape(X.shape[1], len(values), len(X_test))
    unchanged = (after == predictions).mean(axis=2)  # (pixel, value)
    pixel, value = np.unravel_index(unchanged.argmin(), unchanged.shape)
    assert unchanged.min() >= 0.8, (
        f"pixel {pixel} set to {values[value]:g} changes {1 - unchanged.min():.0%} of the predictions"
    )
