"""Pure pieces of promotion: metrics mapping, alias-move order, version tags."""

from dataclasses import replace

import pytest

from pipelines.core.settings import GateThresholds
from pipelines.trust.evidence import EvidenceError, candidate_metrics, holdout_figures
from pipelines.trust.gate import HoldoutFigure, decide
from pipelines.trust.promote import gate_moves, promotion_moves, validation_rank, version_tags

from .training_run import METRICS, predictions, run

CLASSES = ("ALL", "Healthy")


def test_candidate_metrics_follow_the_tracking_contract_names():
    cand = candidate_metrics(run(), predictions(95))
    assert (cand.task, cand.dataset_version, cand.classes) == ("binary_all", "ds1", CLASSES)
    assert cand.val_macro_f1 == 0.84 and cand.test.n == 200
    assert (cand.nucleus_enrichment, cand.explain_images, cand.artefact_mass) == (2.0, 32, 0.04)
    assert (cand.shortcut_flips, cand.shortcut_images) == (3, 300)
    assert cand.lime_agreement is None and cand.holdout == {}


def test_holdout_figures_are_read_for_every_registered_source():
    figures = holdout_figures(run(), ["lab_b", "lab_c"])
    assert figures == {
        "lab_b": HoldoutFigure("lab_b", 0.81, 0.75, 120),
        "lab_c": HoldoutFigure("lab_c", None, None, None),
    }


def test_a_run_without_task_tag_is_not_promotable():
    with pytest.raises(EvidenceError, match="run1 has no 'task' tag"):
        candidate_metrics(run(tags={"dataset_version": "ds1"}))


def test_previous_moves_before_champion_so_champion_is_never_missing():
    assert promotion_moves({"champion": "3", "challenger": "4"}, "4", approval_required=False) == [
        ("previous", "3"),
        ("champion", "4"),
        ("challenger", None),
    ]
    assert promotion_moves({}, "1", approval_required=False) == [("champion", "1")]
    assert promotion_moves({"champion": "3"}, "4", approval_required=True) == [("challenger", "4")]


def test_version_tags_carry_estimate_bound_images_and_report_link():
    decision = decide(candidate_metrics(run(), predictions(95)), None, GateThresholds())
    tags = version_tags(decision, "runs:/run1/gate/report.json")
    assert tags["gate.passed"] == "true" and tags["gate.failed"] == ""
    assert tags["gate.report"] == "runs:/run1/gate/report.json"
    assert tags["gate.macro_f1"] == "0.9500" and tags["gate.macro_f1.n"] == "200"
    assert float(tags["gate.macro_f1.bound"]) < 0.95
    assert tags["gate.shortcut_flip_rate"] == "0.0100" and tags["gate.shortcut_flip_rate.bound"] == "0.0256"
    assert tags["gate.champion_version"] == ""
    assert all(isinstance(v, str) for v in tags.values())


def test_gate_moves_follow_the_decision():
    champion = replace(candidate_metrics(run(), predictions(95)), run_id="c", version="1")
    passed = decide(candidate_metrics(run(), predictions(95)), champion, GateThresholds())
    worse = decide(candidate_metrics(run(), predictions(80)), champion, GateThresholds())
    shortcut = decide(
        candidate_metrics(run({**METRICS, "shortcut_flips": 150}), predictions(95)), champion, GateThresholds()
    )
    aliases = {"champion": "1"}
    assert gate_moves(passed, aliases, "2", False) == [("previous", "1"), ("champion", "2")]
    assert gate_moves(worse, aliases, "2", False) == [("challenger", "2")]
    assert gate_moves(shortcut, aliases, "2", False) == []


def test_validation_rank_breaks_an_f1_tie_by_the_lower_validation_loss():
    def candidate(run_id: str, f1: float, loss: float | None):
        record = run(METRICS | {"val_macro_f1": f1} | ({"val_loss": loss} if loss is not None else {}))
        return replace(record, run_id=run_id)

    runs = [candidate("tied-high-loss", 1.0, 0.30), candidate("lower-f1", 0.9, 0.01), candidate("tied", 1.0, 0.12)]
    runs.append(candidate("tied-no-loss", 1.0, None))  # logged before val_loss was: ranked after its ties
    ranked = [r.run_id for r in sorted(runs, key=validation_rank)]
    assert ranked == ["tied", "tied-high-loss", "tied-no-loss", "lower-f1"]
