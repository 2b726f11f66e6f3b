"""Stain robustness: HED-space jitter for training and a stain normaliser fitted on a reference.

Library: **torchstain** (1.4.1) for the normalisers. It has Macenko and Reinhard with the same
``fit(reference)`` / ``normalize(image)`` interface, a numpy backend (no TensorFlow, no extra torch code in
the loader workers) and numpy as its only dependency; its fitted targets are a few numbers (Macenko: the
3×2 stain matrix and the two 99th-percentile concentrations; Reinhard: the LAB means and standard
deviations), so they are saved as JSON in the model bundle's preprocessing dict and rebuilt exactly.
albumentations 2.x (``HEStain``) has jitter but no reference-fitted normaliser and brings albucore and its
SIMD deps; kornia has neither.

Augmentation (``hed``) is the HED jitter of Tellez et al. (2018): per image, each stain channel of the
Ruifrok–Johnston colour deconvolution is scaled by U(1−σ, 1+σ) and shifted by U(−σ, σ). The stain matrices
are scikit-image's (``hed_from_rgb``, ``rgb_from_hed``; already a dependency). torchstain's own augmentor was
not used: it re-estimates a Macenko matrix on every image (two eigen-decompositions, and it fails on a
blank image) and draws from numpy's global RNG, which DataLoader workers do not seed. skimage's ``rgb2hed``
was not used either: it clamps negative stain values, which on PBC smears changes pixels by 8 grey levels
on average (up to 100) even with no jitter; the linear projection here round-trips exactly. σ is in optical
density (natural log) units: 0.1 spans about the tint range between labs seen by eye, 0.2 is strong.
Draws come from torch's RNG, like the flips, so the loader's per-worker seeding makes them reproducible.

Normalisation is applied by ``pipelines.model.preprocess.prepare_image`` (after the resize), so training,
evaluation, serving, pyfunc, explanations and the drift embeddings all see the same transform. On MGG
smears Macenko's two-stain (H&E) model does not fit: normalising a PBC reference with itself moves its LAB
statistics by ~27 units (the background tint is lost), a HED-shifted copy ends further from the normalised
reference than it started (20 vs 7.6 units), and the LAB distance of 100 CellaVision images to the PBC median
rises from 26 to 111. Reinhard is nearly the identity on the reference (~0.4 grey levels) and brings
CellaVision to 3.4 units (PBC itself 13 → 2.9). Both are offered; the transfer benchmark decides.
A normalisation that fails on an image (a blank image: Macenko's eigen-decomposition has no stained pixel,
Reinhard divides by a zero spread) returns the image unnormalised and logs a note; it never raises.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipelines.core.errors import LeukopsError

log = logging.getLogger(__name__)

STAIN_AUGMENTATIONS = ("none", "hed")
STAIN_NORMALIZERS = ("none", "macenko", "reinhard")
DEFAULT_STAIN_STRENGTH = 0.1  # σ in optical-density units (module docstring)
MACENKO_TARGETS = {"stain_matrix": (3, 2), "max_concentrations": (2,)}  # torchstain's HERef, maxCRef
REINHARD_TARGETS = {"lab_means": (3,), "lab_stds": (3,)}  # torchstain's target_means, target_stds
TARGET_SHAPES = {"macenko": MACENKO_TARGETS, "reinhard": REINHARD_TARGETS}
MIN_OD = 1.0 / 255.0  # the darkest transmittance a uint8 pixel can carry (avoids log(0))


class StainError(LeukopsError, ValueError):
    """A stain option or a saved normaliser that cannot be used; the message names the value."""


def _stain_matrices() -> tuple[np.ndarray, np.ndarray]:
    # imported here: only training (the jitter) needs scikit-image, serving needs only torchstain
    from skimage.color import hed_from_rgb, rgb_from_hed

    return hed_from_rgb, rgb_from_hed


def hed_jitter(rgb: np.ndarray, scale: Sequence[float], shift: Sequence[float]) -> np.ndarray:
    """``rgb`` (H×W×3 uint8) with its H, E, D stain densities scaled by ``scale`` and shifted by ``shift``."""
    hed_from_rgb, rgb_from_hed = _stain_matrices()
    density = -np.log(np.maximum(rgb.astype(np.float64) / 255.0, MIN_OD))
    stains = (density @ hed_from_rgb) * np.asarray(scale) + np.asarray(shift)
    jittered = np.exp(-(stains @ rgb_from_hed))
    return np.clip(np.round(jittered * 255.0), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class HedJitter:
    """PIL → PIL training augmentation: a random HED jitter of strength σ per image (picklable)."""

    strength: float = DEFAULT_STAIN_STRENGTH

    def __post_init__(self) -> None:
        if not 0 < self.strength <= 1:
            raise StainError(f"stain augmentation strength must be in (0, 1], got {self.strength!r}")

    def __call__(self, image: Image.Image) -> Image.Image:
        draws = (torch.rand(2, 3, dtype=torch.float64) * 2 - 1).numpy()
        scale, shift = 1 + self.strength * draws[0], self.strength * draws[1]
        return Image.fromarray(hed_jitter(np.asarray(image.convert("RGB")), scale, shift))


def stain_augmentation(name: str, strength: float = DEFAULT_STAIN_STRENGTH) -> HedJitter | None:
    """The training jitter ``name`` (one of STAIN_AUGMENTATIONS), or None for ``none``."""
    if name not in STAIN_AUGMENTATIONS:
        raise StainError(f"unknown stain augmentation {name!r}; choose one of {', '.join(STAIN_AUGMENTATIONS)}")
    return HedJitter(strength) if name == "hed" else None


def check_stain_options(augment: str, strength: float, normalize: str, reference_images: int) -> None:
    """Refuse a stain option before any image is read (StainError naming the option)."""
    stain_augmentation(augment, strength)
    if normalize not in STAIN_NORMALIZERS:
        raise StainError(f"unknown stain normaliser {normalize!r}; choose one of {', '.join(STAIN_NORMALIZERS)}")
    if reference_images < 1:
        raise StainError(f"stain_reference_images must be >= 1, got {reference_images}")


@contextmanager
def _numeric_failures_raise() -> Iterator[None]:
    """NaN/inf arithmetic and numpy's empty-slice warnings raise, so a failed fit is seen, not saved."""
    with warnings.catch_warnings(), np.errstate(divide="raise", invalid="raise", over="raise"):
        warnings.simplefilter("error", RuntimeWarning)
        yield


NORMALISATION_FAILURES = (FloatingPointError, RuntimeWarning, np.linalg.LinAlgError, ValueError, IndexError)


def _torchstain(method: str):
    from torchstain.numpy.normalizers import NumpyMacenkoNormalizer, NumpyReinhardNormalizer

    return NumpyMacenkoNormalizer() if method == "macenko" else NumpyReinhardNormalizer()


def _targets_of(method: str, fitted) -> dict[str, np.ndarray]:
    if method == "macenko":
        return {"stain_matrix": fitted.HERef, "max_concentrations": fitted.maxCRef}
    return {"lab_means": fitted.target_means, "lab_stds": fitted.target_stds}


@dataclass(frozen=True)
class StainResult:
    rgb: np.ndarray
    note: str | None = None  # why the image was left unnormalised, None when it was normalised


@dataclass(frozen=True)
class StainNormalizer:
    """A fitted normaliser: method and its target numbers; JSON in the bundle's preprocessing dict."""

    method: str
    targets: dict[str, list] = field(hash=False)
    reference_images: int = 0  # how many reference images the targets are the median of

    def __post_init__(self) -> None:
        if self.method not in TARGET_SHAPES:
            raise StainError(f"stain normaliser method {self.method!r} is not one of {sorted(TARGET_SHAPES)}")
        for name, shape in TARGET_SHAPES[self.method].items():
            value = np.asarray(self.targets.get(name, []), dtype=np.float64)
            if value.shape != shape or not np.isfinite(value).all():
                raise StainError(f"stain normaliser {self.method}: {name} must be finite of shape {shape}")

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "targets": self.targets, "reference_images": self.reference_images}

    @classmethod
    def from_dict(cls, raw: Any) -> StainNormalizer:
        if not isinstance(raw, dict) or not {"method", "targets"} <= set(raw):
            raise StainError(f"stain_normalizer must be a dict with method and targets, got {raw!r}")
        return cls(str(raw["method"]), dict(raw["targets"]), int(raw.get("reference_images", 0)))

    def _fitted(self):
        normalizer, targets = _torchstain(self.method), self.targets
        if self.method == "macenko":
            normalizer.HERef = np.asarray(targets["stain_matrix"], np.float64)
            normalizer.maxCRef = np.asarray(targets["max_concentrations"], np.float64)
        else:
            normalizer.target_means = np.asarray(targets["lab_means"], np.float64)
            normalizer.target_stds = np.asarray(targets["lab_stds"], np.float64)
        return normalizer

    def apply(self, rgb: np.ndarray) -> StainResult:
        """``rgb`` normalised to the targets; on failure ``rgb`` itself with the reason in ``note``."""
        try:
            with _numeric_failures_raise():
                normalizer = self._fitted()
                if self.method == "macenko":
                    out = normalizer.normalize(rgb, stains=False)[0]
                else:
                    out = normalizer.normalize(rgb)
        except NORMALISATION_FAILURES as error:
            note = f"{self.method} stain normalisation failed on a {rgb.shape} image ({error}); kept unnormalised"
            return StainResult(rgb, note)
        return StainResult(np.ascontiguousarray(out, dtype=np.uint8))


def normalize_stain(rgb: np.ndarray, normalizer: StainNormalizer) -> np.ndarray:
    """The normalised image, or ``rgb`` unchanged with a logged note when normalisation fails."""
    result = normalizer.apply(rgb)
    if result.note:
        log.warning(result.note)
    return result.rgb


def fit_one(method: str, rgb: np.ndarray) -> dict[str, np.ndarray]:
    """torchstain's fitted targets for one reference image; raises the numeric failure (StainError)."""
    try:
        with _numeric_failures_raise():
            fitted = _torchstain(method)
            fitted.fit(rgb)
            targets = _targets_of(method, fitted)
            if not all(np.isfinite(v).all() for v in targets.values()):
                raise ValueError("non-finite targets")
            return targets
    except NORMALISATION_FAILURES as error:
        raise StainError(f"{method} fit failed on a {rgb.shape} image ({error})") from None


def _median_targets(method: str, fits: list[dict[str, np.ndarray]]) -> dict[str, list]:
    median = {name: np.median(np.stack([f[name] for f in fits]), axis=0) for name in fits[0]}
    if method == "macenko":  # the median of unit stain vectors, made unit again
        median["stain_matrix"] = median["stain_matrix"] / np.linalg.norm(median["stain_matrix"], axis=0)
    return {name: value.tolist() for name, value in median.items()}


def fit_normalizer(method: str, references: Sequence[np.ndarray]) -> StainNormalizer:
    """The normaliser ``method`` fitted on each reference image, its targets the median over them (a
    blank or unstained reference is skipped with a note; none fitted → StainError naming the reasons)."""
    if method not in TARGET_SHAPES:
        raise StainError(f"unknown stain normaliser {method!r}; choose one of {', '.join(STAIN_NORMALIZERS)}")
    fits, failures = [], []
    for rgb in references:
        try:
            fits.append(fit_one(method, rgb))
        except StainError as error:
            failures.append(str(error))
    if failures:
        log.warning("stain reference: %d of %d images skipped: %s", len(failures), len(references), failures[:3])
    if not fits:
        raise StainError(f"no reference image could fit the {method} normaliser: {failures[:3] or 'no images'}")
    return StainNormalizer(method, _median_targets(method, fits), len(fits))


def reference_sample(paths: Sequence[Any], n: int, seed: int) -> list[Any]:
    """A fixed sample of ``n`` of ``paths`` (all when fewer): sorted, then drawn with ``seed``."""
    ordered = sorted(paths, key=str)
    if len(ordered) <= n:
        return ordered
    picked = np.random.default_rng(seed).choice(len(ordered), size=n, replace=False)
    return [ordered[i] for i in sorted(picked)]
