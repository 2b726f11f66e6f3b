"""The ONE forward pass of leukops: flip-averaged logits, divided by the bundle's temperature, softmaxed.

Every consumer of class probabilities calls `predict` (directly or through
`pipelines.model.bundle.LoadedModel`): test and holdout evaluation, serving (`serving.model.forward`), the
drift confidences (`pipelines.monitor.features` via ``LoadedModel.predict_proba``), the shortcut test and
the pyfunc flavour. Training's temperature fit (`pipelines.model.calibration`) sees the same logits through
`loader_logits`, so the temperature it fits is the one these probabilities are scaled by.

Test-time augmentation averages the *logits* of the identity view and the flipped views (not their
probabilities): temperature scaling is a scale of the logits, so one softmax of the averaged logits keeps
the fitted temperature meaningful. Embeddings always come from the identity view, so they stay comparable
with embeddings taken without TTA (the drift reference).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.special import softmax
from torch import nn

from pipelines.core.errors import LeukopsError

# the views TTA may add beside the identity; flips only: a blood-smear cell has no up, down, left or right
TTA_VIEWS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "hflip": lambda x: x.flip(-1),
    "vflip": lambda x: x.flip(-2),
}


class InferenceError(LeukopsError, ValueError):
    """An inference setting that cannot be applied (the message names the value)."""


@dataclass(frozen=True)
class InferenceConfig:
    """How a model turns logits into probabilities; saved in its bundle (old bundles: T = 1, no TTA)."""

    temperature: float = 1.0
    tta: tuple[str, ...] = ()  # extra views averaged with the identity, names from TTA_VIEWS

    def __post_init__(self) -> None:
        if not np.isfinite(self.temperature) or self.temperature <= 0:
            raise InferenceError(f"temperature must be a positive number, got {self.temperature!r}")
        unknown = [name for name in self.tta if name not in TTA_VIEWS]
        if unknown or len(set(self.tta)) != len(self.tta):
            raise InferenceError(f"tta {list(self.tta)} must be distinct names from {sorted(TTA_VIEWS)}")


@dataclass(frozen=True)
class Outputs:
    """One batch's results: probabilities (calibrated), the logits they came from, optional embeddings."""

    proba: np.ndarray  # N×C, softmax(logits / temperature)
    logits: np.ndarray  # N×C, TTA-averaged, before the temperature
    embedding: np.ndarray | None = None  # N×D pooled features of the identity view


def probabilities(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """softmax(logits / temperature) row by row, in float64."""
    return softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1)


def view_logits(
    module: nn.Module, batch: torch.Tensor, tta: Iterable[str] = (), with_embeddings: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(mean logits over the identity and ``tta`` views, identity-view embeddings or None).

    ``module`` is a `pipelines.model.backbones.BackboneClassifier` (encoder + head with a pooling stage).
    """
    features = module.encoder.forward_features(batch)
    logits = [module.head(features).float()]
    embedding = module.head.pool(features).float() if with_embeddings else None
    for name in tta:
        logits.append(module(TTA_VIEWS[name](batch)).float())
    return torch.stack(logits).mean(dim=0), embedding


@torch.inference_mode()
def predict(
    module: nn.Module, batch: torch.Tensor, inference: InferenceConfig, *, with_embeddings: bool = False
) -> Outputs:
    """Probabilities of one preprocessed batch (N×3×H×W, already on the module's device)."""
    logits, embedding = view_logits(module, batch, inference.tta, with_embeddings)
    raw = logits.cpu().numpy()
    return Outputs(
        probabilities(raw, inference.temperature),
        raw,
        embedding.cpu().numpy() if embedding is not None else None,
    )


@torch.inference_mode()
def loader_logits(
    module: nn.Module, loader: Iterable, device: torch.device, tta: Sequence[str] = ()
) -> tuple[np.ndarray, np.ndarray]:
    """(integer labels, TTA-averaged logits) over a loader of (images, labels), in loader order."""
    module.eval()
    labels, logits = [], []
    for images, targets in loader:
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=device.type == "cuda"):
            batch_logits, _ = view_logits(module, images.to(device), tta)
        logits.append(batch_logits.float().cpu().numpy())
        labels.append(np.asarray(targets))
    return np.concatenate(labels), np.concatenate(logits)
