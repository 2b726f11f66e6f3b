"""One training candidate end to end: snapshot → cache → loaders → fit → test evaluation → MLflow run.

``train_candidate`` is the entry point the CLI (``leukops train``) and the Airflow nightly DAG both call;
it wires the pure pieces (``datasets``, ``train``, ``evaluate``) to the adapters (``storage``,
``tracking``) and returns a `CandidateSummary`, built from the logged run (so an Airflow retry that finds
the finished run reports exactly what training reported). The run key (task, dataset version, backbone,
augmentation, image size, subset and optimisation config) names the checkpoint and tags the MLflow run,
so a crashed candidate resumes both where it stopped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pipelines.core.taxonomy import get_task
from pipelines.data.datasets import (
    ImageFileDataset,
    fill_cache,
    label_indices,
    limit_rows,
    make_loader,
    site_weights,
    split_rows,
)
from pipelines.io import layout, tracking
from pipelines.io.registry import RunRecord
from pipelines.model.checkpoint import checkpoint_file, run_key
from pipelines.model.devices import pick_device, seed_everything
from pipelines.model.recipe import balanced_class_weights
from pipelines.model.stages import Stage, fine_tuning_stages
from pipelines.model.train import (
    Callback,
    EpochRecord,
    FitResult,
    TrainConfig,
    fit,
)
from pipelines.model.training_request import TrainingInputError, check_request

if TYPE_CHECKING:
    import pandas as pd
    from torch.utils.data import DataLoader

    from pipelines.core.settings import RetrainConfig, Settings
    from pipelines.model.augment import Augmentation
    from pipelines.model.backbones import Backbone
    from pipelines.model.evaluate import EvalResult
    from pipelines.model.warm_start import ChampionReader


@dataclass(frozen=True)
class CandidateSpec:
    """What to train: everything that makes two runs different (and so keys the checkpoint)."""

    task: str
    backbone: str
    augment: str = "mixup"
    image_size: int | None = None
    max_images: int | None = None
    batch_size: int = 32
    mask_corner: bool = False
    cell_crop: float = 0.0  # > 0: crop to the central cell, that many times its nucleus extent (model.cell_crop)
    device: str | None = None
    tta: tuple[str, ...] = ()  # flip views averaged with the identity at evaluation (pipelines.model.predict)
    stain_augment: str = "none"  # HED jitter in training (pipelines.model.stain)
    stain_strength: float = 0.1
    stain_normalize: str = "none"  # a normaliser fitted on the train split, saved in the preprocessing
    stain_reference_images: int = 32
    site_balance: float = 0.5  # training draws an image with weight n_site^-site_balance (data.datasets)
    warm_start: bool = False  # start from the task's @champion when it is the same network (`champion_start`)


def train_config(retrain: RetrainConfig, **overrides: Any) -> TrainConfig:
    """The recipe: ``settings.retrain``'s values of every `TrainConfig` field, then the ``overrides`` that
    are not None (a CLI option left out, a benchmark's budget). The one source of training defaults."""
    names = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise TrainingInputError(f"bad training option(s) {unknown}; known: {sorted(names)}")
    values = {name: getattr(retrain, name) for name in names}
    return TrainConfig(**(values | {k: v for k, v in overrides.items() if v is not None}))


def stages_for(backbone: Backbone, config: TrainConfig) -> list[Stage]:
    """Full fine-tuning with layer-wise LR decay for ImageNet weights (after ``head_epochs`` of the head
    alone), one uniform stage from random init."""
    return fine_tuning_stages(config, pretrained=backbone.pretrained, head=["head"])


@dataclass
class PreparedRun:
    """Everything resolved before training starts: data on local disk, the module, transforms, loaders."""

    spec: CandidateSpec
    config: TrainConfig
    dataset_version: str
    dataset_uri: str
    frame: pd.DataFrame  # the (limited) snapshot rows, with the cached file in ``path``
    backbone: Backbone
    preprocessing: dict[str, Any]
    augmentation: Augmentation
    loaders: dict[str, DataLoader]
    extra_tags: dict[str, str] = field(default_factory=dict)  # e.g. the Airflow run key; also keys the run

    @property
    def classes(self) -> tuple[str, ...]:
        return get_task(self.spec.task).classes

    def resolved_config(self) -> dict[str, Any]:
        """The run's params; also what keys its checkpoint and MLflow run."""
        return {
            "candidate": asdict(self.spec),
            "train": asdict(self.config),
            "preprocessing": self.preprocessing,
            "dataset_version": self.dataset_version,
            "weights_source": self.backbone.weights_source,
            "image_size": self.backbone.image_size,
            "extra_tags": self.extra_tags,
        }

    def tags(self) -> dict[str, str]:
        return {
            "task": self.spec.task,
            "dataset_version": self.dataset_version,
            "backbone": self.spec.backbone,
            "augment": self.spec.augment,
            "pretrained": str(self.backbone.pretrained).lower(),
            "weights_source": self.backbone.weights_source,
            **self.extra_tags,
        }


def _loaders(spec: CandidateSpec, frame: pd.DataFrame, preprocessing: dict, augmentation: Augmentation, seed: int):
    """train/val/test DataLoaders over the cached files (``frame.path``); augmentation on train only, and
    the training draw balanced across the frame's sources (``source``) by ``spec.site_balance``."""
    from pipelines.model.preprocess import build_transform

    classes = get_task(spec.task).classes
    device = pick_device(spec.device)
    loaders = {}
    for split in ("train", "val", "test"):
        rows, train = split_rows(frame, split), split == "train"
        transform = build_transform(preprocessing, augmentation.pil_transform if train else None, train=train)
        dataset = ImageFileDataset(list(rows["path"]), label_indices(list(rows["label"]), classes), transform)
        if split != "test":  # read every epoch; the test split is read once
            dataset.keep_prepared()
        weights = site_weights(list(rows["source"]), spec.site_balance) if train and "source" in rows else None
        loaders[split] = make_loader(
            dataset, batch_size=spec.batch_size, train=train, device=device, seed=seed, sample_weights=weights
        )
    return loaders


def prepare_run(
    settings: Settings,
    spec: CandidateSpec,
    config: TrainConfig,
    dataset_version: str | None = None,
    extra_tags: dict[str, str] | None = None,
    champion_reader: ChampionReader | None = None,
) -> PreparedRun:
    """Load the snapshot, fill the local image cache, then `build_run` on it; a warm-started spec starts
    from what ``champion_reader`` (`pipelines.trust.champion_start`) returns."""
    from pipelines.data.snapshot import load_snapshot
    from pipelines.io.storage import ObjectStore
    from pipelines.model.warm_start import WARM_START_TAG

    check_request(spec, config)
    if spec.warm_start and champion_reader is None:
        raise ValueError(f"{spec.task}: warm_start is on but no champion reader was given to read @champion with")
    store = ObjectStore.from_settings(settings)
    snapshot = load_snapshot(store, spec.task, dataset_version)
    frame = limit_rows(snapshot.frame, spec.max_images)
    frame = frame.assign(path=fill_cache(store, frame, Path(settings.state_dir) / "cache"))
    dataset_uri = store.uri(layout.dataset_key(spec.task, snapshot.version))
    start = champion_reader(settings, spec) if spec.warm_start and champion_reader else None
    tags = dict(extra_tags or {}) | ({WARM_START_TAG: start.label} if start else {})
    return build_run(spec, config, frame, snapshot.version, dataset_uri, tags, start.state if start else None)


def build_run(
    spec: CandidateSpec,
    config: TrainConfig,
    frame: pd.DataFrame,
    dataset_version: str,
    dataset_uri: str,
    extra_tags: dict[str, str] | None = None,
    initial_state: dict[str, torch.Tensor] | None = None,
) -> PreparedRun:
    """The backbone, preprocessing, augmentation and loaders for ``frame`` (rows with a local ``path``, a
    ``label`` and a ``split``); no S3, no MLflow: the benchmark calls it on a folder's images.
    ``initial_state``: weights to start from instead of the backbone's (ImageNet) ones."""
    from pipelines.model.augment import build_augmentation
    from pipelines.model.backbones import create_backbone
    from pipelines.model.preprocess import preprocessing_from, with_stain_normalizer

    check_request(spec, config)
    classes = get_task(spec.task).classes
    seed_everything(config.seed)
    backbone = create_backbone(spec.backbone, len(classes), pretrained=True, image_size=spec.image_size)
    if initial_state is not None:
        backbone.model.load_state_dict(initial_state)
    preprocessing = with_stain_normalizer(
        preprocessing_from(backbone.data_config, mask_corner=spec.mask_corner, cell_crop=spec.cell_crop),
        spec.stain_normalize,
        list(split_rows(frame, "train")["path"]),
        spec.stain_reference_images,
        config.seed,
    )
    augmentation = build_augmentation(
        spec.augment,
        len(classes),
        backbone.image_size,
        mean=preprocessing["mean"],
        interpolation=preprocessing["interpolation"],
        label_smoothing=config.label_smoothing,
        stain=spec.stain_augment,
        stain_strength=spec.stain_strength,
    )
    return PreparedRun(
        spec=spec,
        config=config,
        dataset_version=dataset_version,
        dataset_uri=dataset_uri,
        frame=frame,
        backbone=backbone,
        preprocessing=preprocessing,
        augmentation=augmentation,
        loaders=_loaders(spec, frame, preprocessing, augmentation, config.seed),
        extra_tags=dict(extra_tags or {}),
    )


@dataclass(frozen=True)
class CandidateSummary:
    """What a finished candidate run reports (the ``leukops train --json`` output, the Airflow XCom).

    Always read back from the MLflow run (`from_run`), whether the run was just trained or is a finished
    run found again by an Airflow retry, so both paths report the same facts.
    """

    run_id: str
    model_uri: str
    task: str
    dataset_version: str
    backbone: str
    augment: str
    pretrained: bool
    weights_source: str
    image_size: int
    val_f1: float
    test_f1: float
    test_accuracy: float
    test_f1_ci: tuple[float, float]
    epochs_run: int
    kept_epoch: int
    stop_reason: str
    resumed_from_epoch: int | None
    train_images_per_s: float
    n_train: int
    n_test: int
    device: str

    @classmethod
    def from_run(cls, run: RunRecord) -> CandidateSummary:
        tags, metrics = run.tags, run.metrics
        resumed = tags.get("resumed_from_epoch")
        return cls(
            run_id=run.run_id,
            model_uri=layout.run_model_uri(run.run_id),
            **{key: tags[key] for key in ("task", "dataset_version", "backbone", "augment", "weights_source")},
            pretrained=tags["pretrained"] == "true",
            image_size=int(metrics["image_size"]),
            val_f1=metrics["val_macro_f1"],
            test_f1=metrics["test_macro_f1"],
            test_accuracy=metrics["test_accuracy"],
            test_f1_ci=(metrics["test_f1_ci_low"], metrics["test_f1_ci_high"]),
            epochs_run=int(metrics["epochs_run"]),
            kept_epoch=int(metrics["kept_epoch"]),
            stop_reason=tags["stop_reason"],
            resumed_from_epoch=int(resumed) if resumed else None,
            train_images_per_s=round(metrics["train_images_per_s"], 2),
            n_train=int(metrics["n_train"]),
            n_test=int(metrics["n_test"]),
            device=tags["device"],
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "test_f1_ci": list(self.test_f1_ci)}


def finished_candidate(settings: Settings, tags: dict[str, str]) -> CandidateSummary | None:
    """The latest finished candidate run carrying ``tags`` (e.g. an Airflow candidate key), or None."""
    run = tracking.find_finished_run(settings, tags)
    return CandidateSummary.from_run(run) if run else None


EPOCH_CURVES = ("train_loss", "val_loss", "val_macro_f1", "val_macro_f1_se", "val_accuracy", "lr", "images_per_s")


@dataclass
class _EpochCurves:
    """The `fit` callback that logs each epoch's `EPOCH_CURVES` under ``epoch/`` (step = epoch)."""

    tracker: tracking.TrainingTracker

    def on_epoch_end(self, record: EpochRecord) -> None:
        values = asdict(record)
        self.tracker.log_metrics({f"epoch/{k}": float(values[k]) for k in EPOCH_CURVES}, step=record.epoch)


def _log_test_evaluation(tracker: tracking.TrainingTracker, result: EvalResult, sites: dict[str, EvalResult]) -> None:
    from pipelines.model.evaluate import confusion_matrix_figure, site_metrics, sites_report

    tracker.log_metrics(result.to_metrics("test_") | site_metrics(sites))
    tracker.log_dict(result.to_dict(), layout.TEST_REPORT)
    tracker.log_dict(sites_report(sites), layout.SITE_REPORT)
    tracker.log_text(result.classification_report(), layout.PER_CLASS_REPORT)
    tracker.log_figure(confusion_matrix_figure(result), layout.CONFUSION_MATRIX)


def _fit_metrics(result: FitResult, run: PreparedRun) -> dict[str, float]:
    """Run-level metrics; ``val_macro_f1`` and ``val_loss`` are the kept epoch's."""
    return {
        "val_macro_f1": result.kept_val_f1,
        "val_loss": result.history[result.kept_epoch].val_loss,
        "kept_epoch": result.kept_epoch,
        "epochs_run": len(result.history),
        "planned_steps": result.planned_steps,
        "train_seconds": result.train_seconds,
        "train_images_per_s": result.images_per_s,
        **{f"n_{split}": len(loader.dataset) for split, loader in run.loaders.items()},
        "image_size": run.backbone.image_size,
    }


def _fit_tags(result: FitResult, device: torch.device) -> dict[str, str]:
    resumed = {"resumed_from_epoch": str(result.resumed_from_epoch)} if result.resumed_from_epoch is not None else {}
    return {"stop_reason": result.stop_reason, "device": device.type, **resumed}


def fit_prepared(
    run: PreparedRun, checkpoint_path: Path | None = None, callbacks: Sequence[Callback] = ()
) -> FitResult:
    """THE training call of every entry point (CLI, DAG, benchmark): the recipe's stages and class
    weights, the augmentation's mixer, `fit` on the run's loaders."""
    classes = run.classes
    weights = None
    if run.config.class_balanced:
        weights = balanced_class_weights(run.loaders["train"].dataset.labels, len(classes))
    return fit(
        run.backbone.model,
        run.loaders["train"],
        run.loaders["val"],
        stages=stages_for(run.backbone, run.config),
        config=run.config,
        checkpoint_path=checkpoint_path,
        callbacks=callbacks,
        mixer=run.augmentation.batch_mixer,
        class_weights=weights,
        device=pick_device(run.spec.device),
        val_sites=list(split_rows(run.frame, "val")["source"]) if "source" in run.frame else None,
    )


def train_prepared(settings: Settings, run: PreparedRun) -> CandidateSummary:
    """Fit (resuming a crashed run of the same key), evaluate on test, log the run and its model. The key
    names the checkpoint and MLflow run: its lease (``io/lease``) makes an identical training wait, then
    train its own run."""
    from pipelines.io.lease import Lease
    from pipelines.io.storage import ObjectStore

    key = run_key(run.resolved_config())
    with Lease(ObjectStore.from_settings(settings), layout.training_lease_name(key)):
        return _train_leased(settings, run, key)


def _train_leased(settings: Settings, run: PreparedRun, key: str) -> CandidateSummary:
    from pipelines.model.bundle import ModelBundle
    from pipelines.model.calibration import fit_calibration
    from pipelines.model.evaluate import evaluate_logits, evaluate_sites
    from pipelines.model.predict import loader_logits
    from pipelines.model.pyfunc import log_model

    resolved = run.resolved_config()
    checkpoint = checkpoint_file(settings.state_dir, key)
    device = pick_device(run.spec.device)
    name = f"{run.spec.backbone}-{run.spec.augment}"
    with tracking.TrainingTracker(settings, run_key=key, run_name=name, tags=run.tags()) as tracker:
        tracker.log_params(resolved)
        tracker.log_snapshot(run.spec.task, run.dataset_version, run.frame, run.dataset_uri)
        result = fit_prepared(run, checkpoint, callbacks=[_EpochCurves(tracker)])
        # the temperature is fitted on val and saved in the bundle, with the TTA views
        calibration = fit_calibration(run.backbone.model, run.loaders["val"], device, run.spec.tta)
        tracker.log_metrics(calibration.to_metrics())
        labels, logits = loader_logits(run.backbone.model, run.loaders["test"], device, calibration.inference.tta)
        sources = split_rows(run.frame, "test").get("source")  # each test image's site, in loader order
        sites = evaluate_sites(labels, logits, list(run.classes), calibration.inference, sources)
        _log_test_evaluation(tracker, evaluate_logits(labels, logits, list(run.classes), calibration.inference), sites)
        tracker.log_metrics(_fit_metrics(result, run))
        tracker.set_tags(_fit_tags(result, device))
        bundle = ModelBundle.for_backbone(
            run.spec.task, run.classes, run.backbone, run.preprocessing, calibration.inference
        )
        log_model(tracker, bundle, result.kept_state, run.loaders["train"].dataset.paths[0].read_bytes())
    checkpoint.unlink(missing_ok=True)  # the run holds the model now; a rerun trains afresh
    return CandidateSummary.from_run(tracking.read_run(settings, tracker.run_id))


STAIN_OPTIONS = ("stain_augment", "stain_strength", "stain_normalize", "stain_reference_images")


def candidate_spec(retrain: RetrainConfig, task: str, backbone: str, **options: Any) -> CandidateSpec:
    """A `CandidateSpec` whose options left None (augment, image_size, max_images, batch_size, ...) come from
    ``settings.retrain``: the task's `retrain.per_task` entry, else the global value (augment: the grid's first
    augmentation; cell_crop: off)."""
    defaults = {
        "augment": retrain.augmentations[0],
        "image_size": retrain.image_size,
        "max_images": retrain.max_images,
        "batch_size": retrain.batch_size,
        "tta": tuple(retrain.tta),
        "site_balance": retrain.site_balance,
        "warm_start": retrain.warm_start,
        "cell_crop": 0.0,
        **{name: getattr(retrain, name) for name in STAIN_OPTIONS},
        **retrain.recipe_of(task),
    }
    given = {k: v for k, v in options.items() if v is not None}
    return CandidateSpec(task, backbone, **(defaults | given))


def train_candidate(
    settings: Settings,
    task: str,
    backbone: str,
    augment: str | None = None,
    *,
    dataset_version: str | None = None,
    image_size: int | None = None,
    max_images: int | None = None,
    batch_size: int | None = None,
    mask_corner: bool = False,
    device: str | None = None,
    extra_tags: dict[str, str] | None = None,
    stain: dict[str, Any] | None = None,
    site_balance: float | None = None,
    warm_start: bool | None = None,
    cell_crop: float | None = None,
    champion_reader: ChampionReader | None = None,
    **train_options: Any,
) -> CandidateSummary:
    """Train one candidate on the task's snapshot (latest unless ``dataset_version``), evaluate it on the
    test split and log it all to MLflow; returns its summary (run_id, val_f1, test_f1, ...).
    Every option left None resolves from ``settings.retrain``; ``train_options`` are ``TrainConfig``
    fields (epochs, lr, time_budget_min, ...); ``stain`` holds `STAIN_OPTIONS` values; ``extra_tags`` (e.g.
    the Airflow run key) are set on the MLflow run and are part of its run key; ``champion_reader`` reads the
    weights a warm-started candidate starts from (`pipelines.trust.champion_start`)."""
    spec = candidate_spec(
        settings.retrain,
        task,
        backbone,
        augment=augment,
        image_size=image_size,
        max_images=max_images,
        batch_size=batch_size,
        mask_corner=mask_corner,
        device=device,
        site_balance=site_balance,
        warm_start=warm_start,
        cell_crop=cell_crop,
        **(stain or {}),
    )
    config = train_config(settings.retrain, **train_options)
    prepared = prepare_run(settings, spec, config, dataset_version, extra_tags, champion_reader)
    return train_prepared(settings, prepared)
