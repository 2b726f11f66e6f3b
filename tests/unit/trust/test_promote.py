"""Pure pieces of promotion: metrics mapping, alias-move order, version tags."""

from dataclasses import replace

import pytest

from pipelines.core.settings import GateThresholds
from pipelines.trust.gate import decide
from pipelines.trust.promote import PromotionError, candidate_metrics, gate_moves, promotion_moves, version_tags

from .training_run import METRICS, run


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


def test_gate_moves_follow_the_decision():
    champion = replace(candidate_metrics(run()), run_id="c", version="1")
    passed = decide(candidate_metrics(run()), champion, GateThresholds())
    worse = decide(candidate_metrics(run({**METRICS, "test_macro_f1": 0.75})), champion, GateThresholds())
    shortcut = decide(candidate_metrics(run({**METRICS, "shortcut_flip_rate": 0.5})), champion, GateThresholds())
    aliases = {"champion": "1"}
    assert gate_moves(passed, aliases, "2", False) == [("previous", "1"), ("champion", "2")]
    assert gate_moves(worse, aliases, "2", False) == [("challenger", "2")]
    assert gate_moves(shortcut, aliases, "2", False) == []
