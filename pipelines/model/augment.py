"""The paper's augmentations, built from timm's implementations and configured once.

`build_augmentation(name, num_classes, image_size)` returns an `Augmentation`:
- `pil_transform`: per-image PIL → PIL callable (RandAugment, AugMix; the stain jitter
  `pipelines.model.stain.HedJitter` first when ``stain="hed"``) for `preprocess.build_transform`, or None;
- `batch_mixer`: `(images, labels) -> (images, soft_targets)` on a batch (Mixup, CutMix), or None; its
  soft targets already carry the label smoothing, so the training loss (`train.default_criterion`) adds
  none on top of them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from timm.data import Mixup
from timm.data.auto_augment import augment_and_mix_transform, rand_augment_transform
from timm.data.constants import IMAGENET_DEFAULT_MEAN
from timm.data.mixup import mixup_target
from timm.data.transforms import str_to_pil_interp

from pipelines.core.errors import LeukopsError
from pipelines.model.stain import DEFAULT_STAIN_STRENGTH, StainError, stain_augmentation

AUGMENTATIONS = ("none", "mixup", "cutmix", "augmix", "randaug")
LABEL_SMOOTHING = 0.1
# timm's ImageNet recipe (magnitude 9 ± 0.5, increasing severity), clipped at 9: at magnitude 10 timm's
# increasing posterize keeps 0 bits, which Pillow >= 10 refuses (a random crash of the loader worker).
RANDAUG_CONFIG = "rand-m9-mstd0.5-mmax9-inc1"
AUGMIX_CONFIG = "augmix-m3-w3"  # magnitude 3, width 3 (the AugMix paper's defaults)


class AugmentationError(LeukopsError, ValueError):
    pass


class EvenBatchMixer:
    """timm `Mixup` for any batch size: it pairs images by flipping the batch, so it needs an even count;
    the odd one left at the end of a batch keeps its image and gets a smoothed one-hot target."""

    def __init__(self, mixup: Mixup) -> None:
        self.mixup = mixup

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        even = len(images) - len(images) % 2
        if even == len(images):
            return self.mixup(images, labels)
        rest = mixup_target(labels[even:], self.mixup.num_classes, 1.0, self.mixup.label_smoothing)
        if even == 0:
            return images, rest
        mixed, targets = self.mixup(images[:even].clone(), labels[:even])
        return torch.cat([mixed, images[even:]]), torch.cat([targets, rest])

    def __repr__(self) -> str:
        return (
            f"EvenBatchMixer(mixup_alpha={self.mixup.mixup_alpha}, cutmix_alpha={self.mixup.cutmix_alpha}, "
            f"label_smoothing={self.mixup.label_smoothing})"
        )


BatchMixer = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Chain:
    """Two PIL transforms one after the other (picklable, for DataLoader workers)."""

    first: Callable[[Image.Image], Image.Image]
    then: Callable[[Image.Image], Image.Image]

    def __call__(self, image: Image.Image) -> Image.Image:
        return self.then(self.first(image))


@dataclass(frozen=True)
class Augmentation:
    name: str
    pil_transform: Callable[[Image.Image], Image.Image] | None
    batch_mixer: BatchMixer | None
    stain: str = "none"  # the stain jitter inside pil_transform (pipelines.model.stain.STAIN_AUGMENTATIONS)

    @property
    def soft_targets(self) -> bool:
        """True when the batch mixer turns integer labels into N×C soft targets."""
        return self.batch_mixer is not None


def build_augmentation(
    name: str,
    num_classes: int,
    image_size: int,
    *,
    stain: str = "none",
    stain_strength: float = DEFAULT_STAIN_STRENGTH,
    **options: Any,
) -> Augmentation:
    """The augmentation `name` (one of AUGMENTATIONS) for `num_classes` classes at `image_size` px, after
    the stain jitter `stain` of strength `stain_strength` (`pipelines.model.stain`); `options` are
    `_named_augmentation`'s."""
    try:
        jitter = stain_augmentation(stain, stain_strength)
    except StainError as error:
        raise AugmentationError(str(error)) from None
    augmentation = _named_augmentation(name, num_classes, image_size, **options)
    if jitter is None:
        return augmentation
    pil = jitter if augmentation.pil_transform is None else Chain(jitter, augmentation.pil_transform)
    return Augmentation(augmentation.name, pil, augmentation.batch_mixer, stain)


def _named_augmentation(
    name: str,
    num_classes: int,
    image_size: int,
    *,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    interpolation: str = "bilinear",
    label_smoothing: float = LABEL_SMOOTHING,
    mixup_alpha: float = 0.2,
    cutmix_alpha: float = 1.0,
    randaug_config: str = RANDAUG_CONFIG,
    augmix_config: str = AUGMIX_CONFIG,
) -> Augmentation:
    """`mean` (the model's normalisation mean) is the fill colour of geometric ops; `interpolation` theirs."""
    if name not in AUGMENTATIONS:
        raise AugmentationError(f"unknown augmentation {name!r}; choose one of {', '.join(AUGMENTATIONS)}")
    if num_classes < 2:
        raise AugmentationError(f"augmentation {name}: num_classes must be >= 2, got {num_classes}")
    if name in ("mixup", "cutmix"):
        mixup = Mixup(
            mixup_alpha=mixup_alpha if name == "mixup" else 0.0,
            cutmix_alpha=cutmix_alpha if name == "cutmix" else 0.0,
            label_smoothing=label_smoothing,
            num_classes=num_classes,
        )
        return Augmentation(name, None, EvenBatchMixer(mixup))
    if name == "none":
        return Augmentation(name, None, None)
    hparams = {
        "translate_const": int(image_size * 0.45),
        "img_mean": tuple(min(255, round(255 * m)) for m in mean),
        "interpolation": str_to_pil_interp(interpolation),
    }
    if name == "randaug":
        return Augmentation(name, rand_augment_transform(randaug_config, hparams), None)
    augmix = augment_and_mix_transform(augmix_config, {**hparams, "translate_pct": 0.3})
    return Augmentation(name, augmix, None)
