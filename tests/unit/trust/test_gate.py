import json

import pytest

from pipelines.core.settings import GateThresholds
from pipelines.trust.gate import CandidateMetrics, GateInputError, decide

CLASSES = ("hem", "all")
THRESHOLDS = GateThresholds(
    macro_f1_min=0.70,
    class_recall_min=0.50,
    non_inferiority_margin=0.02,
    nucleus_enrichment_min=1.2,
    shortcut_flip_rate_max=0.10,
)


def metrics(run_id="cand", f1=0.85, recalls=(0.8, 0.9), enrichment=2.0, flip=0.02, **kw) -> CandidateMetrics:
    base = dict(
        run_id=run_id,
        task="binary_all",
        dataset_version="ds1",
        classes=CLASSES,
        macro_f1=f1,
        class_recall=dict(zip(CLASSES, recalls, strict=True)),
        val_macro_f1=0.8,
        f1_ci=(0.8, 0.9),
        nucleus_enrichment=enrichment,
        artefact_mass=0.05,
        shortcut_flip_rate=flip,
    )
    return CandidateMetrics(**{**base, **kw})


def by_name(decision):
    return {c.name: c for c in decision.checks}


def test_first_model_runs_value_checks_only():
    decision = decide(metrics(), None, THRESHOLDS)
    assert decision.passed and decision.passed_value_checks
    assert {c.kind for c in decision.checks} == {"value"}
    assert set(by_name(decision)) == {
        "macro_f1",
        "recall[hem]",
        "recall[all]",
        "nucleus_enrichment",
        "shortcut_flip_rate",
    }
    assert decision.champion is None


def test_low_f1_fails_the_floor_and_names_it():
    decision = decide(metrics(f1=0.6), None, THRESHOLDS)
    assert not decision.passed
    assert decision.failed == ["macro_f1"]
    check = by_name(decision)["macro_f1"]
    assert (check.value, check.threshold, check.kind) == (0.6, 0.70, "value")


def test_floor_is_inclusive_like_mlflow_metric_threshold():
    assert decide(metrics(f1=0.70), None, THRESHOLDS).passed


def test_one_weak_class_fails_its_recall_check_only():
    decision = decide(metrics(recalls=(0.3, 0.95)), None, THRESHOLDS)
    assert decision.failed == ["recall[hem]"]


def test_shortcut_model_is_refused_and_artefact_mass_is_reported_beside_it():
    decision = decide(metrics(flip=0.45, artefact_mass=0.6), None, THRESHOLDS)
    assert decision.failed == ["shortcut_flip_rate"]
    check = by_name(decision)["shortcut_flip_rate"]
    assert check.threshold == 0.10 and not check.passed
    assert "artefact mass 0.6000" in check.detail
    assert decision.reported["gradcam_artefact_mass"] == 0.6


def test_unexplained_model_fails_the_explanation_checks():
    decision = decide(metrics(enrichment=None, flip=None), None, THRESHOLDS)
    assert decision.failed == ["nucleus_enrichment", "shortcut_flip_rate"]
    assert all("not measured" in by_name(decision)[n].detail for n in decision.failed)


def test_lime_agreement_is_checked_only_when_a_floor_is_set():
    assert "lime_agreement" not in by_name(decide(metrics(), None, THRESHOLDS))
    with_lime = THRESHOLDS.model_copy(update={"lime_agreement_min": 0.4})
    assert decide(metrics(lime_agreement=0.2), None, with_lime).failed == ["lime_agreement"]
    assert decide(metrics(lime_agreement=0.5), None, with_lime).passed


def test_non_inferiority_within_margin_passes_and_beyond_fails():
    champion = metrics(run_id="champ", f1=0.86, version="3")
    within = decide(metrics(f1=0.845), champion, THRESHOLDS)
    assert within.passed
    check = by_name(within)["non_inferiority"]
    assert check.kind == "change" and check.threshold == pytest.approx(-0.02)
    assert check.value == pytest.approx(-0.015)
    worse = decide(metrics(f1=0.80), champion, THRESHOLDS)
    assert worse.failed == ["non_inferiority"]
    assert worse.passed_value_checks, "a worse-but-good-enough model still passes the value checks"


def test_champion_on_another_test_split_is_refused_as_input():
    champion = metrics(run_id="champ", dataset_version="ds0", version="1")
    with pytest.raises(GateInputError, match="re-evaluate the champion"):
        decide(metrics(), champion, THRESHOLDS)


def test_reports_round_trip_to_json_and_markdown():
    champion = metrics(run_id="champ", f1=0.9, version="2", origin="re-evaluated")
    decision = decide(metrics(f1=0.8), champion, THRESHOLDS)
    data = json.loads(decision.to_json())
    assert data["passed"] is False and data["failed"] == ["non_inferiority"]
    assert data["champion"] == {
        "version": "2",
        "run_id": "champ",
        "macro_f1": 0.9,
        "dataset_version": "ds1",
        "origin": "re-evaluated",
    }
    assert len(data["checks"]) == 6
    md = decision.to_markdown()
    assert "REFUSED (failed: non_inferiority)" in md
    assert "| non_inferiority | change | -0.1000 | -0.0200 | **FAIL** |" in md
    assert "champion v2" in md and "re-evaluated" in md
