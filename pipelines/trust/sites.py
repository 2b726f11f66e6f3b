"""Sites are first-class in the gate: each source (lab) of the test split is judged on its own images.

A model that is good on average can fail one lab's stain, scanner or cell crops, so the gate adds, per
site of the candidate's test split (``SplitPredictions.sources``, the snapshot's ``source`` column):

- ``site_macro_f1[<site>]``: the site's macro-F1, judged like the overall floor on its one-sided
  percentile-bootstrap lower bound, against ``site_macro_f1_min`` (unset: the task's macro-F1 floor); the
  worst site decides;
- ``site_non_inferiority[<site>]``: F1(candidate) - F1(champion) on that site's images, the same paired
  bootstrap and exact McNemar as the overall non-inferiority, against ``-site_non_inferiority_margin``
  (unset: ``non_inferiority_margin``).

A site is scored on the classes its images carry (macro-F1 over those; a prediction into an absent class
is an error). A site with fewer than ``min_check_images`` test images is reported, not gated; a champion
whose predictions carry no sites (cached before per-site evaluation) is reported as not compared. With a
single site the overall checks already judge it, so only its figures are shown.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from pipelines.model.evaluate import macro_f1
from pipelines.trust.checks import Check, Claim, bound_name, judge, reported
from pipelines.trust.statistics import bootstrap_macro_f1, mcnemar_exact

if TYPE_CHECKING:
    from pipelines.core.settings import GateThresholds
    from pipelines.trust.gate import CandidateMetrics


@dataclass(frozen=True)
class SiteFigures:
    """One site's test figures (the gate report's per-site table), with the champion's beside them."""

    source: str
    n: int
    macro_f1: float  # over ``classes_scored``
    f1_lower: float  # one-sided lower bound at the gate's confidence
    f1_interval: tuple[float, float]  # two-sided, for the report
    accuracy: float
    classes_scored: tuple[str, ...]
    classes_absent: tuple[str, ...]
    predicted_absent: int  # predictions into an absent class (counted as errors)
    gated: bool  # judged (>= min_check_images images, >= 2 sites) or only reported
    champion_macro_f1: float | None = None
    f1_difference: float | None = None  # candidate - champion on the same images
    f1_difference_lower: float | None = None  # its one-sided paired-bootstrap lower bound
    mcnemar_pvalue: float | None = None


def site_thresholds(task: str, t: GateThresholds) -> tuple[float, float]:
    """(per-site macro-F1 floor, per-site non-inferiority margin) of ``task``."""
    floor = t.task_floors(task)[0] if t.site_macro_f1_min is None else t.site_macro_f1_min
    margin = t.non_inferiority_margin if t.site_non_inferiority_margin is None else t.site_non_inferiority_margin
    return floor, margin


def site_evidence(
    cand: CandidateMetrics, champ: CandidateMetrics | None, t: GateThresholds
) -> tuple[list[SiteFigures], list[Check]]:
    """Per-site figures and checks of a candidate (with the champion predicted on the same images, or
    None); no sites known (predictions without sources): nothing."""
    if cand.test is None or cand.test.sources is None:
        return [], []
    truth, predicted = cand.test.arrays()
    sources = np.asarray(cand.test.sources)
    baseline = _baseline(champ)
    several = len(np.unique(sources)) > 1
    figures = [
        _site_figures(cand.classes, site, truth[rows], predicted[rows], _at(baseline, rows), several, t)
        for site in np.unique(sources)
        for rows in [np.flatnonzero(sources == site)]
    ]
    return figures, _site_checks(cand.task, figures, champ, t) if several else []


def _baseline(champ: CandidateMetrics | None) -> np.ndarray | None:
    """The champion's per-image predictions when they can be compared per site."""
    if champ is None or champ.test is None or champ.test.sources is None:
        return None
    return np.asarray(champ.test.predicted, dtype=int)


def _at(values: np.ndarray | None, rows: np.ndarray) -> np.ndarray | None:
    return None if values is None else values[rows]


def _site_figures(
    classes: tuple[str, ...],
    site: str,
    truth: np.ndarray,
    predicted: np.ndarray,
    baseline: np.ndarray | None,
    several: bool,
    t: GateThresholds,
) -> SiteFigures:
    stats = {"resamples": t.bootstrap_resamples, "seed": t.bootstrap_seed, "confidence": t.confidence}
    boot = bootstrap_macro_f1(truth, predicted, len(classes), **stats)
    present = np.bincount(truth, minlength=len(classes)) > 0
    paired = {}
    if baseline is not None:
        difference = bootstrap_macro_f1(truth, predicted, len(classes), baseline, **stats)
        paired = {
            "champion_macro_f1": macro_f1(truth, baseline),
            "f1_difference": difference.point,
            "f1_difference_lower": difference.lower,
            "mcnemar_pvalue": mcnemar_exact(truth, predicted, baseline).pvalue,
        }
    return SiteFigures(
        source=str(site),
        n=len(truth),
        macro_f1=boot.point,
        f1_lower=boot.lower,
        f1_interval=boot.interval,
        accuracy=float(np.mean(truth == predicted)),
        classes_scored=tuple(c for c, here in zip(classes, present, strict=True) if here),
        classes_absent=tuple(c for c, here in zip(classes, present, strict=True) if not here),
        predicted_absent=int(np.sum(~present[predicted])),
        gated=several and len(truth) >= t.min_check_images,
        **paired,
    )


def _small(fig: SiteFigures, t: GateThresholds) -> str:
    return f"site {fig.source!r} has {fig.n} test images (< {t.min_check_images})"


def _scored(fig: SiteFigures) -> str:
    if not fig.classes_absent:
        return ""
    total = len(fig.classes_scored) + len(fig.classes_absent)
    return (
        f"; scored on the {len(fig.classes_scored)} of {total} classes the site carries (absent: "
        f"{', '.join(fig.classes_absent)}; {fig.predicted_absent} prediction(s) into them counted as errors)"
    )


def _floor_check(fig: SiteFigures, floor: float, t: GateThresholds) -> Check:
    how = f"{bound_name(t)} lower bound ({t.bootstrap_resamples} bootstrap resamples, seed {t.bootstrap_seed})"
    claim = Claim(
        f"site_macro_f1[{fig.source}]", f"test macro-F1 of site {fig.source!r}", fig.macro_f1, fig.f1_lower, fig.n, how
    )
    check = judge(claim, floor, t, floor=True) if fig.gated else reported(claim, floor, _small(fig, t))
    return replace(check, detail=check.detail + _scored(fig))


def _change_check(fig: SiteFigures, champ: CandidateMetrics, margin: float, t: GateThresholds) -> Check:
    how = f"{bound_name(t)} paired-bootstrap lower bound (exact McNemar p={fig.mcnemar_pvalue:.4f})"
    what = f"site {fig.source!r}: candidate F1 - champion v{champ.version} F1"
    claim = Claim(f"site_non_inferiority[{fig.source}]", what, fig.f1_difference, fig.f1_difference_lower, fig.n, how)
    if not fig.gated:
        return reported(claim, -margin, _small(fig, t), kind="change")
    return judge(claim, -margin, t, floor=True, kind="change")


def _site_checks(
    task: str, figures: list[SiteFigures], champ: CandidateMetrics | None, t: GateThresholds
) -> list[Check]:
    floor, margin = site_thresholds(task, t)
    checks = [_floor_check(fig, floor, t) for fig in figures]
    if champ is None or champ.test is None:  # first model, or the overall check already fails unmeasured
        return checks
    if champ.test.sources is None:
        why = f"champion v{champ.version}'s test predictions carry no sites (cached before per-site evaluation)"
        claim = Claim("site_non_inferiority", "per-site comparison with the champion", None, None, None, "")
        return [*checks, reported(claim, -margin, f"{why}: sites not compared", kind="change")]
    return checks + [_change_check(fig, champ, margin, t) for fig in figures]
