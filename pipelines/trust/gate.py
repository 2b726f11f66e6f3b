"""The promotion gate: a pure decision from per-image evidence, explanation counts and thresholds.

Two kinds of check, as in TFX Evaluator's blessing: **value** checks compare the candidate with a fixed
bound, the **change** check compares it with the current champion on the *same* test images. Every check
is judged on a one-sided bound at ``thresholds.confidence`` (95%), never on a point estimate:

- macro-F1 floor: percentile-bootstrap lower bound (``bootstrap_resamples``, fixed seed);
- per-class recall floors: Clopper-Pearson lower bound of hits / support;
- shortcut ceiling: Clopper-Pearson upper bound of flipped / tested images (the worst intervention);
- non-inferiority: paired-bootstrap lower bound of F1(candidate) - F1(champion) >= -margin, exact McNemar
  reported beside it;
- external validation (``holdout_macro_f1_min`` set): every holdout source's logged lower bound;
- per site of the test split (`pipelines.trust.sites`): each site's macro-F1 lower bound (the worst site
  decides) and its paired non-inferiority vs the champion; sites under ``min_check_images`` are reported,
  not gated; the report has a per-site table;
- Grad-CAM enrichment of the task's evidence region (the nucleus, or the whole leukocyte for single-cell
  tasks: ``evidence_region``) and the optional LIME agreement: the sample mean.

Each check says how many images it rests on; fewer than ``min_check_images`` is "insufficient evidence"
and fails, as does a metric that was never measured. Bounds are inclusive (MLflow's ``MetricThreshold``).
With no champion (first model of a task) only the value checks run.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from pipelines.core.errors import LeukopsError
from pipelines.core.render import render
from pipelines.core.settings import GateThresholds
from pipelines.model.evaluate import macro_f1
from pipelines.trust.checks import Check, Claim, bound_name, judge, num
from pipelines.trust.sites import SiteFigures, site_evidence, site_thresholds
from pipelines.trust.statistics import bootstrap_macro_f1, clopper_pearson, mcnemar_exact


class GateInputError(LeukopsError):
    """The gate was given evidence it cannot compare (e.g. champion measured on other test images)."""


@dataclass(frozen=True)
class SplitPredictions:
    """One model's predicted class for every image of one test split (indices into ``classes``), and the
    source (site) of each image; ``sources`` is None in files cached before per-site evaluation, which
    still load (the optional ``source`` list of the JSON)."""

    classes: tuple[str, ...]
    sha256: tuple[str, ...]
    truth: tuple[int, ...]
    predicted: tuple[int, ...]
    sources: tuple[str, ...] | None = None

    @classmethod
    def from_labels(cls, classes, sha256, labels, predicted, sources=None) -> SplitPredictions:
        index = {name: i for i, name in enumerate(classes)}
        unknown = sorted({*labels, *predicted} - set(index))
        lengths = {len(sha256), len(labels), len(predicted), len(sha256 if sources is None else sources)}
        if unknown or len(lengths) != 1:
            raise GateInputError(f"test predictions: labels {unknown} not in {list(classes)} or lengths differ")
        return cls(
            tuple(classes),
            tuple(sha256),
            tuple(index[v] for v in labels),
            tuple(index[v] for v in predicted),
            None if sources is None else tuple(str(v) for v in sources),
        )

    def to_json(self) -> str:
        names = self.classes
        labels = [names[i] for i in self.truth]
        sites = {} if self.sources is None else {"source": list(self.sources)}
        return json.dumps(
            {"classes": list(names), "sha256": list(self.sha256), "label": labels}
            | {"predicted": [names[i] for i in self.predicted]}
            | sites
        )

    @classmethod
    def from_json(cls, text: str, where: str) -> SplitPredictions:
        try:
            data = json.loads(text)
            args = (data["classes"], data["sha256"], data["label"], data["predicted"], data.get("source"))
            return cls.from_labels(*args)
        except (ValueError, KeyError, TypeError, AttributeError, GateInputError) as err:
            raise GateInputError(f"{where}: not a test-predictions file ({err})") from err

    @property
    def n(self) -> int:
        return len(self.sha256)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(self.truth, dtype=int), np.asarray(self.predicted, dtype=int)


@dataclass(frozen=True)
class HoldoutFigure:
    """A model's macro-F1 on one external (holdout) source, as logged on its run."""

    source: str
    macro_f1: float | None
    f1_low: float | None  # lower end of its 95% bootstrap interval
    n: int | None


@dataclass(frozen=True)
class CandidateMetrics:
    """What the gate knows about one model (candidate or champion), on its test split."""

    run_id: str
    task: str
    dataset_version: str
    classes: tuple[str, ...]
    test: SplitPredictions | None = None
    val_macro_f1: float | None = None
    nucleus_enrichment: float | None = None
    cell_enrichment: float | None = None  # the central leukocyte's (the evidence region of single-cell tasks)
    explain_images: int | None = None  # images the Grad-CAM figures average over
    artefact_mass: float | None = None
    shortcut_flips: int | None = None  # flipped predictions under the worst intervention ...
    shortcut_images: int | None = None  # ... out of this many tested images
    lime_agreement: float | None = None
    holdout: dict[str, HoldoutFigure] = field(default_factory=dict)  # every registered holdout source
    version: str | None = None
    origin: str = "logged"  # "logged" with its run, or "re-evaluated" on another test split


@dataclass(frozen=True)
class GateDecision:
    candidate_run_id: str
    task: str
    dataset_version: str
    checks: tuple[Check, ...]
    thresholds: dict[str, Any]
    champion: dict[str, Any] | None
    reported: dict[str, float | None]
    sites: tuple[SiteFigures, ...] = ()  # per source of the test split (pipelines.trust.sites)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def passed_value_checks(self) -> bool:
        return all(c.passed for c in self.checks if c.kind == "value")

    @property
    def failed(self) -> list[str]:
        return [c.name for c in self.checks if not c.passed]

    def to_dict(self) -> dict[str, Any]:
        return {
            "candidate_run_id": self.candidate_run_id,
            "task": self.task,
            "dataset_version": self.dataset_version,
            "passed": self.passed,
            "passed_value_checks": self.passed_value_checks,
            "failed": self.failed,
            "checks": [asdict(c) for c in self.checks],
            "champion": self.champion,
            "reported": self.reported,
            "thresholds": self.thresholds,
            "sites": [asdict(site) for site in self.sites],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def to_markdown(self) -> str:
        return render("gate_report.md.j2", decision=self)


def _macro_f1_claim(cand: CandidateMetrics, t: GateThresholds) -> Claim:
    if cand.test is None:
        return Claim("macro_f1", "test macro-F1", None, None, None, "")
    boot = bootstrap_macro_f1(
        *cand.test.arrays(),
        len(cand.classes),
        resamples=t.bootstrap_resamples,
        seed=t.bootstrap_seed,
        confidence=t.confidence,
    )
    how = f"{bound_name(t)} lower bound ({boot.resamples} bootstrap resamples, seed {boot.seed})"
    return Claim("macro_f1", "test macro-F1", boot.point, boot.lower, boot.n, how)


def _recall_claims(cand: CandidateMetrics, t: GateThresholds) -> list[Claim]:
    claims = []
    for index, name in enumerate(cand.classes):
        what = f"test recall of {name!r}"
        if cand.test is None:
            claims.append(Claim(f"recall[{name}]", what, None, None, None, ""))
            continue
        truth, predicted = cand.test.arrays()
        support = int(np.sum(truth == index))
        hits = int(np.sum((truth == index) & (predicted == index)))
        if support == 0:
            claims.append(Claim(f"recall[{name}]", what, None, 0.0, 0, ""))
            continue
        low = clopper_pearson(hits, support, t.confidence, "lower")[0]
        how = f"{hits}/{support}, {bound_name(t)} Clopper-Pearson lower bound"
        claims.append(Claim(f"recall[{name}]", what, hits / support, low, support, how))
    return claims


def _shortcut_check(cand: CandidateMetrics, t: GateThresholds) -> Check:
    flips, n = cand.shortcut_flips, cand.shortcut_images
    what = "shortcut flip rate"
    artefact = f"; Grad-CAM artefact mass {num(cand.artefact_mass)} (reported)"
    if flips is None or not n:
        check = judge(Claim("shortcut_flip_rate", what, None, None, None, ""), t.shortcut_flip_rate_max, t, floor=False)
    else:
        low, high = clopper_pearson(flips, n, t.confidence)
        upper = clopper_pearson(flips, n, t.confidence, "upper")[1]
        how = f"{flips}/{n} flipped ({t.confidence:.0%} interval {low:.4f}-{high:.4f}), {bound_name(t)} upper bound"
        claim = Claim("shortcut_flip_rate", what, flips / n, upper, n, how)
        check = judge(claim, t.shortcut_flip_rate_max, t, floor=False)
    return Check(**{**asdict(check), "detail": check.detail + artefact})


def _holdout_checks(cand: CandidateMetrics, t: GateThresholds) -> list[Check]:
    floor = t.holdout_macro_f1_min
    if floor is None:
        return []
    if not cand.holdout:
        claim = Claim(
            "holdout", f"macro-F1 on a holdout source of {cand.task!r} (none registered)", None, None, None, ""
        )
        return [judge(claim, floor, t, floor=True)]
    return [
        judge(
            Claim(
                f"holdout[{fig.source}]",
                f"macro-F1 on holdout source {fig.source!r}",
                fig.macro_f1,
                fig.f1_low,
                fig.n,
                "lower end of its 95% bootstrap interval",
            ),
            floor,
            t,
            floor=True,
        )
        for fig in cand.holdout.values()
    ]


def _evidence_check(cand: CandidateMetrics, t: GateThresholds) -> Check:
    """Grad-CAM enrichment of the task's evidence region (`GateThresholds.evidence_region_of`)."""
    region = t.evidence_region_of(cand.task)
    value, floor = (
        (cand.cell_enrichment, t.cell_enrichment_min)
        if region == "cell"
        else (cand.nucleus_enrichment, t.nucleus_enrichment_min)
    )
    name, label = f"{region}_enrichment", f"Grad-CAM {region} enrichment"
    return judge(Claim(name, label, value, value, cand.explain_images, "sample mean"), floor, t, floor=True)


def _value_checks(cand: CandidateMetrics, t: GateThresholds) -> list[Check]:
    f1_floor, recall_floor = t.task_floors(cand.task)
    checks = [judge(_macro_f1_claim(cand, t), f1_floor, t, floor=True)]
    checks += [judge(claim, recall_floor, t, floor=True) for claim in _recall_claims(cand, t)]
    checks.append(_evidence_check(cand, t))
    checks.append(_shortcut_check(cand, t))
    if t.lime_agreement_min is not None:
        lime = Claim(
            "lime_agreement", "LIME nucleus agreement", cand.lime_agreement, cand.lime_agreement, None, "sample mean"
        )
        checks.append(judge(lime, t.lime_agreement_min, t, floor=True))
    return checks + _holdout_checks(cand, t)


def _paired(cand: CandidateMetrics, champ: CandidateMetrics) -> None:
    if cand.dataset_version != champ.dataset_version:
        raise GateInputError(
            f"champion run {champ.run_id} was measured on dataset {champ.dataset_version!r}, the candidate "
            f"{cand.run_id} on {cand.dataset_version!r}: re-evaluate the champion on the candidate's split"
        )
    if cand.test and champ.test and (cand.test.sha256, cand.test.truth) != (champ.test.sha256, champ.test.truth):
        raise GateInputError(
            f"champion run {champ.run_id} and candidate {cand.run_id} predicted different test images "
            f"({champ.test.n} vs {cand.test.n}) of dataset {cand.dataset_version!r}: a paired test needs the same"
        )


def _non_inferiority(cand: CandidateMetrics, champ: CandidateMetrics, t: GateThresholds) -> tuple[Check, dict]:
    _paired(cand, champ)
    name, margin = "non_inferiority", -t.non_inferiority_margin
    if cand.test is None or champ.test is None:
        missing = "candidate" if cand.test is None else "champion"
        claim = Claim(name, f"{missing} per-image test predictions", None, None, None, "")
        return judge(claim, margin, t, floor=True, kind="change"), {}
    truth, predicted = cand.test.arrays()
    baseline = champ.test.arrays()[1]
    boot = bootstrap_macro_f1(
        truth,
        predicted,
        len(cand.classes),
        baseline,
        resamples=t.bootstrap_resamples,
        seed=t.bootstrap_seed,
        confidence=t.confidence,
    )
    test = mcnemar_exact(truth, predicted, baseline)
    how = (
        f"{bound_name(t)} paired-bootstrap lower bound ({boot.resamples} resamples, seed {boot.seed}; exact "
        f"McNemar p={test.pvalue:.4f}: {test.candidate_only} images only the candidate gets right, "
        f"{test.baseline_only} only the champion)"
    )
    what = f"candidate F1 - champion v{champ.version} F1 ({champ.origin})"
    check = judge(Claim(name, what, boot.point, boot.lower, boot.n, how), margin, t, floor=True, kind="change")
    reported = {
        "f1_difference_ci_low": boot.interval[0],
        "f1_difference_ci_high": boot.interval[1],
        "mcnemar_pvalue": test.pvalue,
        "mcnemar_candidate_only": float(test.candidate_only),
        "mcnemar_champion_only": float(test.baseline_only),
    }
    return check, reported


def _reported(cand: CandidateMetrics, t: GateThresholds) -> dict[str, float | None]:
    reported: dict[str, float | None] = {
        "val_macro_f1": cand.val_macro_f1,
        "f1_ci_low": None,
        "f1_ci_high": None,
        "gradcam_artefact_mass": cand.artefact_mass,
    }
    if cand.test is not None:
        boot = bootstrap_macro_f1(
            *cand.test.arrays(), len(cand.classes), resamples=t.bootstrap_resamples, seed=t.bootstrap_seed
        )
        reported |= {"f1_ci_low": boot.interval[0], "f1_ci_high": boot.interval[1]}
    return reported


def decide(candidate: CandidateMetrics, champion: CandidateMetrics | None, thresholds: GateThresholds) -> GateDecision:
    """One check per criterion; the candidate passes when every check passes."""
    if champion is not None and champion.task != candidate.task:
        raise GateInputError(f"champion is a {champion.task!r} model but the candidate a {candidate.task!r} one")
    checks = _value_checks(candidate, thresholds)
    reported = _reported(candidate, thresholds)
    if champion is not None:
        change, paired = _non_inferiority(candidate, champion, thresholds)
        checks.append(change)
        reported |= paired
    sites, site_checks = site_evidence(candidate, champion, thresholds)  # after pairing: the same images
    f1_floor, recall_floor = thresholds.task_floors(candidate.task)
    site_floor, site_margin = site_thresholds(candidate.task, thresholds)
    resolved = {"task_macro_f1_min": f1_floor, "task_class_recall_min": recall_floor}
    resolved |= {"task_site_macro_f1_min": site_floor, "task_site_non_inferiority_margin": site_margin}
    return GateDecision(
        candidate_run_id=candidate.run_id,
        task=candidate.task,
        dataset_version=candidate.dataset_version,
        checks=tuple(checks + site_checks),
        thresholds=thresholds.model_dump() | resolved,
        champion=None
        if champion is None
        else {
            "version": champion.version,
            "run_id": champion.run_id,
            "macro_f1": None if champion.test is None else macro_f1(*champion.test.arrays()),
            "dataset_version": champion.dataset_version,
            "origin": champion.origin,
        },
        reported=reported,
        sites=tuple(sites),
    )
