"""The pure gate: every check judged on a one-sided bound over the images it rests on."""

import json

import pytest

from pipelines.core.settings import GateThresholds, Settings
from pipelines.trust.gate import CandidateMetrics, GateInputError, HoldoutFigure, SplitPredictions, decide

CLASSES = ("ALL", "Healthy")
THRESHOLDS = GateThresholds(
    macro_f1_min=0.70,
    class_recall_min=0.50,
    non_inferiority_margin=0.02,
    nucleus_enrichment_min=1.2,
    shortcut_flip_rate_max=0.10,
)


def predictions(counts=None, classes=CLASSES) -> SplitPredictions:
    """Test predictions with ``counts[class] = (support, hits)``; a miss is predicted as the next class."""
    counts = counts or {c: (100, 95) for c in classes}
    sha, labels, predicted = [], [], []
    for c, (support, hits) in counts.items():
        other = classes[(classes.index(c) + 1) % len(classes)]
        for i in range(support):
            sha.append(f"{c}-{i:04d}")
            labels.append(c)
            predicted.append(c if i < hits else other)
    return SplitPredictions.from_labels(classes, sha, labels, predicted)


def metrics(run_id="cand", test="default", enrichment=2.0, flips=0, tested=300, **kw) -> CandidateMetrics:
    base = dict(
        run_id=run_id,
        task="binary_all",
        dataset_version="ds1",
        classes=CLASSES,
        test=predictions() if test == "default" else test,
        val_macro_f1=0.8,
        nucleus_enrichment=enrichment,
        explain_images=32,
        artefact_mass=0.05,
        shortcut_flips=flips,
        shortcut_images=tested,
    )
    return CandidateMetrics(**{**base, **kw})


def by_name(decision):
    return {c.name: c for c in decision.checks}


def test_first_model_runs_value_checks_only_and_says_what_each_rests_on():
    decision = decide(metrics(), None, THRESHOLDS)
    assert decision.passed and decision.passed_value_checks
    assert {c.kind for c in decision.checks} == {"value"}
    checks = by_name(decision)
    assert set(checks) == {"macro_f1", "recall[ALL]", "recall[Healthy]", "nucleus_enrichment", "shortcut_flip_rate"}
    assert [checks[n].n for n in ("macro_f1", "recall[ALL]", "nucleus_enrichment", "shortcut_flip_rate")] == [
        200,
        100,
        32,
        300,
    ]
    assert decision.champion is None


def test_macro_f1_floor_is_judged_on_the_bootstrap_lower_bound_not_the_point():
    t = THRESHOLDS.model_copy(update={"macro_f1_min": 0.85})
    small = decide(metrics(test=predictions({"ALL": (20, 18), "Healthy": (20, 18)})), None, t)
    check = by_name(small)["macro_f1"]
    assert check.point == pytest.approx(0.9) and check.value < 0.85, "point 0.90 > floor, bound below"
    assert not check.passed and "lower bound" in check.detail and "2000 bootstrap resamples" in check.detail
    large = decide(metrics(test=predictions({"ALL": (300, 270), "Healthy": (300, 270)})), None, t)
    assert by_name(large)["macro_f1"].passed, "the same accuracy on 600 images is enough evidence"


def test_recall_floor_is_judged_on_the_clopper_pearson_lower_bound():
    t = THRESHOLDS.model_copy(update={"class_recall_min": 0.85})
    decision = decide(metrics(test=predictions({"ALL": (30, 28), "Healthy": (100, 100)})), None, t)
    check = by_name(decision)["recall[ALL]"]
    assert check.point == pytest.approx(28 / 30) and check.value == pytest.approx(0.80467, abs=1e-5)
    assert decision.failed == ["recall[ALL]"] and "28/30" in check.detail
    perfect = by_name(decide(metrics(test=predictions({"ALL": (30, 30), "Healthy": (100, 100)})), None, t))
    assert perfect["recall[ALL]"].passed and perfect["recall[ALL]"].value == pytest.approx(0.05 ** (1 / 30))


def test_a_check_on_too_few_images_is_insufficient_evidence():
    decision = decide(metrics(test=predictions({"ALL": (12, 12), "Healthy": (100, 100)})), None, THRESHOLDS)
    assert decision.failed == ["recall[ALL]"]
    check = by_name(decision)["recall[ALL]"]
    assert check.n == 12 and "insufficient evidence" in check.detail and "(< 30)" in check.detail
    absent = decide(metrics(test=predictions({"Healthy": (100, 100)})), None, THRESHOLDS)
    assert "recall[ALL]" in absent.failed and by_name(absent)["recall[ALL]"].n == 0
    lenient = THRESHOLDS.model_copy(update={"min_check_images": 10})
    assert decide(metrics(test=predictions({"ALL": (12, 12), "Healthy": (100, 100)})), None, lenient).passed


def test_shortcut_ceiling_is_judged_on_the_flip_rate_upper_bound():
    clean = by_name(decide(metrics(flips=1, tested=300), None, THRESHOLDS))["shortcut_flip_rate"]
    assert clean.passed and clean.value == pytest.approx(0.01571, abs=1e-4) and clean.n == 300
    assert "1/300 flipped" in clean.detail and "artefact mass 0.0500" in clean.detail
    shortcut = decide(metrics(flips=135, tested=300, artefact_mass=0.6), None, THRESHOLDS)
    assert shortcut.failed == ["shortcut_flip_rate"]
    # last round's measurement: 2 flips in 32 images is a point of 0.0625 but an upper bound of 0.18
    few = by_name(decide(metrics(flips=2, tested=32), None, THRESHOLDS))["shortcut_flip_rate"]
    assert few.point == pytest.approx(0.0625) and few.value == pytest.approx(0.1840, abs=1e-3)
    assert not few.passed and "0.0077-0.2081" in few.detail
    demo = by_name(decide(metrics(flips=0, tested=16), None, THRESHOLDS.model_copy(update={"min_check_images": 8})))
    assert demo["shortcut_flip_rate"].value == pytest.approx(0.1707, abs=1e-4) and not demo["shortcut_flip_rate"].passed


def test_unexplained_or_unevaluated_model_fails_the_unmeasured_checks():
    decision = decide(metrics(enrichment=None, flips=None, test=None), None, THRESHOLDS)
    assert decision.failed == ["macro_f1", "recall[ALL]", "recall[Healthy]", "nucleus_enrichment", "shortcut_flip_rate"]
    assert all("not measured" in by_name(decision)[n].detail for n in decision.failed)


def test_lime_agreement_is_checked_only_when_a_floor_is_set():
    assert "lime_agreement" not in by_name(decide(metrics(), None, THRESHOLDS))
    with_lime = THRESHOLDS.model_copy(update={"lime_agreement_min": 0.4})
    assert decide(metrics(lime_agreement=0.2), None, with_lime).failed == ["lime_agreement"]
    assert decide(metrics(lime_agreement=0.5), None, with_lime).passed


def _champion(test, **kw):
    return metrics(run_id="champ", test=test, version="3", **kw)


def test_non_inferiority_is_a_paired_bootstrap_with_mcnemar_beside_it():
    base = predictions({"ALL": (150, 140), "Healthy": (150, 140)})
    same = decide(metrics(test=base), _champion(base), THRESHOLDS)
    check = by_name(same)["non_inferiority"]
    assert same.passed and check.kind == "change" and check.threshold == pytest.approx(-0.02)
    assert check.point == check.value == 0.0 and check.n == 300 and "McNemar p=1.0000" in check.detail
    worse = decide(metrics(test=predictions({"ALL": (150, 125), "Healthy": (150, 125)})), _champion(base), THRESHOLDS)
    assert worse.failed == ["non_inferiority"] and worse.passed_value_checks
    assert worse.reported["mcnemar_candidate_only"] == 0 and worse.reported["mcnemar_champion_only"] == 30
    assert worse.reported["mcnemar_pvalue"] < 1e-6
    one_less = decide(
        metrics(test=predictions({"ALL": (150, 139), "Healthy": (150, 140)})), _champion(base), THRESHOLDS
    )
    assert by_name(one_less)["non_inferiority"].passed, "one image apart: pairing keeps the bound near 0"


def test_a_small_loss_on_many_discordant_images_is_not_shown_non_inferior():
    champion = predictions({"ALL": (150, 140), "Healthy": (150, 140)})  # misses ALL images 140-149
    predicted = list(champion.predicted)
    predicted[:13] = [1] * 13  # the candidate misses 13 others ...
    predicted[140:150] = [0] * 10  # ... and gets the champion's 10 right
    candidate = SplitPredictions(champion.classes, champion.sha256, champion.truth, tuple(predicted))
    check = by_name(decide(metrics(test=candidate), _champion(champion), THRESHOLDS))["non_inferiority"]
    assert -0.02 < check.point < 0 and check.value < -0.02 and not check.passed
    assert "13 only the champion" in check.detail and "10 images only the candidate" in check.detail


def test_non_inferiority_needs_the_same_images_and_dataset():
    with pytest.raises(GateInputError, match="re-evaluate the champion"):
        decide(metrics(), _champion(predictions(), dataset_version="ds0"), THRESHOLDS)
    with pytest.raises(GateInputError, match="different test images"):
        decide(metrics(), _champion(predictions({"ALL": (100, 95), "Healthy": (99, 95)})), THRESHOLDS)
    unmeasured = decide(metrics(), _champion(None), THRESHOLDS)
    assert unmeasured.failed == ["non_inferiority"]


def test_per_task_floors_and_how_the_environment_overrides_them(monkeypatch):
    assert GateThresholds().task_floors("all_subtypes") == (0.90, 0.85)
    assert GateThresholds().task_floors("wbc") == (0.70, 0.50)
    monkeypatch.setenv("LEUKOPS_GATE__FLOORS__ALL_SUBTYPES__MACRO_F1_MIN", "0.95")
    gate = Settings(_env_file=None).gate
    assert gate.task_floors("all_subtypes") == (0.95, 0.85) and gate.task_floors("binary_all") == (0.70, 0.50)
    monkeypatch.setenv("LEUKOPS_GATE__CLASS_RECALL_MIN", "0.2")
    assert Settings(_env_file=None).gate.task_floors("all_subtypes") == (0.95, 0.2), "global override wins"


def test_holdout_floor_needs_every_registered_source():
    t = THRESHOLDS.model_copy(update={"holdout_macro_f1_min": 0.8})
    assert decide(metrics(), None, t).failed == ["holdout"], "no holdout source: external validity unmeasured"
    figures = {
        "lab_b": HoldoutFigure("lab_b", 0.90, 0.85, 120),
        "lab_c": HoldoutFigure("lab_c", 0.82, 0.74, 200),
        "lab_d": HoldoutFigure("lab_d", 0.99, 0.95, 20),
        "lab_e": HoldoutFigure("lab_e", None, None, None),
    }
    decision = decide(metrics(holdout=figures), None, t)
    assert decision.failed == ["holdout[lab_c]", "holdout[lab_d]", "holdout[lab_e]"]
    checks = by_name(decision)
    assert "insufficient evidence" in checks["holdout[lab_d]"].detail and checks["holdout[lab_b]"].n == 120
    assert "holdout" not in {c.name for c in decide(metrics(holdout=figures), None, THRESHOLDS).checks}


def test_test_predictions_round_trip_and_name_a_bad_file():
    p = predictions({"ALL": (3, 2), "Healthy": (2, 2)})
    assert SplitPredictions.from_json(p.to_json(), "x") == p
    with pytest.raises(GateInputError, match="run r artifact: not a test-predictions file"):
        SplitPredictions.from_json('{"classes": ["ALL"]}', "run r artifact")


def test_reports_round_trip_to_json_and_markdown():
    base = predictions({"ALL": (150, 140), "Healthy": (150, 140)})
    champion = _champion(base, origin="re-evaluated")
    worse = predictions({"ALL": (150, 120), "Healthy": (150, 120)})
    decision = decide(metrics(test=worse), champion, THRESHOLDS)
    data = json.loads(decision.to_json())
    assert data["passed"] is False and data["failed"] == ["non_inferiority"]
    assert data["champion"]["origin"] == "re-evaluated" and data["champion"]["macro_f1"] == pytest.approx(0.9333, 1e-3)
    assert len(data["checks"]) == 6 and all({"n", "point", "value"} <= set(c) for c in data["checks"])
    md = decision.to_markdown()
    assert "REFUSED (failed: non_inferiority)" in md
    assert "| non_inferiority | change | 300 | -0.1333 |" in md and "**FAIL**" in md
    assert "champion v3" in md and "re-evaluated" in md and "exact McNemar p" in md
    assert "fewer than 30 images is insufficient evidence" in md


def test_each_task_is_judged_on_its_evidence_region():
    """wbc (normal white cells): the whole leukocyte; the leukaemia tasks: the nucleus."""
    wbc = ("basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet")
    shipped = GateThresholds(macro_f1_min=0.0, class_recall_min=0.0)
    cell_only = dict(task="wbc", classes=wbc, test=predictions(classes=wbc), nucleus_enrichment=0.9)
    checks = by_name(decide(metrics(**cell_only, cell_enrichment=1.6), None, shipped))
    assert "nucleus_enrichment" not in checks
    assert checks["cell_enrichment"].passed and checks["cell_enrichment"].value == 1.6
    assert not by_name(decide(metrics(**cell_only, cell_enrichment=1.05), None, shipped))["cell_enrichment"].passed
    assert not by_name(decide(metrics(**cell_only), None, shipped))["cell_enrichment"].passed  # never measured
    nucleus = by_name(decide(metrics(cell_enrichment=0.5), None, shipped))
    assert "cell_enrichment" not in nucleus and nucleus["nucleus_enrichment"].passed
    assert shipped.evidence_region_of("five_class") == "nucleus"
