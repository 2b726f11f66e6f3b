"""The gate's interval arithmetic against known values (exact binomial, paired bootstrap, McNemar)."""

import numpy as np
import pytest
from statsmodels.stats.proportion import proportion_confint

from pipelines.model.evaluate import macro_f1
from pipelines.trust.statistics import StatisticsInputError, bootstrap_macro_f1, clopper_pearson, mcnemar_exact


def test_clopper_pearson_matches_the_closed_forms_and_published_values():
    # 0 of n: the one-sided 95% upper bound is 1 - 0.05^(1/n) ("rule of three" ~ 3/n)
    assert clopper_pearson(0, 300, side="upper") == (0.0, pytest.approx(0.009936, abs=1e-6))
    assert clopper_pearson(0, 16, side="upper")[1] == pytest.approx(1 - 0.05 ** (1 / 16))
    # 2 of 32 (last round's shortcut measurement): two-sided 95% 0.0077-0.2081
    low, high = clopper_pearson(2, 32)
    assert (low, high) == (pytest.approx(0.00766, abs=1e-5), pytest.approx(0.20807, abs=1e-5))
    assert (low, high) == pytest.approx(proportion_confint(2, 32, alpha=0.05, method="beta"))
    # n of n: the one-sided lower bound is 0.05^(1/n)
    assert clopper_pearson(30, 30, side="lower") == (pytest.approx(0.05 ** (1 / 30)), 1.0)


def test_one_sided_bounds_are_the_two_sided_90_percent_ends():
    low, high = proportion_confint(7, 40, alpha=0.10, method="beta")
    assert clopper_pearson(7, 40, side="lower") == (pytest.approx(low), 1.0)
    assert clopper_pearson(7, 40, side="upper") == (0.0, pytest.approx(high))


def test_clopper_pearson_refuses_impossible_counts():
    with pytest.raises(StatisticsInputError, match="k=5, n=4"):
        clopper_pearson(5, 4)
    with pytest.raises(StatisticsInputError, match="n=0"):
        clopper_pearson(0, 0)


def _three_models(n=300, seed=0):
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 4, n)

    def noisy(accuracy):
        return np.where(rng.random(n) < accuracy, truth, rng.integers(0, 4, n))

    return truth, noisy(0.95), noisy(0.80)


def test_bootstrap_point_is_the_one_macro_f1_and_bounds_bracket_it():
    truth, good, _ = _three_models()
    boot = bootstrap_macro_f1(truth, good, 4, resamples=2000, seed=0)
    assert boot.point == pytest.approx(macro_f1(truth, good))
    assert boot.interval[0] < boot.lower < boot.point < boot.interval[1]
    assert (boot.resamples, boot.n) == (2000, 300)
    again = bootstrap_macro_f1(truth, good, 4, resamples=2000, seed=0)
    assert again == boot, "fixed seed: the same bound every time"


def test_paired_difference_separates_a_clearly_worse_model_and_not_itself():
    truth, good, worse = _three_models()
    better = bootstrap_macro_f1(truth, good, 4, worse)
    assert better.point == pytest.approx(macro_f1(truth, good) - macro_f1(truth, worse))
    assert better.lower > 0.05, "a 15-point accuracy gap on 300 images is resolved"
    assert bootstrap_macro_f1(truth, worse, 4, good).interval[1] < 0
    same = bootstrap_macro_f1(truth, good, 4, good)
    assert same.point == same.lower == same.interval[0] == same.interval[1] == 0.0


def test_paired_resampling_is_tighter_than_comparing_two_independent_intervals():
    truth, good, _ = _three_models()
    rng = np.random.default_rng(1)
    twin = np.where(rng.random(len(truth)) < 0.97, good, truth)  # agrees with `good` on most images
    paired = bootstrap_macro_f1(truth, twin, 4, good)
    own = [bootstrap_macro_f1(truth, p, 4).interval for p in (twin, good)]
    assert paired.interval[1] - paired.interval[0] < min(high - low for low, high in own)


def test_a_resample_that_misses_a_one_image_class_does_not_sink_the_bound():
    """One test image of a class (CellaVision's basophil): scored 0 when a resample draws none of it, ~37 %
    of the resamples would lose 1/C and a perfect model's lower bound would be (C - 1) / C."""
    truth = np.array([0] * 20 + [1] * 20 + [2])
    perfect = bootstrap_macro_f1(truth, truth, 3, resamples=2000, seed=0)
    assert perfect.point == perfect.lower == perfect.interval[0] == 1.0
    false_alarm = truth.copy()
    false_alarm[0] = 2  # a resample without the one class-2 image still scores this false claim 0
    boot = bootstrap_macro_f1(truth, false_alarm, 3, resamples=2000, seed=0)
    assert boot.point == pytest.approx(macro_f1(truth, false_alarm))
    assert boot.lower < boot.point < 1.0


def test_mcnemar_counts_the_discordant_pairs_and_is_exact():
    truth = np.zeros(20, dtype=int)
    candidate = np.zeros(20, dtype=int)
    champion = np.array([1] * 6 + [0] * 14)  # the champion misses 6 images the candidate gets right
    result = mcnemar_exact(truth, candidate, champion)
    assert (result.candidate_only, result.baseline_only) == (6, 0)
    assert result.pvalue == pytest.approx(2 * 0.5**6)  # exact binomial, two-sided


def test_bootstrap_refuses_unpaired_inputs():
    with pytest.raises(StatisticsInputError, match="same 3 images"):
        bootstrap_macro_f1([0, 1, 1], [0, 1, 0], 2, [0, 1])
