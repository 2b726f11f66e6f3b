"""Pure pieces of promotion: metrics mapping, alias-move order, version tags, model card."""

from dataclasses import replace

import pytest

from pipelines.trust.gate import decide
from pipelines.trust.promote import (
    PromotionError,
    candidate_metrics,
    gate_moves,
    known_limitations,
    promotion_moves,
    render_model_card,
    version_tags,
)
from pipelines.io.registry import RunRecord
from pipelines.core.settings import GateThresholds

METRICS = {
    "val_macro_f1": 0.84,
    "test_macro_f1": 0.85,
    "test_accuracy": 0.86,
    "test_f1_ci_low": 0.80,
    "test_f1_ci_high": 0.90,
    "test_recall_ALL": 0.90,
    "test_recall_Healthy": 0.80,
    "gradcam_nucleus_enrichment": 2.0,
    "gradcam_artefact_mass": 0.04,
    "shortcut_flip_rate": 0.01,
    "test_ece": 0.05,
}
TAGS = {
    "task": "binary_all",
    "dataset_version": "ds1",
    "backbone": "custom_cnn",
    "pretrained": "false",
    "augment": "paper",
}
COUNTS = {
    "train": {"ALL": 300, "Healthy": 60},
    "val": {"ALL": 30, "Healthy": 8},
    "test": {"ALL": 30, "Healthy": 8},
}


def run(metrics=METRICS, tags=TAGS) -> RunRecord:
    return RunRecord("run1", "1", "s3://bucket/1/run1/artifacts", dict(metrics), {"lr": "0.001"}, dict(tags))


def test_candidate_metrics_follow_the_tracking_contract_names():
    cand = candidate_metrics(run())
    assert (cand.task, cand.dataset_version, cand.classes) == ("binary_all", "ds1", ("ALL", "Healthy"))
    assert cand.macro_f1 == 0.85 and cand.val_macro_f1 == 0.84 and cand.f1_ci == (0.80, 0.90)
    assert cand.class_recall == {"ALL": 0.90, "Healthy": 0.80}
    assert (cand.nucleus_enrichment, cand.artefact_mass, cand.shortcut_flip_rate) == (2.0, 0.04, 0.01)
    assert cand.lime_agreement is None


def test_a_run_without_task_tag_is_not_promotable():
    with pytest.raises(PromotionError, match="run1 has no 'task' tag"):
        candidate_metrics(run(tags={"dataset_version": "ds1"}))


def test_previous_moves_before_champion_so_champion_is_never_missing():
    assert promotion_moves({"champion": "3", "challenger": "4"}, "4", approval_required=False) == [
        ("previous", "3"),
        ("champion", "4"),
        ("challenger", None),
    ]
    assert promotion_moves({}, "1", approval_required=False) == [("champion", "1")]
    assert promotion_moves({"champion": "3"}, "4", approval_required=True) == [("challenger", "4")]


def test_version_tags_carry_key_results_and_report_link():
    decision = decide(candidate_metrics(run()), None, GateThresholds())
    tags = version_tags(decision, "runs:/run1/gate/report.json")
    assert tags["gate.passed"] == "true" and tags["gate.failed"] == ""
    assert tags["gate.report"] == "runs:/run1/gate/report.json"
    assert tags["gate.macro_f1"] == "0.8500" and tags["gate.shortcut_flip_rate"] == "0.0100"
    assert tags["gate.champion_version"] == ""
    assert all(isinstance(v, str) for v in tags.values())


def test_limitations_name_random_init_imbalance_and_a_small_test_split():
    decision = decide(candidate_metrics(run()), None, GateThresholds())
    notes = " ".join(known_limitations(run(), COUNTS, decision))
    assert "pretrained=false" in notes and "largest/smallest = 5.0" in notes and "38 images" in notes
    balanced = {s: {"ALL": 500, "Healthy": 500} for s in ("train", "val", "test")}
    pretrained = run(tags={**TAGS, "pretrained": "true"})
    assert known_limitations(pretrained, balanced, decision) == [
        "Evaluated on images from the listed sources only; other labs, stains and scanners are untested."
    ]


def test_model_card_has_every_section():
    decision = decide(candidate_metrics(run()), None, GateThresholds())
    card = render_model_card(
        run(),
        "leukops-binary_all",
        "7",
        decision,
        decision.to_markdown(),
        {"counts": COUNTS, "sources": {"all_taleqani": 436}},
        ["explain/gradcam_grid.png"],
    )
    assert card.startswith("# Model card: leukops-binary_all v7")
    for needle in (
        "`binary_all`: `ALL`, `Healthy`",
        "| train | 300 | 60 | 360 |",
        "`all_taleqani` (436)",
        "backbone: `custom_cnn`, pretrained: `false`, augmentation: `paper`",
        "macro-F1: 0.850 (95% CI 0.800–0.900)",
        "ECE 0.050",
        "| ALL | — | 0.900 | — |",
        "![explain/gradcam_grid.png](explain/gradcam_grid.png)",
        "### Promotion gate: PASSED",
        "## Known limitations",
    ):
        assert needle in card, needle
    unreadable = render_model_card(run(), "m", "1", decision, "", {"error": "no snapshot 'ds1'"}, [])
    assert "split counts unavailable: no snapshot 'ds1'" in unreadable
    assert "No explanation images were logged" in unreadable


def test_gate_moves_follow_the_decision():
    champion = replace(candidate_metrics(run()), run_id="c", version="1")
    passed = decide(candidate_metrics(run()), champion, GateThresholds())
    worse = decide(candidate_metrics(run({**METRICS, "test_macro_f1": 0.75})), champion, GateThresholds())
    shortcut = decide(candidate_metrics(run({**METRICS, "shortcut_flip_rate": 0.5})), champion, GateThresholds())
    aliases = {"champion": "1"}
    assert gate_moves(passed, aliases, "2", False) == [("previous", "1"), ("champion", "2")]
    assert gate_moves(worse, aliases, "2", False) == [("challenger", "2")]
    assert gate_moves(shortcut, aliases, "2", False) == []
