"""The model bundle: the trained weights plus ONE metadata contract, and the classifier rebuilt from them.

A bundle is a folder of two files, like a MONAI bundle's ``metadata.json`` next to its weights:
``bundle.json`` (a serialised `ModelBundle`: task, classes, the backbone's architecture facts, the full
preprocessing dict (with the fitted stain normaliser, `pipelines.model.stain`, when the model was trained
with one: `prepare_image` applies it, so every consumer of `LoadedModel.batch` does) and the inference
settings: calibration temperature and test-time augmentation) and ``weights.pt`` (the state dict). Every
forward pass of a loaded model goes through `pipelines.model.predict.predict` with the bundle's
`InferenceConfig`; bundles written before format 3 have no inference settings and load with T = 1 and no
TTA; before format 4, no stain normaliser. `read_bundle` rebuilds the real timm module
through `pipelines.model.backbones.create_backbone` (named layers intact for Grad-CAM), unlike MLflow 3's
default pytorch ``pt2`` export, which loads back as a layer-less GraphModule.

In MLflow the bundle travels inside a pyfunc model (`pipelines.model.pyfunc`) at the run's artifact path
``layout.MODEL_ARTIFACT_PATH``; `load_model` fetches that through `pipelines.io.tracking` and reads it here.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from torch import nn

from pipelines.core.errors import LeukopsError
from pipelines.core.settings import Settings, get_settings
from pipelines.io import tracking
from pipelines.model.backbones import DEFAULT_DROP_RATE, DEFAULT_HEAD_HIDDEN, Backbone, create_backbone
from pipelines.model.predict import InferenceConfig, Outputs, predict
from pipelines.model.preprocess import stain_normalizer_of, to_tensor_batch
from pipelines.model.stain import StainError, StainNormalizer

# 4: the preprocessing may carry a stain normaliser (a format-3 reader would silently skip it, so it refuses)
BUNDLE_FORMAT = 4
READABLE_FORMATS = (1, 2, 3, 4)  # 1: nested backbone config; 2: flat, no inference settings (T = 1, no TTA)
BUNDLE_FILE = "bundle.json"
WEIGHTS_FILE = "weights.pt"
# mlflow.pyfunc.save_model copies the artifacts it is given (our two files) into this folder of the model
BUNDLE_DIR_IN_MODEL = "artifacts"


class BundleError(LeukopsError):
    """A folder that is not a readable leukops bundle; the message names the file."""


@dataclass(frozen=True)
class ModelBundle:
    """What travels with the weights: enough to rebuild the module and preprocess exactly as in training."""

    task: str
    classes: list[str]
    backbone: str
    image_size: int
    pretrained: bool  # how the trained weights started (ImageNet or random init), not the rebuilt init
    preprocessing: dict[str, Any]  # pipelines.model.preprocess: ROI crop, corner mask, size, mean/std
    gradcam_layer_name: str
    head_hidden: int = DEFAULT_HEAD_HIDDEN
    drop_rate: float = DEFAULT_DROP_RATE
    weights_source: str = "random-init"  # where the initial weights came from (a file, a package, a cache)
    timm_version: str = field(default_factory=lambda: timm.__version__)
    temperature: float = 1.0  # calibration: logits are divided by it (pipelines.model.calibration)
    tta: tuple[str, ...] = ()  # test-time views averaged with the identity (pipelines.model.predict)
    format: int = BUNDLE_FORMAT

    @classmethod
    def for_backbone(
        cls,
        task: str,
        classes: Sequence[str],
        backbone: Backbone,
        preprocessing: dict,
        inference: InferenceConfig | None = None,
    ) -> ModelBundle:
        inference = inference or InferenceConfig()
        return cls(
            task=task,
            classes=list(classes),
            backbone=backbone.name,
            image_size=backbone.image_size,
            pretrained=backbone.pretrained,
            preprocessing=preprocessing,
            gradcam_layer_name=backbone.gradcam_layer_name,
            head_hidden=backbone.head_hidden,
            drop_rate=backbone.drop_rate,
            weights_source=backbone.weights_source,
            temperature=inference.temperature,
            tta=inference.tta,
        )

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> ModelBundle:
        if raw.get("format") not in READABLE_FORMATS:
            readable = ", ".join(map(str, READABLE_FORMATS))
            raise BundleError(f"unsupported bundle format {raw.get('format')!r} (this leukops reads {readable})")
        if raw["format"] == 1:  # models logged before the contract was flattened: same facts, nested
            raw = _upgrade_format_1(raw)
        return cls(**raw | {"tta": tuple(raw.get("tta", ())), "format": BUNDLE_FORMAT})

    def __post_init__(self) -> None:
        InferenceConfig(self.temperature, self.tta)  # refuses a bad temperature or TTA name (InferenceError)
        try:  # a malformed saved normaliser is refused when the bundle is read, not on every image
            stain_normalizer_of(self.preprocessing)
        except StainError as error:
            raise BundleError(f"bundle preprocessing: {error}") from None

    @property
    def stain_normalizer(self) -> StainNormalizer | None:
        """The fitted stain normaliser the preprocessing applies, or None."""
        return stain_normalizer_of(self.preprocessing)

    @property
    def inference(self) -> InferenceConfig:
        return InferenceConfig(temperature=self.temperature, tta=self.tta)

    def build(self) -> Backbone:
        """The architecture, randomly initialised, through the one factory (the caller loads the weights)."""
        backbone = create_backbone(
            self.backbone,
            len(self.classes),
            pretrained=False,
            image_size=self.image_size,
            drop_rate=self.drop_rate,
            head_hidden=self.head_hidden,
        )
        backbone.pretrained = self.pretrained
        backbone.weights_source = self.weights_source
        backbone.gradcam_layer_name = self.gradcam_layer_name
        return backbone


def _upgrade_format_1(raw: dict[str, Any]) -> dict[str, Any]:
    config = raw.get("backbone_config") or {}
    keep = ("head_hidden", "drop_rate", "weights_source", "timm_version")
    flat = {k: v for k, v in raw.items() if k != "backbone_config"}
    return flat | {k: config[k] for k in keep if k in config}


@dataclass
class LoadedModel:
    """A trained classifier rebuilt from its bundle: the real timm module, in eval mode."""

    backbone: Backbone
    bundle: ModelBundle
    run_id: str | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def module(self) -> nn.Module:
        return self.backbone.model

    @property
    def task(self) -> str:
        return self.bundle.task

    @property
    def classes(self) -> list[str]:
        return self.bundle.classes

    @property
    def preprocessing(self) -> dict[str, Any]:
        return self.bundle.preprocessing

    @property
    def gradcam_layer(self) -> nn.Module:
        return self.backbone.gradcam_layer

    @property
    def inference(self) -> InferenceConfig:
        return self.bundle.inference

    def batch(self, rgb_list: Sequence[np.ndarray]) -> torch.Tensor:
        """The preprocessed input tensor (N×3×H×W) for these RGB uint8 images."""
        return to_tensor_batch(list(rgb_list), self.preprocessing).to(self.device)

    def outputs(self, rgb_list: Sequence[np.ndarray], batch_size: int = 64) -> Outputs:
        """Calibrated probabilities and the logits behind them (the one predict function, in batches)."""
        if len(rgb_list) == 0:
            empty = np.zeros((0, len(self.classes)))
            return Outputs(empty, empty)
        chunks = [
            predict(self.module, self.batch(rgb_list[i : i + batch_size]), self.inference)
            for i in range(0, len(rgb_list), batch_size)
        ]
        return Outputs(np.concatenate([c.proba for c in chunks]), np.concatenate([c.logits for c in chunks]))

    def predict_proba(self, rgb_list: Sequence[np.ndarray], batch_size: int = 64) -> np.ndarray:
        """Class probabilities (N×C) with the bundle's temperature and TTA."""
        return self.outputs(rgb_list, batch_size).proba

    @torch.no_grad()
    def embed(self, rgb_list: Sequence[np.ndarray], batch_size: int = 64) -> np.ndarray:
        chunks = [
            self.backbone.embed(self.batch(rgb_list[i : i + batch_size])).float().cpu().numpy()
            for i in range(0, len(rgb_list), batch_size)
        ]
        return np.concatenate(chunks)


def save_bundle(bundle: ModelBundle, state_dict: dict[str, torch.Tensor], directory: Path) -> tuple[Path, Path]:
    """Write the bundle's two files into ``directory`` (created); returns (metadata, weights) paths."""
    directory.mkdir(parents=True, exist_ok=True)
    metadata, weights = directory / BUNDLE_FILE, directory / WEIGHTS_FILE
    metadata.write_text(json.dumps(asdict(bundle), indent=2, sort_keys=True))
    torch.save(state_dict, weights)
    return metadata, weights


def read_bundle(directory: Path, run_id: str | None = None, device: str | torch.device | None = None) -> LoadedModel:
    """The classifier saved in ``directory`` by `save_bundle`, on ``device`` (CPU by default), in eval mode."""
    metadata = directory / BUNDLE_FILE
    try:
        bundle = ModelBundle.from_json(json.loads(metadata.read_text()))
        state = torch.load(directory / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    except (OSError, ValueError, TypeError, BundleError) as err:
        raise BundleError(f"{metadata}: not a readable leukops bundle ({err})") from err
    backbone = bundle.build()
    backbone.model.load_state_dict(state)
    target = torch.device(device) if device else torch.device("cpu")
    backbone.model.to(target).eval()
    return LoadedModel(backbone, bundle, run_id, target)


def load_model(
    model_uri: str, device: str | torch.device | None = None, settings: Settings | None = None
) -> LoadedModel:
    """Load a canonical model by URI: a run's (``layout.run_model_uri``), a registered version or alias
    (``layout.registered_version_uri``, ``layout.alias_uri``), or a local path.

    The files are fetched from the MLflow server of ``settings`` into a temporary folder, read, and removed.
    """
    with tempfile.TemporaryDirectory(prefix="leukops-model-") as tmp:
        local, run_id = tracking.download_model(settings or get_settings(), model_uri, Path(tmp))
        if not (local / BUNDLE_DIR_IN_MODEL / BUNDLE_FILE).exists():
            raise BundleError(f"{model_uri!r} is not a leukops model (no {BUNDLE_DIR_IN_MODEL}/{BUNDLE_FILE})")
        return read_bundle(local / BUNDLE_DIR_IN_MODEL, run_id, device)
