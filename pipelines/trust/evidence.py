"""The gate's evidence about one run, read from MLflow and S3: what ``promote`` hands to the pure gate.

- ``candidate_metrics``: the gate's view of a training run (metric and tag names of the tracking contract)
  plus its per-image test predictions and holdout figures;
- ``test_predictions``: a model's predicted class for every image of a dataset version's test split,
  from forward passes (the model's own predict function, temperature and TTA of its bundle) and cached as
  a run artifact (``layout.gate_predictions_path``), so re-gating and pairing with later candidates cost
  no second pass; the champion is predicted on the *candidate's* test images, which makes the
  non-inferiority test paired;
- ``holdout_figures``: the external-validation metrics logged on the run for every registered holdout
  source of its task (``layout.holdout_metric``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipelines.core.errors import LeukopsError
from pipelines.core.taxonomy import get_task
from pipelines.io.layout import gate_predictions_path, holdout_metric, run_model_uri
from pipelines.trust.gate import CandidateMetrics, HoldoutFigure, SplitPredictions

if TYPE_CHECKING:
    import pandas as pd

    from pipelines.core.settings import Settings
    from pipelines.io.registry import Registry, RunRecord
    from pipelines.io.storage import ObjectStore

LIME_METRIC = "lime_nucleus_mass"  # the explain helper's LIME agreement: LIME's positive mass on the nucleus
PREDICT_BATCH = 32


class EvidenceError(LeukopsError):
    """The gate's evidence cannot be gathered (the message names the run, dataset or object)."""


def required_tag(run: RunRecord, key: str) -> str:
    if not run.tags.get(key):
        raise EvidenceError(f"run {run.run_id} has no {key!r} tag; only leukops training runs can be promoted")
    return run.tags[key]


def _count(run: RunRecord, key: str) -> int | None:
    value = run.metrics.get(key)
    return None if value is None else int(round(value))


def candidate_metrics(
    run: RunRecord,
    test: SplitPredictions | None = None,
    holdout: dict[str, HoldoutFigure] | None = None,
    *,
    version: str | None = None,
) -> CandidateMetrics:
    """The gate's view of a training run: its tags and metrics, with the evidence gathered for it."""
    task = get_task(required_tag(run, "task"))
    return CandidateMetrics(
        run_id=run.run_id,
        task=task.name,
        dataset_version=required_tag(run, "dataset_version"),
        classes=tuple(task.classes),
        test=test,
        val_macro_f1=run.metrics.get("val_macro_f1"),
        nucleus_enrichment=run.metrics.get("gradcam_nucleus_enrichment"),
        cell_enrichment=run.metrics.get("gradcam_cell_enrichment"),
        explain_images=_count(run, "gradcam_n_images"),
        artefact_mass=run.metrics.get("gradcam_artefact_mass"),
        shortcut_flips=_count(run, "shortcut_flips"),
        shortcut_images=_count(run, "shortcut_n_images"),
        lime_agreement=run.metrics.get(LIME_METRIC),
        holdout=holdout or {},
        version=version,
    )


def holdout_sources(settings: Settings, task: str) -> list[str]:
    """Names of the registered holdout sources that feed ``task``."""
    from pipelines.data.sources import list_sources

    return [s.name for s in list_sources(settings) if s.role == "holdout" and task in s.tasks]


def holdout_figures(run: RunRecord, sources: list[str]) -> dict[str, HoldoutFigure]:
    """The run's logged evaluation on each source (None where it was never evaluated there)."""
    return {
        source: HoldoutFigure(
            source,
            run.metrics.get(holdout_metric(source, "macro_f1")),
            run.metrics.get(holdout_metric(source, "f1_ci_low")),
            _count(run, holdout_metric(source, "n_images")),
        )
        for source in sources
    }


def test_split(store: ObjectStore, task: str, dataset_version: str) -> pd.DataFrame:
    """The test rows of a dataset version in sha256 order (the order every model is predicted in)."""
    from pipelines.data.snapshot import load_snapshot

    snap = load_snapshot(store, task, dataset_version)
    test = snap.frame[snap.frame["split"] == "test"].sort_values("sha256")
    if test.empty:
        raise EvidenceError(f"dataset {dataset_version} of task {task} has no test split to gate on")
    return test.reset_index(drop=True)


def predict_split(settings: Settings, run_id: str, store: ObjectStore, test: pd.DataFrame) -> SplitPredictions:
    """Forward passes of the run's model over the test rows; an undecodable object is named."""
    from pipelines.data.imagefacts import ImageDecodeError, decode_image
    from pipelines.model.bundle import load_model

    loaded = load_model(run_model_uri(run_id), settings=settings)
    predicted = []
    keys = list(test["key"])
    for start in range(0, len(keys), PREDICT_BATCH):
        images = []
        for key in keys[start : start + PREDICT_BATCH]:
            try:
                images.append(decode_image(store.get_bytes(key)).rgb)
            except ImageDecodeError as err:
                raise EvidenceError(f"test image {key} of run {run_id}'s gate evidence: {err}") from err
        predicted += [loaded.classes[i] for i in loaded.predict_proba(images).argmax(axis=1)]
    sources = list(test["source"]) if "source" in test else None  # each image's site (the per-site gate checks)
    return SplitPredictions.from_labels(loaded.classes, list(test["sha256"]), list(test["label"]), predicted, sources)


def test_predictions(
    registry: Registry, settings: Settings, store: ObjectStore, run_id: str, task: str, dataset_version: str
) -> SplitPredictions:
    """The run's per-image predictions on the test split of ``dataset_version``: cached, or predicted now."""
    path = gate_predictions_path(dataset_version)
    cached = registry.read_text(run_id, path)
    if cached is not None:
        predictions = SplitPredictions.from_json(cached, f"run {run_id} artifact {path}")
    else:
        predictions = predict_split(settings, run_id, store, test_split(store, task, dataset_version))
        registry.log_text(run_id, predictions.to_json(), path)
    if predictions.classes != tuple(get_task(task).classes):
        raise EvidenceError(
            f"run {run_id} predicts classes {list(predictions.classes)}, task {task} has {get_task(task).classes}"
        )
    return predictions
