"""How a training run validates each epoch, and which epoch's weights it keeps.

The score is macro-F1 averaged over the validation split's sites (one site: plain macro-F1), because the
gate judges every site on its own: pooled, a new lab's 10 validation images beside the home lab's 180
would barely move it. Its standard error comes from a bootstrap within each site.

The rule is the one-standard-error rule (Hastie, Tibshirani & Friedman, ESL §7.10): keep the latest epoch
whose score lies within one standard error of the best so far. Validation splits are small, so an early
peak is mostly noise, while the later epochs are the ones the cosine schedule and the weight EMA were
planned to end on. Measured in the new-lab loop (PBC + CellaVision, 9 epochs), when the plain best was
kept: one run kept epoch 3 of 9 (CellaVision test macro-F1 0.816), another epoch 8 (0.867), though
epoch 3's pooled validation score beat the last epoch's by only 0.014.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from pipelines.model.devices import autocast, to_device
from pipelines.model.evaluate import macro_f1, resampled_macro_f1

RESAMPLES = 200  # for the standard error only: about 0.05 relative precision, a few ms per epoch


def site_mean_macro_f1(
    truth: np.ndarray, predicted: np.ndarray, num_classes: int, sites: Sequence[str] | None = None, seed: int = 0
) -> tuple[float, float]:
    """(macro-F1 averaged over ``sites``, its bootstrap standard error); one site when ``sites`` is None.

    Each site's images are resampled on their own, so every resample keeps the split's site sizes."""
    sites_array = np.zeros(len(truth)) if sites is None else np.asarray(sites)
    rng = np.random.default_rng(seed)
    scores, resampled = [], []
    for site in np.unique(sites_array):
        rows = np.flatnonzero(sites_array == site)
        site_truth, site_predicted = truth[rows], predicted[rows]
        scores.append(macro_f1(site_truth, site_predicted))
        draws = rng.integers(0, len(rows), size=(RESAMPLES, len(rows)))
        resampled.append(resampled_macro_f1(site_truth, site_predicted, num_classes, draws))
    return float(np.mean(scores)), float(np.std(np.mean(resampled, axis=0), ddof=1))


def keeps(score: float, best_score: float, best_standard_error: float) -> bool:
    """Whether an epoch scoring ``score`` replaces the kept weights: it is within one standard error of
    the best score so far (a new best always is). Called in epoch order, so the latest such epoch wins."""
    return score >= best_score - best_standard_error


@torch.no_grad()
def predict_proba(model: nn.Module, loader: DataLoader, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """(integer labels, class probabilities) over a whole loader, in loader order."""
    model.eval()
    labels, probs = [], []
    for images, targets in loader:
        with autocast(device):
            logits = model(to_device(images, device))
        probs.append(torch.softmax(logits.float(), dim=-1).cpu().numpy())
        labels.append(targets.numpy())
    return np.concatenate(labels), np.concatenate(probs)


def validate(
    model: nn.Module, loader: DataLoader, device: torch.device, sites: Sequence[str] | None = None
) -> tuple[float, float, float, float]:
    """(loss, site-mean macro-F1, its standard error, accuracy) of ``model`` on the validation loader."""
    labels, probs = predict_proba(model, loader, device)
    loss = float(-np.mean(np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None))))
    predicted = probs.argmax(axis=1)
    f1, standard_error = site_mean_macro_f1(labels, predicted, probs.shape[1], sites)
    return loss, f1, standard_error, float(np.mean(predicted == labels))
