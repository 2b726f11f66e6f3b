"""MLflow adapter: training runs and the canonical model artifact (with registry.py, the only mlflow user).

A training run logs: params (the resolved config), per-epoch metrics, the dataset snapshot as MLflow
inputs (one per split) plus version/count tags, evaluation metrics and artifacts, and ONE model at
artifact path ``model``. That model is a pyfunc (so ``mlflow models serve`` serves it: base64 image in,
class probabilities out) whose artifacts are the state dict and ``bundle.json`` — backbone name, classes,
task and the full preprocessing dict, like a MONAI bundle's metadata. ``load_model`` rebuilds the real
timm module through ``pipelines.model.backbones.create_backbone`` (named layers intact for Grad-CAM), unlike
MLflow 3's default pytorch ``pt2`` export, which loads back as a layer-less GraphModule.
"""

from __future__ import annotations

import base64
import contextlib
import json
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

from pipelines.core.errors import LeukopsError
from pipelines.data.imagefacts import decode_image

if TYPE_CHECKING:
    from torch import nn

    from pipelines.model.backbones import Backbone
    from pipelines.core.settings import Settings
    from pipelines.model.train import EpochRecord

MODEL_ARTIFACT_PATH = "model"
BUNDLE_FORMAT = 1
BUNDLE_FILE = "bundle.json"
WEIGHTS_FILE = "weights.pt"
RUN_KEY_TAG = "leukops_run_key"
MAX_PARAM_CHARS = 6000  # MLflow's limit on one param value
SERVING_REQUIREMENTS = ("torch", "torchvision", "timm", "numpy", "pandas", "pillow", "opencv-python-headless")


class TrackingError(LeukopsError):
    """An MLflow run or model could not be read or written; the message names the URI."""


# -- the model bundle -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelBundle:
    """What travels with the weights: enough to rebuild the module and preprocess exactly as in training."""

    task: str
    classes: list[str]
    backbone: str
    image_size: int
    pretrained: bool  # how the trained weights started (ImageNet or random init)
    preprocessing: dict[str, Any]  # pipelines.model.preprocess: ROI crop, corner mask, size, mean/std
    gradcam_layer_name: str
    # backbones.describe() (head size, dropout, data config, weights origin); {} = the factory's defaults
    backbone_config: dict[str, Any] = field(default_factory=dict)
    format: int = BUNDLE_FORMAT

    @classmethod
    def for_backbone(cls, task: str, classes: Sequence[str], backbone: Backbone, preprocessing: dict) -> ModelBundle:
        from pipelines.model.backbones import describe

        return cls(
            task=task,
            classes=list(classes),
            backbone=backbone.name,
            image_size=backbone.image_size,
            pretrained=backbone.pretrained,
            preprocessing=preprocessing,
            gradcam_layer_name=backbone.gradcam_layer_name,
            backbone_config=describe(backbone),
        )

    def build(self) -> Backbone:
        """The architecture, randomly initialised, through the one factory (the caller loads the weights)."""
        from pipelines.model.backbones import create_backbone, rebuild

        if self.backbone_config:
            return rebuild(self.backbone_config)
        return create_backbone(self.backbone, len(self.classes), pretrained=False, image_size=self.image_size)


@dataclass
class LoadedModel:
    """A trained classifier rebuilt from its artifact: the real timm module, in eval mode."""

    module: nn.Module
    backbone: Backbone
    task: str
    classes: list[str]
    preprocessing: dict[str, Any]
    run_id: str | None
    bundle: ModelBundle
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def gradcam_layer(self) -> nn.Module:
        return self.backbone.gradcam_layer

    def batch(self, rgb_list: Sequence[np.ndarray]) -> torch.Tensor:
        """The preprocessed input tensor (N×3×H×W) for these RGB uint8 images."""
        from pipelines.model.preprocess import to_tensor_batch

        return to_tensor_batch(list(rgb_list), self.preprocessing).to(self.device)

    @torch.no_grad()
    def predict_proba(self, rgb_list: Sequence[np.ndarray], batch_size: int = 64) -> np.ndarray:
        chunks = [
            torch.softmax(self.module(self.batch(rgb_list[i : i + batch_size])).float(), dim=-1).cpu().numpy()
            for i in range(0, len(rgb_list), batch_size)
        ]
        return np.concatenate(chunks) if chunks else np.zeros((0, len(self.classes)), np.float32)

    @torch.no_grad()
    def embed(self, rgb_list: Sequence[np.ndarray], batch_size: int = 64) -> np.ndarray:
        chunks = [
            self.backbone.embed(self.batch(rgb_list[i : i + batch_size])).float().cpu().numpy()
            for i in range(0, len(rgb_list), batch_size)
        ]
        return np.concatenate(chunks)


def _rebuild(bundle_dir: Path, run_id: str | None, device: torch.device | None) -> LoadedModel:
    raw = json.loads((bundle_dir / BUNDLE_FILE).read_text())
    if raw.get("format") != BUNDLE_FORMAT:
        raise TrackingError(f"{bundle_dir / BUNDLE_FILE}: unsupported bundle format {raw.get('format')!r}")
    bundle = ModelBundle(**raw)
    backbone = bundle.build()
    state = torch.load(bundle_dir / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    backbone.model.load_state_dict(state)
    device = device or torch.device("cpu")
    module = backbone.model.to(device).eval()
    return LoadedModel(
        module, backbone, bundle.task, list(bundle.classes), bundle.preprocessing, run_id, bundle, device
    )


def load_model(
    model_uri: str, device: str | torch.device | None = None, settings: Settings | None = None
) -> LoadedModel:
    """Load a canonical model: ``runs:/<run_id>/model``, ``models:/leukops-<task>@champion``, or a path.

    The files are fetched from the MLflow server of ``settings`` into a temporary folder, read, and removed.
    """
    from pipelines.core.settings import get_settings

    uri = (settings or get_settings()).mlflow_tracking_uri
    with tempfile.TemporaryDirectory(prefix="leukops-model-") as tmp:
        try:
            local = Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=model_uri, dst_path=tmp, tracking_uri=uri, registry_uri=uri
                )
            )
        except (MlflowException, OSError) as err:
            raise TrackingError(f"cannot download model {model_uri!r} from {uri}: {err}") from err
        if not (local / "MLmodel").exists():
            raise TrackingError(f"{model_uri!r} is not an MLflow model (no MLmodel file)")
        bundle_dir = local / "artifacts"
        if not (bundle_dir / BUNDLE_FILE).exists():
            raise TrackingError(f"{model_uri!r} is not a leukops model (no artifacts/{BUNDLE_FILE})")
        info = mlflow.models.Model.load(str(local / "MLmodel"))
        run_id = info.run_id or (info.metadata or {}).get("run_id")
        return _rebuild(bundle_dir, run_id, torch.device(device) if device else None)


class LeukopsClassifier(mlflow.pyfunc.PythonModel):
    """The pyfunc flavour: a DataFrame with a base64 ``image`` column → probabilities per class."""

    def load_context(self, context) -> None:
        self.model = _rebuild(Path(context.artifacts["bundle"]).parent, None, None)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        rgb = [decode_image(_image_bytes(value)).rgb for value in model_input["image"]]
        proba = self.model.predict_proba(rgb)
        out = pd.DataFrame(proba, columns=self.model.classes)
        out.insert(0, "confidence", proba.max(axis=1))
        out.insert(0, "predicted_class", [self.model.classes[i] for i in proba.argmax(axis=1)])
        return out


def _image_bytes(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else base64.b64decode(value)


def model_signature(classes: Sequence[str]) -> ModelSignature:
    outputs = [ColSpec("string", "predicted_class"), ColSpec("double", "confidence")]
    return ModelSignature(
        inputs=Schema([ColSpec("string", "image")]),
        outputs=Schema(outputs + [ColSpec("double", c) for c in classes]),
    )


def _pip_requirements() -> list[str]:
    return [f"mlflow=={mlflow.__version__}"] + [
        f"{name}=={importlib_metadata.version(name)}" for name in SERVING_REQUIREMENTS
    ]


# -- training runs --------------------------------------------------------------------------------


def _flatten(prefix: str, value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        return {
            k: v for key, sub in value.items() for k, v in _flatten(f"{prefix}.{key}" if prefix else key, sub).items()
        }
    return {prefix: value}


class TrainingTracker:
    """One training run in MLflow; also a ``pipelines.model.train`` callback that logs every epoch.

    A run keyed by ``run_key`` that did not finish (a crash) is reopened rather than duplicated, matching
    the training checkpoint that resumes under the same key.
    """

    def __init__(self, settings: Settings, *, run_key: str, run_name: str, tags: dict[str, str]) -> None:
        self.settings = settings
        self.run_key = run_key
        self.run_name = run_name
        self.tags = {**tags, RUN_KEY_TAG: run_key}
        self.run_id: str | None = None

    def __enter__(self) -> TrainingTracker:
        mlflow.set_tracking_uri(self.settings.mlflow_tracking_uri)
        try:
            experiment = mlflow.set_experiment(self.settings.mlflow_experiment)
        except MlflowException as err:
            raise TrackingError(f"MLflow at {self.settings.mlflow_tracking_uri} refused the experiment: {err}") from err
        unfinished = mlflow.search_runs(
            [experiment.experiment_id],
            filter_string=f"tags.{RUN_KEY_TAG} = '{self.run_key}' and attributes.status != 'FINISHED'",
            output_format="list",
            max_results=1,
        )
        run_id = unfinished[0].info.run_id if unfinished else None
        run = mlflow.start_run(run_id=run_id, run_name=None if run_id else self.run_name, tags=self.tags)
        self.run_id = run.info.run_id
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        with contextlib.redirect_stdout(sys.stderr):  # MLflow prints the run URL; stdout is for --json
            mlflow.end_run("FINISHED" if exc_type is None else "FAILED")

    def log_params(self, params: dict[str, Any]) -> None:
        flat = {k: str(v)[:MAX_PARAM_CHARS] for k, v in _flatten("", params).items()}
        existing = mlflow.get_run(self.run_id).data.params
        mlflow.log_params({k: v for k, v in flat.items() if k not in existing})  # a reopened run keeps its params
        mlflow.log_dict(params, "config.json")

    def log_snapshot(self, task: str, version: str, frame: pd.DataFrame, source_uri: str) -> None:
        """Dataset version and split counts as tags, and each split as an MLflow dataset input."""
        counts = frame.groupby(["split", "label"]).size()
        tags = {"dataset_version": version, "task": task}
        tags |= {f"n_{split}": str(int(n)) for split, n in frame["split"].value_counts().items()}
        mlflow.set_tags(tags)
        mlflow.log_dict({f"{s}/{c}": int(n) for (s, c), n in counts.items()}, "dataset/split_counts.json")
        for split, rows in frame.groupby("split"):
            dataset = mlflow.data.from_pandas(
                rows[["sha256", "key", "label"]].reset_index(drop=True),
                source=source_uri,
                targets="label",
                name=f"{task}@{version}/{split}",
            )
            mlflow.log_input(dataset, context=str(split))

    def on_epoch_end(self, record: EpochRecord) -> None:
        """Per-epoch curves under ``epoch/``; run-level ``val_macro_f1`` = the best epoch's (logged last)."""
        values = asdict(record)
        keys = ("train_loss", "val_loss", "val_macro_f1", "val_accuracy", "lr", "images_per_s")
        mlflow.log_metrics({f"epoch/{k}": float(values[k]) for k in keys}, step=record.epoch)

    def log_metrics(self, metrics: dict[str, float]) -> None:
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()})

    def set_tags(self, tags: dict[str, str]) -> None:
        mlflow.set_tags(tags)

    def log_figure(self, figure, artifact_file: str) -> None:
        mlflow.log_figure(figure, artifact_file)

    def log_dict(self, data: dict[str, Any], artifact_file: str) -> None:
        mlflow.log_dict(data, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        mlflow.log_text(text, artifact_file)

    def log_model(self, bundle: ModelBundle, state_dict: dict[str, torch.Tensor], example_image: bytes) -> str:
        """Log the canonical model as the run's artifact folder ``model``; returns ``runs:/<run_id>/model``.

        Saved locally and uploaded as plain run artifacts (not ``log_model``'s separate MLflow 3 LoggedModel
        store), so ``runs:/<id>/model``, a registered version's ``models:/`` URI and ``mlflow models serve``
        all resolve to the same files.
        """
        with tempfile.TemporaryDirectory() as tmp:
            bundle_dir = Path(tmp) / "bundle"
            bundle_dir.mkdir()
            (bundle_dir / BUNDLE_FILE).write_text(json.dumps(asdict(bundle), indent=2, sort_keys=True))
            torch.save(state_dict, bundle_dir / WEIGHTS_FILE)
            model_dir = Path(tmp) / MODEL_ARTIFACT_PATH
            mlflow.pyfunc.save_model(
                path=str(model_dir),
                python_model=LeukopsClassifier(),
                artifacts={
                    "bundle": str(bundle_dir / BUNDLE_FILE),
                    "weights": str(bundle_dir / WEIGHTS_FILE),
                },
                signature=model_signature(bundle.classes),
                input_example=pd.DataFrame({"image": [base64.b64encode(example_image).decode()]}),
                pip_requirements=_pip_requirements(),
                metadata={"leukops_bundle": asdict(bundle), "run_id": self.run_id},
            )
            mlflow.log_artifacts(str(model_dir), MODEL_ARTIFACT_PATH)
        return f"runs:/{self.run_id}/{MODEL_ARTIFACT_PATH}"


def find_finished_run(settings: Settings, tags: dict[str, str]) -> dict[str, Any] | None:
    """The latest FINISHED training run carrying all ``tags`` (e.g. an Airflow candidate key), summarised
    like ``training_run.train_candidate``'s result; None when there is none."""
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    experiment = mlflow.get_experiment_by_name(settings.mlflow_experiment)
    if experiment is None:
        return None
    conditions = [f"tags.`{key}` = '{value}'" for key, value in tags.items()] + ["attributes.status = 'FINISHED'"]
    runs = mlflow.search_runs(
        [experiment.experiment_id],
        filter_string=" and ".join(conditions),
        order_by=["attributes.start_time DESC"],
        max_results=1,
        output_format="list",
    )
    if not runs:
        return None
    run = runs[0]
    metrics, run_tags = run.data.metrics, run.data.tags
    return {
        "run_id": run.info.run_id,
        "model_uri": f"runs:/{run.info.run_id}/{MODEL_ARTIFACT_PATH}",
        **{k: run_tags[k] for k in ("task", "dataset_version", "backbone", "augment") if k in run_tags},
        "pretrained": run_tags.get("pretrained") == "true",
        "val_f1": metrics.get("val_macro_f1"),
        "test_f1": metrics.get("test_macro_f1"),
        "test_accuracy": metrics.get("test_accuracy"),
    }


# -- other runs -----------------------------------------------------------------------------------


def log_drift_run(
    settings: Settings,
    run_name: str,
    tags: dict[str, str],
    metrics: dict[str, float],
    artifacts: dict[str, bytes],
) -> str:
    """One finished run in the ``<experiment>-drift`` experiment (kept apart from training candidates)."""
    client = mlflow.MlflowClient(settings.mlflow_tracking_uri)
    name = f"{settings.mlflow_experiment}-drift"
    experiment = client.get_experiment_by_name(name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    try:
        for key, value in metrics.items():
            client.log_metric(run.info.run_id, key, float(value))
        with tempfile.TemporaryDirectory() as tmp:
            for artifact_file, data in artifacts.items():
                path = Path(tmp) / artifact_file
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
                parent = str(Path(artifact_file).parent)
                client.log_artifact(run.info.run_id, str(path), None if parent == "." else parent)
    except BaseException:
        client.set_terminated(run.info.run_id, "FAILED")
        raise
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


# -- outputs added to a finished run (explanations) -----------------------------------------------------


def run_tags(settings: Settings, run_id: str) -> dict[str, str]:
    """The tags of an existing run (e.g. ``task``, ``dataset_version``); names the run when it is missing."""
    try:
        return dict(mlflow.MlflowClient(settings.mlflow_tracking_uri).get_run(run_id).data.tags)
    except MlflowException as err:
        raise TrackingError(f"MLflow run {run_id!r} at {settings.mlflow_tracking_uri}: {err}") from err


def log_to_run(settings: Settings, run_id: str, metrics: dict[str, float], artifacts: dict[str, bytes]) -> None:
    """Add metrics and artifacts (path in the run -> bytes) to an existing run, finished or not."""
    client = mlflow.MlflowClient(settings.mlflow_tracking_uri)
    try:
        for key, value in metrics.items():
            client.log_metric(run_id, key, float(value))
        with tempfile.TemporaryDirectory() as tmp:
            for artifact_file, data in artifacts.items():
                path = Path(tmp) / artifact_file
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
                parent = str(Path(artifact_file).parent)
                client.log_artifact(run_id, str(path), None if parent == "." else parent)
    except MlflowException as err:
        raise TrackingError(f"cannot log explanations to MLflow run {run_id!r}: {err}") from err
