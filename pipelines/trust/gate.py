"""The promotion gate: a pure decision from candidate metrics, champion metrics and thresholds.

Two kinds of check, as in TFX Evaluator's blessing: **value** checks compare the candidate with a fixed
bound (macro-F1 floor, per-class recall floor, Grad-CAM nucleus enrichment floor, shortcut flip-rate
ceiling, optional LIME agreement floor); the **change** check compares it with the current champion
measured on the *same* test split (non-inferiority: candidate F1 - champion F1 >= -margin). Bounds are
inclusive, as in MLflow's ``MetricThreshold`` (higher-is-better: value >= threshold). A metric that was
never measured fails its check: an unexplained model is not promoted. With no champion (first model of a
task) only the value checks run.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from pipelines.core.errors import LeukopsError
from pipelines.core.render import render
from pipelines.core.settings import GateThresholds

CheckKind = Literal["value", "change"]


class GateInputError(LeukopsError):
    """The gate was given metrics it cannot compare (e.g. champion measured on another test split)."""


@dataclass(frozen=True)
class CandidateMetrics:
    """What the gate needs to know about one model (candidate or champion), all on its test split."""

    run_id: str
    task: str
    dataset_version: str
    classes: tuple[str, ...]
    macro_f1: float | None
    class_recall: dict[str, float | None] = field(default_factory=dict)
    val_macro_f1: float | None = None
    f1_ci: tuple[float, float] | None = None
    nucleus_enrichment: float | None = None
    artefact_mass: float | None = None
    shortcut_flip_rate: float | None = None
    lime_agreement: float | None = None
    version: str | None = None
    origin: str = "logged"  # "logged" by its training run, or "re-evaluated" on another test split


@dataclass(frozen=True)
class Check:
    name: str
    value: float | None
    threshold: float
    passed: bool
    kind: CheckKind
    detail: str


@dataclass(frozen=True)
class GateDecision:
    candidate_run_id: str
    task: str
    dataset_version: str
    checks: tuple[Check, ...]
    thresholds: dict[str, Any]
    champion: dict[str, Any] | None
    reported: dict[str, float | None]

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
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def to_markdown(self) -> str:
        return render("gate_report.md.j2", decision=self)


def _floor(name: str, value: float | None, floor: float, what: str) -> Check:
    if value is None:
        return Check(name, None, floor, False, "value", f"{what} was not measured")
    return Check(name, value, floor, value >= floor, "value", f"{what} {value:.4f} must be >= {floor:.4f}")


def _ceiling(name: str, value: float | None, ceiling: float, what: str) -> Check:
    if value is None:
        return Check(name, None, ceiling, False, "value", f"{what} was not measured")
    return Check(name, value, ceiling, value <= ceiling, "value", f"{what} {value:.4f} must be <= {ceiling:.4f}")


def _value_checks(cand: CandidateMetrics, t: GateThresholds) -> list[Check]:
    checks = [_floor("macro_f1", cand.macro_f1, t.macro_f1_min, "test macro-F1")]
    checks += [
        _floor(f"recall[{cls}]", cand.class_recall.get(cls), t.class_recall_min, f"test recall of {cls!r}")
        for cls in cand.classes
    ]
    checks.append(
        _floor(
            "nucleus_enrichment",
            cand.nucleus_enrichment,
            t.nucleus_enrichment_min,
            "Grad-CAM nucleus enrichment",
        )
    )
    shortcut = _ceiling("shortcut_flip_rate", cand.shortcut_flip_rate, t.shortcut_flip_rate_max, "shortcut flip rate")
    artefact = "not measured" if cand.artefact_mass is None else f"{cand.artefact_mass:.4f}"
    checks.append(replace(shortcut, detail=f"{shortcut.detail}; Grad-CAM artefact mass {artefact} (reported)"))
    if t.lime_agreement_min is not None:
        checks.append(_floor("lime_agreement", cand.lime_agreement, t.lime_agreement_min, "LIME nucleus agreement"))
    return checks


def _non_inferiority(cand: CandidateMetrics, champ: CandidateMetrics, margin: float) -> Check:
    if cand.dataset_version != champ.dataset_version:
        raise GateInputError(
            f"champion run {champ.run_id} was measured on dataset {champ.dataset_version!r}, the candidate "
            f"{cand.run_id} on {cand.dataset_version!r}: re-evaluate the champion on the candidate's split"
        )
    if cand.macro_f1 is None or champ.macro_f1 is None:
        missing = "candidate" if cand.macro_f1 is None else "champion"
        return Check("non_inferiority", None, -margin, False, "change", f"{missing} test macro-F1 was not measured")
    delta = cand.macro_f1 - champ.macro_f1
    return Check(
        "non_inferiority",
        delta,
        -margin,
        delta >= -margin,
        "change",
        f"candidate F1 {cand.macro_f1:.4f} - champion v{champ.version} F1 {champ.macro_f1:.4f} "
        f"({champ.origin}) = {delta:+.4f} must be >= {-margin:+.4f}",
    )


def decide(candidate: CandidateMetrics, champion: CandidateMetrics | None, thresholds: GateThresholds) -> GateDecision:
    """One check per criterion; the candidate passes when every check passes."""
    if champion is not None and champion.task != candidate.task:
        raise GateInputError(f"champion is a {champion.task!r} model but the candidate a {candidate.task!r} one")
    checks = _value_checks(candidate, thresholds)
    if champion is not None:
        checks.append(_non_inferiority(candidate, champion, thresholds.non_inferiority_margin))
    return GateDecision(
        candidate_run_id=candidate.run_id,
        task=candidate.task,
        dataset_version=candidate.dataset_version,
        checks=tuple(checks),
        thresholds=thresholds.model_dump(),
        champion=None
        if champion is None
        else {
            "version": champion.version,
            "run_id": champion.run_id,
            "macro_f1": champion.macro_f1,
            "dataset_version": champion.dataset_version,
            "origin": champion.origin,
        },
        reported={
            "val_macro_f1": candidate.val_macro_f1,
            "f1_ci_low": candidate.f1_ci[0] if candidate.f1_ci else None,
            "f1_ci_high": candidate.f1_ci[1] if candidate.f1_ci else None,
            "gradcam_artefact_mass": candidate.artefact_mass,
        },
    )
