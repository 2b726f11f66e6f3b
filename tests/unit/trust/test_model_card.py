"""The model card: known limitations and every section of the rendered markdown."""

from pipelines.core.settings import GateThresholds
from pipelines.trust.evidence import candidate_metrics
from pipelines.trust.gate import decide
from pipelines.trust.model_card import known_limitations, render_model_card

from .training_run import TAGS, predictions, run

COUNTS = {
    "train": {"ALL": 300, "Healthy": 60},
    "val": {"ALL": 30, "Healthy": 8},
    "test": {"ALL": 30, "Healthy": 8},
}


def test_limitations_name_random_init_imbalance_and_a_small_test_split():
    decision = decide(candidate_metrics(run(), predictions(95)), None, GateThresholds())
    notes = " ".join(known_limitations(run(), COUNTS, decision))
    assert "pretrained=false" in notes and "largest/smallest = 5.0" in notes and "38 images" in notes
    balanced = {s: {"ALL": 500, "Healthy": 500} for s in ("train", "val", "test")}
    pretrained = run(tags={**TAGS, "pretrained": "true"})
    assert known_limitations(pretrained, balanced, decision) == [
        "Evaluated on images from the listed sources only; other labs, stains and scanners are untested."
    ]


def test_model_card_has_every_section():
    decision = decide(candidate_metrics(run(), predictions(95)), None, GateThresholds())
    card = render_model_card(
        run(),
        "leukops-binary_all",
        "7",
        decision,
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
    unreadable = render_model_card(run(), "m", "1", decision, {"error": "no snapshot 'ds1'"}, [])
    assert "split counts unavailable: no snapshot 'ds1'" in unreadable
    assert "No explanation images were logged" in unreadable
