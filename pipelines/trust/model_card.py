"""The model card of a registered version: data, training, test metrics, explanations, gate report, limits.

``render_model_card`` is pure (facts in, markdown out, through ``templates/model_card.md.j2``);
``write_model_card`` gathers the facts (the dataset snapshot's split counts and sources, the run's
explanation overlays), logs the card with the run and links it from the version's tags.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pipelines.core.errors import LeukopsError
from pipelines.core.render import render
from pipelines.core.settings import Settings
from pipelines.core.taxonomy import get_task
from pipelines.io.layout import EXPLAIN_OVERLAYS, MODEL_CARD, holdout_metric, metric_sources, site_metric
from pipelines.io.registry import Registry, RunRecord, VersionRecord
from pipelines.trust.gate import GateDecision

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
IMBALANCE_RATIO = 3.0  # largest / smallest class count above which the card warns about imbalance
SMALL_TEST_SPLIT = 100
SITE_FAMILIES = (("site", "test split", site_metric), ("holdout", "holdout source", holdout_metric))
SITE_FIGURES = ("n_images", "n_classes_scored", "macro_f1", "f1_ci_low", "f1_ci_high", "accuracy")


def known_limitations(run: RunRecord, counts: dict[str, dict[str, int]] | None, decision: GateDecision) -> list[str]:
    notes = []
    if run.tags.get("pretrained") == "false":
        notes.append("Backbone trained from random initialisation (pretrained=false): no ImageNet weights were loaded.")
    train = (counts or {}).get("train") or {}
    ratio = max(train.values()) / max(min(train.values()), 1) if train else 0.0
    if ratio >= IMBALANCE_RATIO:
        notes.append(
            f"Class imbalance in the training split (largest/smallest = {ratio:.1f}): "
            "per-class recall matters more than accuracy."
        )
    test_total = sum(((counts or {}).get("test") or {}).values())
    if counts and test_total < SMALL_TEST_SPLIT:
        notes.append(f"Small test split ({test_total} images): metrics have wide confidence intervals.")
    if decision.reported.get("gradcam_artefact_mass") is None:
        notes.append("No Grad-CAM artefact mass was measured for this run.")
    notes.append("Evaluated on images from the listed sources only; other labs, stains and scanners are untested.")
    return notes


def site_rows(metrics: dict[str, float]) -> list[dict[str, Any]]:
    """The run's per-site figures: each source of its test split, then each holdout source it was evaluated
    on (``source``, ``role`` and the `SITE_FIGURES`, None where not logged)."""
    return [
        {"source": source, "role": role} | {name: metrics.get(metric(source, name)) for name in SITE_FIGURES}
        for family, role, metric in SITE_FAMILIES
        for source in metric_sources(metrics, family)
    ]


def render_model_card(
    run: RunRecord,
    model_name: str,
    version: str,
    decision: GateDecision,
    snapshot: dict[str, Any],
    explain_images: Sequence[str],
) -> str:
    """The model card (markdown) of one registered version; ``snapshot`` has counts/sources or an error."""
    task = get_task(decision.task)
    counts = snapshot.get("counts")
    split_rows = [
        (split, [counts.get(split, {}).get(c, 0) for c in task.classes], sum(counts.get(split, {}).values()))
        for split in SPLITS
        if counts
    ]
    return render(
        "model_card.md.j2",
        run=run,
        model_name=model_name,
        version=version,
        decision=decision,
        task=task,
        metrics=run.metrics,
        split_rows=split_rows,
        site_rows=site_rows(run.metrics),
        sources=snapshot.get("sources", {}),
        snapshot_error=snapshot.get("error", "no snapshot"),
        explain_images=list(explain_images),
        limitations=known_limitations(run, counts, decision),
    )


def snapshot_summary(settings: Settings, task: str, version: str) -> dict[str, Any]:
    """Split counts (split -> class -> n) and images per source of the dataset version, or why not."""
    from pipelines.data.snapshot import load_snapshot
    from pipelines.io.storage import ObjectStore

    try:
        snap = load_snapshot(ObjectStore.from_settings(settings), task, version)
    except LeukopsError as err:
        return {"error": str(err)}
    sources = snap.frame["source"].value_counts()
    return {"counts": snap.counts, "sources": {str(k): int(v) for k, v in sources.items()}}


def write_model_card(
    registry: Registry, settings: Settings, run: RunRecord, version: VersionRecord, decision: GateDecision
) -> str:
    """Render, log (``model_card.md`` of the run) and link (version tag ``model_card``) the card; its URI."""
    overlays = registry.list_artifacts(run.run_id, EXPLAIN_OVERLAYS)
    images = [p for p in overlays if p.lower().endswith(IMAGE_SUFFIXES)]
    snapshot = snapshot_summary(settings, decision.task, decision.dataset_version)
    card = render_model_card(run, version.name, version.version, decision, snapshot, images)
    uri = registry.log_text(run.run_id, card, MODEL_CARD)
    registry.tag_version(decision.task, version.version, {"model_card": uri})
    return uri
