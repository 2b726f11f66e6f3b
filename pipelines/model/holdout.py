"""External validation as a first-class figure: a model on the images of a source it never learned from.

A holdout source (``leukops source add --role holdout``) is ingested and validated like any other, and its
images never enter a training snapshot. Two entry points:

* `evaluate_on_source` (``leukops evaluate --model M --source S``): one model (an alias or a run id) on one
  source: macro-F1 with its bootstrap 95% CI, accuracy, per-class precision/recall, the calibrated ECE and
  the ECE the same logits had at temperature 1. Read-only.
  A source labelling a subset of the task's classes is scored on the classes it carries
  (``classes_scored``; ``absent_classes``); predictions into an absent class count as errors
  (``predicted_absent``) and the ``scoring`` line says so.
* `evaluate_run_on_holdouts` (``leukops evaluate --model RUN --all-holdouts``, the retrain DAG): one run on
  every registered holdout source of its task; the figures are logged to the run as metrics
  ``layout.holdout_metric(source, name)`` (``holdout.<source>.macro_f1``, ``.f1_ci_low``, ``.n_images``, ...:
  what the gate's ``holdout_macro_f1_min`` reads) and the full report as ``layout.holdout_report_path``.

Predictions go through the model's own predict function (`pipelines.model.evaluate.evaluate_model`: the
bundle's temperature and TTA). Images of the model's own train/val splits are left out and counted.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from pipelines.core.errors import LeukopsError
from pipelines.io import layout, tracking
from pipelines.io.registry import ALIASES

if TYPE_CHECKING:
    from pipelines.core.settings import Settings
    from pipelines.data.sources import Source
    from pipelines.io.storage import ObjectStore
    from pipelines.model.bundle import LoadedModel
    from pipelines.model.evaluate import EvalResult


class HoldoutError(LeukopsError):
    """An external validation that cannot run (unknown model, wrong task, nothing to evaluate)."""


@dataclass(frozen=True)
class SourceEvaluation:
    """A model's figures on one source, and how the evaluated set was formed."""

    source: str
    result: EvalResult
    n_other_labels: int  # accepted images whose label is not a class of the model's task
    excluded_seen_in_training: int  # images of the model's own train/val splits

    def metrics(self) -> dict[str, float]:
        """The run metrics ``holdout.<source>.<name>`` (names documented at ``layout.holdout_metric``)."""
        figures = self.result.to_metrics() | {
            "n_images": self.result.n,
            "n_other_labels": self.n_other_labels,
            "excluded_seen_in_training": self.excluded_seen_in_training,
        }
        return {layout.holdout_metric(self.source, name): float(value) for name, value in figures.items()}

    def summary(self) -> dict[str, Any]:
        """Small JSON: the headline figures of this source."""
        r = self.result
        recall = {name: s.recall for name, s in r.per_class.items() if name not in r.absent_classes}
        return {
            "macro_f1": r.macro_f1,
            "f1_ci": [r.f1_ci_low, r.f1_ci_high],
            "ece": r.ece,
            "ece_uncalibrated": r.ece_uncalibrated,
            "recall": recall,
            "n_images": r.n,
            "classes_scored": list(r.classes_scored),
            "classes_absent": list(r.absent_classes),
            "predicted_absent": r.predicted_absent,
        }


def model_uri(settings: Settings, model: str, task: str) -> str:
    """The URI of ``model``: an alias of the task's registered model, or a run id."""
    if model in ALIASES:
        return layout.alias_uri(settings.registered_model_name(task), model)
    return layout.run_model_uri(model)


def run_of(settings: Settings, model: str, task: str | None = None) -> tuple[str, str]:
    """(run id, task) of ``model``: an alias of ``task``'s registered model, or a run id (its task from the
    run's tags unless given)."""
    from pipelines.io.registry import Registry

    if model in ALIASES:
        if not task:
            raise HoldoutError(f"--model {model} names an alias of a task's registered model: pass --task")
        version = Registry.from_settings(settings).at_alias(task, model)
        if version is None or not version.run_id:
            raise HoldoutError(f"{settings.registered_model_name(task)} has no @{model} version trained by a run")
        return version.run_id, task
    task = task or tracking.run_tags(settings, model).get("task")
    if not task:
        raise HoldoutError(f"run {model!r} has no task tag: pass --task")
    return model, task


def evaluate_on_source(settings: Settings, model: str, source_name: str, *, task: str | None = None) -> dict:
    """External validation of ``model`` (an alias of the task's registered model, or a run id) on every
    accepted image of ``source_name`` labelled with a class of the model's task, minus the images of the
    model's own train/val splits (counted in ``excluded_seen_in_training``)."""
    from pipelines.data.sources import load_source
    from pipelines.io.storage import ObjectStore
    from pipelines.model.bundle import load_model

    source = load_source(source_name, settings)
    if task is None and len(source.tasks) != 1:
        raise HoldoutError(f"source {source_name!r} feeds tasks {list(source.tasks)}: pass --task")
    uri = model_uri(settings, model, task or source.tasks[0])
    loaded = load_model(uri, settings=settings)
    evaluation = evaluate_loaded(settings, ObjectStore.from_settings(settings), loaded, source)
    result = evaluation.result
    return {
        "model_uri": uri,
        "run_id": loaded.run_id,
        "task": loaded.task,
        "source": source_name,
        "macro_f1": result.macro_f1,
        "accuracy": result.accuracy,
        "f1_ci": [result.f1_ci_low, result.f1_ci_high],
        "bootstrap": result.bootstrap,
        "ece": result.ece,
        "ece_uncalibrated": result.ece_uncalibrated,
        "temperature": loaded.inference.temperature,
        "tta": list(loaded.inference.tta),
        "per_class": {name: asdict(scores) for name, scores in result.per_class.items()},
        "n": result.n,
        "n_other_labels": evaluation.n_other_labels,
        "excluded_seen_in_training": evaluation.excluded_seen_in_training,
        "absent_classes": list(result.absent_classes),
        "classes_scored": list(result.classes_scored),
        "predicted_absent": result.predicted_absent,
        "scoring": result.scoring_note(),
    }


def evaluate_loaded(settings: Settings, store: ObjectStore, loaded: LoadedModel, source: Source) -> SourceEvaluation:
    """Evaluate a loaded model on a source's accepted, unseen images of its task's classes."""
    from pipelines.data.manifests import accepted_rows
    from pipelines.model.evaluate import evaluate_model

    if loaded.task not in source.tasks:
        raise HoldoutError(f"source {source.name!r} feeds {list(source.tasks)}, not the model's task {loaded.task!r}")
    rows = accepted_rows(store, source.name).drop_duplicates("sha256")
    seen = _seen_in_training(settings, store, loaded)
    unseen = rows[~rows["sha256"].isin(seen)]  # images the model learned from or was selected on
    usable = unseen[unseen["label"].isin(loaded.classes)]
    if usable.empty:
        raise HoldoutError(
            f"source {source.name!r} has no accepted images labelled with a class of {loaded.task!r} "
            f"({list(loaded.classes)}); ingest it first (`leukops ingest --source {source.name}`)"
        )
    return SourceEvaluation(
        source=source.name,
        result=evaluate_model(loaded, store, usable),
        n_other_labels=int(len(unseen) - len(usable)),
        excluded_seen_in_training=int(len(rows) - len(unseen)),
    )


def holdout_sources(settings: Settings, task: str) -> list[Source]:
    """The registered sources with role ``holdout`` that feed ``task``, by name."""
    from pipelines.data.sources import list_sources

    return [s for s in list_sources(settings) if s.role == "holdout" and task in s.tasks]


def evaluate_run_on_holdouts(run_id: str, task: str, settings: Settings) -> dict:
    """Evaluate a training run's model on every holdout source of ``task`` and log the figures to the run.

    Returns small JSON: ``{"run_id", "task", "sources": {name: summary}, "skipped": {name: reason},
    "min_macro_f1"}``. A source with nothing to evaluate (not ingested yet) is skipped with its reason,
    and logs nothing: the gate counts an unmeasured holdout as a failed check.
    """
    from pipelines.io.storage import ObjectStore
    from pipelines.model.bundle import load_model

    loaded = load_model(layout.run_model_uri(run_id), settings=settings)
    if loaded.task != task:
        raise HoldoutError(f"run {run_id!r} trained task {loaded.task!r}, not {task!r}")
    store = ObjectStore.from_settings(settings)
    done: dict[str, SourceEvaluation] = {}
    skipped: dict[str, str] = {}
    for source in holdout_sources(settings, task):
        try:
            done[source.name] = evaluate_loaded(settings, store, loaded, source)
        except HoldoutError as err:
            skipped[source.name] = str(err)
    metrics = {name: value for ev in done.values() for name, value in ev.metrics().items()}
    reports = {
        layout.holdout_report_path(name): json.dumps(ev.result.to_dict(), indent=2).encode()
        for name, ev in done.items()
    }
    if done:
        tracking.log_to_run(settings, run_id, metrics, reports)
    return {
        "run_id": run_id,
        "task": task,
        "sources": {name: ev.summary() for name, ev in done.items()},
        "skipped": skipped,
        "min_macro_f1": min((ev.result.macro_f1 for ev in done.values()), default=None),
    }


def _seen_in_training(settings: Settings, store: ObjectStore, loaded: LoadedModel) -> set[str]:
    """sha256 of the train and val images of the snapshot the model was trained on (none if unknown)."""
    from pipelines.data.snapshot import load_snapshot

    version = tracking.run_tags(settings, loaded.run_id).get("dataset_version") if loaded.run_id else None
    if not version:
        return set()
    frame = load_snapshot(store, loaded.task, version).frame
    return set(frame.loc[frame["split"].isin(["train", "val"]), "sha256"])
