"""Validation during training: macro-F1 averaged over sites, with its standard error."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score

from pipelines.model.validation import site_mean_macro_f1


def test_validation_weighs_each_site_alike() -> None:
    """Ten images of a new site move the score as much as a hundred of the home site."""
    truth = np.array([0, 1] * 50 + [0, 1] * 5)
    predicted = truth.copy()
    predicted[100:104] = 1 - predicted[100:104]  # four of the new site's ten wrong
    sites = ["home"] * 100 + ["new"] * 10
    score, standard_error = site_mean_macro_f1(truth, predicted, 2, sites)
    new_site = f1_score(truth[100:], predicted[100:], average="macro")
    assert new_site == pytest.approx(0.6)
    assert score == pytest.approx((1.0 + new_site) / 2)
    assert 0.05 < standard_error < 0.2  # the new site's ten images alone: the home site is perfect
    pooled, pooled_error = site_mean_macro_f1(truth, predicted, 2)
    assert pooled == pytest.approx(f1_score(truth, predicted, average="macro"))
    assert pooled > score
    assert pooled_error < standard_error


def test_perfect_predictions_have_no_standard_error() -> None:
    truth = np.arange(30) % 3
    assert site_mean_macro_f1(truth, truth.copy(), 3, ["a"] * 15 + ["b"] * 15) == (1.0, 0.0)
