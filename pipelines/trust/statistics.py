"""The gate's interval arithmetic: exact binomial bounds, a paired bootstrap of macro-F1, exact McNemar.

Pure functions over counts and per-image class indices. Every bound the gate judges is one-sided (a floor
needs a lower bound, a ceiling an upper one) at ``confidence``; two-sided intervals are for the report.

- ``clopper_pearson``: the exact (beta-quantile) binomial interval of k successes in n, e.g. the shortcut
  flip rate (upper bound) and a class's recall (lower bound).
- ``bootstrap_macro_f1``: percentile bootstrap of macro-F1, of one model or of the paired difference of two
  models predicting the SAME images (each resample draws images, both models' predictions with them).
- ``mcnemar_exact``: statsmodels' exact McNemar test on the discordant pairs, reported beside the bootstrap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy.stats import beta
from statsmodels.stats.contingency_tables import mcnemar

from pipelines.core.errors import LeukopsError
from pipelines.model.evaluate import resampled_macro_f1

Side = Literal["two-sided", "upper", "lower"]


class StatisticsInputError(LeukopsError, ValueError):
    """Counts or predictions the statistics cannot be computed from (the message says why)."""


def clopper_pearson(k: int, n: int, confidence: float = 0.95, side: Side = "two-sided") -> tuple[float, float]:
    """(low, high) exact binomial bounds of k/n; a one-sided bound leaves the other end at 0 or 1."""
    if n <= 0 or not 0 <= k <= n:
        raise StatisticsInputError(f"Clopper-Pearson needs 0 <= k <= n and n > 0, got k={k}, n={n}")
    tail = 1 - confidence if side != "two-sided" else (1 - confidence) / 2
    low = 0.0 if k == 0 or side == "upper" else float(beta.ppf(tail, k, n - k + 1))
    high = 1.0 if k == n or side == "lower" else float(beta.ppf(1 - tail, k + 1, n - k))
    return low, high


@dataclass(frozen=True)
class BootstrapF1:
    """Macro-F1 (or the paired difference candidate - baseline): point value and percentile bounds."""

    point: float
    lower: float  # one-sided lower bound at ``confidence``
    interval: tuple[float, float]  # two-sided interval at ``confidence``
    resamples: int
    seed: int
    n: int


def bootstrap_macro_f1(
    truth: np.ndarray,
    predicted: np.ndarray,
    num_classes: int,
    baseline: np.ndarray | None = None,
    *,
    resamples: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> BootstrapF1:
    """Macro-F1 of ``predicted``, or with ``baseline`` the paired difference F1(predicted) - F1(baseline).

    The classes averaged are those present in the full ``truth`` (the same set in every resample); a
    resample that misses a rare class and predicts it nowhere scores it 1, one that predicts it falsely 0
    (``resampled_macro_f1``).
    """
    truth, predicted = np.asarray(truth, dtype=int), np.asarray(predicted, dtype=int)
    if truth.ndim != 1 or len(truth) == 0 or predicted.shape != truth.shape:
        raise StatisticsInputError(f"need one prediction per label, got {predicted.shape} for {truth.shape}")
    if baseline is not None and np.shape(baseline) != truth.shape:
        raise StatisticsInputError(f"paired baseline must predict the same {len(truth)} images")
    if resamples < 1:
        raise StatisticsInputError(f"bootstrap needs at least one resample, got {resamples}")
    draws = np.random.default_rng(seed).integers(0, len(truth), size=(resamples, len(truth)))
    everything = np.arange(len(truth))[None, :]
    values = resampled_macro_f1(truth, predicted, num_classes, draws)
    point = float(resampled_macro_f1(truth, predicted, num_classes, everything)[0])
    if baseline is not None:
        baseline = np.asarray(baseline, dtype=int)
        values = values - resampled_macro_f1(truth, baseline, num_classes, draws)
        point -= float(resampled_macro_f1(truth, baseline, num_classes, everything)[0])
    tail = (1 - confidence) * 100
    low, high = np.percentile(values, [tail / 2, 100 - tail / 2])
    return BootstrapF1(
        point=point,
        lower=float(np.percentile(values, tail)),
        interval=(float(low), float(high)),
        resamples=resamples,
        seed=seed,
        n=len(truth),
    )


@dataclass(frozen=True)
class McNemar:
    """Exact McNemar test of two models on the same images: only-candidate-right vs only-baseline-right."""

    candidate_only: int
    baseline_only: int
    pvalue: float


def mcnemar_exact(truth: np.ndarray, predicted: np.ndarray, baseline: np.ndarray) -> McNemar:
    right, base_right = np.asarray(predicted) == np.asarray(truth), np.asarray(baseline) == np.asarray(truth)
    table = [
        [int(np.sum(right & base_right)), int(np.sum(right & ~base_right))],
        [int(np.sum(~right & base_right)), int(np.sum(~right & ~base_right))],
    ]
    result = mcnemar(table, exact=True)
    return McNemar(candidate_only=table[0][1], baseline_only=table[1][0], pvalue=float(result.pvalue))
