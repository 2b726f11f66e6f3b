"""The gate's per-site checks: each source of the test split judged on its own images."""

import json

import pytest

from pipelines.core.settings import GateThresholds, Settings
from pipelines.trust.gate import CandidateMetrics, GateInputError, SplitPredictions, decide
from pipelines.trust.sites import site_thresholds

CLASSES = ("ALL", "Healthy")
THRESHOLDS = GateThresholds(macro_f1_min=0.70, class_recall_min=0.50, non_inferiority_margin=0.02)
SITE_CHECKS = ("site_macro_f1", "site_non_inferiority")


def predictions(sites: dict[str, dict[str, tuple[int, int]]], with_sources: bool = True) -> SplitPredictions:
    """``sites[site][class] = (support, hits)``; a miss is predicted as the other class."""
    sha, labels, predicted, sources = [], [], [], []
    for site, counts in sites.items():
        for c, (support, hits) in counts.items():
            other = CLASSES[1 - CLASSES.index(c)]
            for i in range(support):
                sha.append(f"{site}-{c}-{i:04d}")
                labels.append(c)
                predicted.append(c if i < hits else other)
                sources.append(site)
    return SplitPredictions.from_labels(CLASSES, sha, labels, predicted, sources if with_sources else None)


def metrics(test: SplitPredictions, run_id: str = "cand", **kw) -> CandidateMetrics:
    base = dict(
        run_id=run_id,
        task="binary_all",
        dataset_version="ds1",
        classes=CLASSES,
        test=test,
        nucleus_enrichment=2.0,
        explain_images=32,
        shortcut_flips=0,
        shortcut_images=300,
    )
    return CandidateMetrics(**{**base, **kw})


def champion(test: SplitPredictions) -> CandidateMetrics:
    return metrics(test, run_id="champ", version="3")


def by_name(decision):
    return {c.name: c for c in decision.checks}


def site_checks(decision):
    return {c.name: c for c in decision.checks if c.name.startswith(SITE_CHECKS)}


GOOD = {"lab_a": {"ALL": (100, 95), "Healthy": (100, 95)}, "lab_b": {"ALL": (50, 48), "Healthy": (50, 47)}}


def test_every_site_above_its_floor_passes_and_the_report_has_a_per_site_table():
    decision = decide(metrics(predictions(GOOD)), None, THRESHOLDS)
    assert decision.passed, decision.failed
    checks = site_checks(decision)
    assert set(checks) == {"site_macro_f1[lab_a]", "site_macro_f1[lab_b]"}
    assert checks["site_macro_f1[lab_b]"].n == 100 and checks["site_macro_f1[lab_b]"].gated
    assert checks["site_macro_f1[lab_b]"].point == pytest.approx(0.95, abs=1e-3)
    assert checks["site_macro_f1[lab_b]"].value < checks["site_macro_f1[lab_b]"].point, "judged on the lower bound"
    assert [s.source for s in decision.sites] == ["lab_a", "lab_b"] and decision.sites[0].n == 200
    md = decision.to_markdown()
    assert "| site | images | classes scored |" in md and "| lab_b | 100 | 2 of 2 | 0.9500 |" in md
    assert json.loads(decision.to_json())["sites"][1]["source"] == "lab_b"


def test_the_worst_site_fails_its_floor_while_the_overall_figure_passes():
    worst = {**GOOD, "lab_c": {"ALL": (40, 28), "Healthy": (40, 26)}}
    decision = decide(metrics(predictions(worst)), None, THRESHOLDS)
    assert decision.failed == ["site_macro_f1[lab_c]"] and by_name(decision)["macro_f1"].passed
    check = by_name(decision)["site_macro_f1[lab_c]"]
    assert check.point == pytest.approx(0.675, abs=0.01) and check.threshold == 0.70 and check.n == 80
    assert "lower bound" in check.detail and "rests on 80 images" in check.detail
    lenient = THRESHOLDS.model_copy(update={"site_macro_f1_min": 0.5})
    assert decide(metrics(predictions(worst)), None, lenient).passed, "the site floor is its own setting"


def test_a_site_below_min_check_images_is_reported_not_gated():
    small = {**GOOD, "lab_s": {"ALL": (6, 1), "Healthy": (6, 1)}}
    decision = decide(metrics(predictions(small)), None, THRESHOLDS)
    check = by_name(decision)["site_macro_f1[lab_s]"]
    assert decision.passed and check.passed and not check.gated and check.n == 12
    assert check.detail.startswith("reported, not gated: site 'lab_s' has 12 test images (< 30)")
    assert check.point < 0.3, "its figure is still shown"
    assert "| reported |" in decision.to_markdown()


def test_non_inferiority_fails_on_one_site_while_the_overall_comparison_passes():
    base = {"lab_a": {"ALL": (200, 180), "Healthy": (200, 180)}, "lab_b": {"ALL": (30, 28), "Healthy": (30, 28)}}
    better_a_worse_b = {
        "lab_a": {"ALL": (200, 190), "Healthy": (200, 190)},
        "lab_b": {"ALL": (30, 22), "Healthy": (30, 22)},
    }
    t = THRESHOLDS.model_copy(update={"site_macro_f1_min": 0.5})
    decision = decide(metrics(predictions(better_a_worse_b)), champion(predictions(base)), t)
    assert decision.failed == ["site_non_inferiority[lab_b]"]
    overall, site_b = by_name(decision)["non_inferiority"], by_name(decision)["site_non_inferiority[lab_b]"]
    assert overall.passed and overall.point > 0
    assert site_b.kind == "change" and site_b.n == 60 and site_b.point == pytest.approx(-0.2, abs=0.01)
    assert "paired-bootstrap lower bound" in site_b.detail and "McNemar" in site_b.detail
    assert by_name(decision)["site_non_inferiority[lab_a]"].passed
    figures = {s.source: s for s in decision.sites}
    assert figures["lab_b"].champion_macro_f1 == pytest.approx(0.9333, abs=1e-3)
    assert figures["lab_b"].mcnemar_pvalue < 0.05
    wider = t.model_copy(update={"site_non_inferiority_margin": 0.4})
    assert decide(metrics(predictions(better_a_worse_b)), champion(predictions(base)), wider).passed


def test_a_champion_without_per_site_predictions_is_not_compared_per_site():
    old = champion(predictions(GOOD, with_sources=False))
    decision = decide(metrics(predictions(GOOD)), old, THRESHOLDS)
    check = by_name(decision)["site_non_inferiority"]
    assert decision.passed and not check.gated and check.kind == "change"
    assert "carry no sites" in check.detail and "sites not compared" in check.detail
    assert by_name(decision)["non_inferiority"].passed, "the overall paired comparison still runs"
    assert "not compared" in decision.to_markdown()
    assert all(s.champion_macro_f1 is None for s in decision.sites)


def test_one_site_or_no_sites_adds_no_site_check():
    one = decide(metrics(predictions({"lab_a": GOOD["lab_a"]})), None, THRESHOLDS)
    assert not site_checks(one) and len(one.sites) == 1 and "overall checks judge it" in one.to_markdown()
    unknown = decide(metrics(predictions(GOOD, with_sources=False)), None, THRESHOLDS)
    assert not site_checks(unknown) and unknown.sites == () and "carry no sources" in unknown.to_markdown()


def test_a_site_labelling_a_subset_of_the_classes_is_scored_on_the_classes_it_has():
    subset = {**GOOD, "lab_c": {"ALL": (40, 36)}}  # lab_c labels ALL only; 4 of its images predicted Healthy
    decision = decide(metrics(predictions(subset)), None, THRESHOLDS)
    lab_c = {s.source: s for s in decision.sites}["lab_c"]
    assert lab_c.classes_scored == ("ALL",) and lab_c.classes_absent == ("Healthy",)
    assert lab_c.predicted_absent == 4 and lab_c.accuracy == pytest.approx(0.9)
    assert lab_c.macro_f1 == pytest.approx(2 * 36 / (2 * 36 + 4)), "F1 of ALL alone; the 4 are misses"
    check = by_name(decision)["site_macro_f1[lab_c]"]
    assert "scored on the 1 of 2 classes the site carries (absent: Healthy" in check.detail
    assert "`lab_c` carries 1 of 2 classes (absent: Healthy)" in decision.to_markdown()


def test_predictions_round_trip_with_sources_and_old_files_still_load():
    p = predictions({"lab_a": {"ALL": (3, 2)}, "lab_b": {"Healthy": (2, 2)}})
    assert SplitPredictions.from_json(p.to_json(), "x") == p and p.sources[-1] == "lab_b"
    old = json.dumps({k: v for k, v in json.loads(p.to_json()).items() if k != "source"})
    assert SplitPredictions.from_json(old, "x").sources is None
    with pytest.raises(GateInputError, match="lengths differ"):
        SplitPredictions.from_labels(CLASSES, ["a", "b"], ["ALL", "ALL"], ["ALL", "ALL"], ["lab_a"])


def test_site_thresholds_default_to_the_task_floor_and_the_overall_margin(monkeypatch):
    assert site_thresholds("all_subtypes", GateThresholds()) == (0.90, 0.02)
    monkeypatch.setenv("LEUKOPS_GATE__SITE_MACRO_F1_MIN", "0.8")
    monkeypatch.setenv("LEUKOPS_GATE__SITE_NON_INFERIORITY_MARGIN", "0.05")
    assert site_thresholds("all_subtypes", Settings(_env_file=None).gate) == (0.8, 0.05)


def test_the_model_card_has_a_per_site_table_of_test_split_sites_and_holdout_sources():
    from pipelines.io import layout
    from pipelines.trust.model_card import render_model_card

    from .training_run import METRICS, run

    logged = {
        layout.site_metric("pbc", name): value
        for name, value in {
            "n_images": 160,
            "n_classes_scored": 2,
            "macro_f1": 0.91,
            "f1_ci_low": 0.87,
            "f1_ci_high": 0.95,
        }.items()
    } | {layout.site_metric("cella.v2", "n_images"): 12, layout.site_metric("cella.v2", "n_classes_scored"): 1}
    card_run = run(metrics={**METRICS, **logged, layout.site_metric("cella.v2", "macro_f1"): 0.5})
    decision = decide(metrics(predictions(GOOD)), None, THRESHOLDS)
    card = render_model_card(card_run, "leukops-binary_all", "7", decision, {"counts": None}, [])
    assert "## Per-site metrics" in card
    assert "| cella.v2 | test split | 12 | 1 of 2 | 0.500 | — | — |" in card
    assert "| pbc | test split | 160 | 2 of 2 | 0.910 | 0.870–0.950 | — |" in card
    assert "| lab_b | holdout source | 120 | — of 2 | 0.810 | — | — |" in card, "logged before n_classes_scored"
    old = render_model_card(run(metrics={"test_macro_f1": 0.8}), "m", "1", decision, {"counts": None}, [])
    assert "No per-site figures were logged for this run" in old
