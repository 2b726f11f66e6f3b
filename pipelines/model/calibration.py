"""Temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks"), fitted on val logits.

One scalar T > 0 divides the logits before the softmax: it changes confidences, never the predicted class.
T is the minimiser of the validation negative log-likelihood, found by scipy's bounded scalar search over
log T (the NLL is smooth and unimodal in log T). On a validation set the model classifies without one
error the NLL keeps falling as T → 0 (it would claim certainty): there T is set so that the mean top-class
confidence on val equals Laplace's rule-of-succession estimate of the accuracy, (n + 1) / (n + 2) — the
honest claim n correct answers support; a label-smoothed model left at T = 1 would stay underconfident
(≈ 0.93 on every image). For validation sets too small to say anything (`MIN_CALIBRATION_IMAGES`) the
model keeps T = 1. Either way the reason is recorded.

`fit_calibration` is the call training makes after fitting: val logits through the one predict path
(`pipelines.model.predict.loader_logits`, with the TTA the model will be served with) → T → the
`InferenceConfig` saved in the bundle, plus the ECE before/after that training logs.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import brentq, minimize_scalar
from scipy.special import log_softmax
from torch import nn

from pipelines.model.evaluate import expected_calibration_error
from pipelines.model.predict import InferenceConfig, loader_logits, probabilities

TEMPERATURE_BOUNDS = (0.05, 20.0)
MIN_CALIBRATION_IMAGES = 30  # fewer val images cannot pin a temperature down: keep T = 1


@dataclass(frozen=True)
class Calibration:
    """The fitted temperature and what it did on the data it was fitted on."""

    inference: InferenceConfig
    n: int
    ece_before: float
    ece_after: float
    nll_before: float
    nll_after: float
    note: str = ""  # why T stayed 1, when it did

    @property
    def temperature(self) -> float:
        return self.inference.temperature

    def to_metrics(self) -> dict[str, float]:
        """Run metrics: the temperature and the val ECE / NLL before and after scaling."""
        return {
            "calibration_temperature": self.temperature,
            "calibration_n_images": float(self.n),
            "val_ece_uncalibrated": self.ece_before,
            "val_ece": self.ece_after,
            "val_nll_uncalibrated": self.nll_before,
            "val_nll": self.nll_after,
        }


def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean −log p(true class) of softmax(logits / temperature)."""
    log_p = log_softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1)
    return float(-log_p[np.arange(len(labels)), labels].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T in `TEMPERATURE_BOUNDS` minimising the NLL of softmax(logits / T) against ``labels``."""
    labels = np.asarray(labels, dtype=int)
    low, high = np.log(TEMPERATURE_BOUNDS)
    found = minimize_scalar(
        lambda log_t: negative_log_likelihood(logits, labels, float(np.exp(log_t))),
        bounds=(low, high),
        method="bounded",
        options={"xatol": 1e-5},
    )
    return float(np.exp(found.x))


def confidence_matching_temperature(logits: np.ndarray, confidence: float) -> float:
    """The T in `TEMPERATURE_BOUNDS` at which the mean top-class softmax(logits / T) is ``confidence``
    (the mean top confidence falls monotonically as T grows; clipped to the bounds)."""
    low, high = np.log(TEMPERATURE_BOUNDS)

    def excess(log_t: float) -> float:
        return float(probabilities(logits, float(np.exp(log_t))).max(axis=1).mean()) - confidence

    if excess(low) <= 0:
        return TEMPERATURE_BOUNDS[0]
    if excess(high) >= 0:
        return TEMPERATURE_BOUNDS[1]
    return float(np.exp(brentq(excess, low, high, xtol=1e-6)))


def calibrate(logits: np.ndarray, labels: np.ndarray, tta: Sequence[str] = ()) -> Calibration:
    """Fit T on (logits, labels), or keep T = 1 where the data cannot support a fit (see the module doc)."""
    labels = np.asarray(labels, dtype=int)
    note = ""
    if len(labels) < MIN_CALIBRATION_IMAGES:
        note = f"only {len(labels)} val images (< {MIN_CALIBRATION_IMAGES}): temperature kept at 1"
        temperature = 1.0
    elif np.all(np.asarray(logits).argmax(axis=1) == labels):
        temperature = confidence_matching_temperature(logits, (len(labels) + 1) / (len(labels) + 2))
        note = (
            f"no error among {len(labels)} val images (the NLL falls as T -> 0): T set for a mean confidence "
            f"of (n+1)/(n+2) = {(len(labels) + 1) / (len(labels) + 2):.4f}"
        )
    else:
        temperature = fit_temperature(logits, labels)
        if not TEMPERATURE_BOUNDS[0] * 1.01 < temperature < TEMPERATURE_BOUNDS[1] * 0.99:
            note = f"temperature {temperature:.3g} at the bound {TEMPERATURE_BOUNDS}: val logits carry little signal"
    return Calibration(
        inference=InferenceConfig(temperature=temperature, tta=tuple(tta)),
        n=len(labels),
        ece_before=expected_calibration_error(labels, probabilities(logits)),
        ece_after=expected_calibration_error(labels, probabilities(logits, temperature)),
        nll_before=negative_log_likelihood(logits, labels),
        nll_after=negative_log_likelihood(logits, labels, temperature),
        note=note,
    )


def fit_calibration(
    module: nn.Module, val_loader: Iterable, device: torch.device, tta: Sequence[str] = ()
) -> Calibration:
    """Calibrate a trained module on its validation loader, through the same forward pass as inference."""
    labels, logits = loader_logits(module, val_loader, device, tta)
    return calibrate(logits, labels, tta)
