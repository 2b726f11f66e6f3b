"""Is a training request runnable? Checked before any data is read, so a bad number fails in a second,
naming the value, not after a snapshot download."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from pipelines.core.errors import LeukopsError
from pipelines.core.taxonomy import get_task

if TYPE_CHECKING:
    from pipelines.model.candidate import CandidateSpec
    from pipelines.model.train import TrainConfig


class TrainingInputError(LeukopsError):
    """A training request that cannot run (bad numbers, unknown names); the message says which value."""


def check_request(spec: CandidateSpec, config: TrainConfig) -> None:
    from pipelines.model.backbones import BACKBONES
    from pipelines.model.stain import check_stain_options

    get_task(spec.task)
    check_stain_options(spec.stain_augment, spec.stain_strength, spec.stain_normalize, spec.stain_reference_images)
    if spec.backbone not in BACKBONES:
        raise TrainingInputError(f"unknown backbone {spec.backbone!r}; allowed: {', '.join(BACKBONES)}")
    if not 0 <= spec.site_balance <= 1:
        raise TrainingInputError(
            f"site_balance must be within [0, 1] (0 = off, 1 = sites equal), got {spec.site_balance}"
        )
    if spec.cell_crop and not 1 <= spec.cell_crop <= 10:
        raise TrainingInputError(
            f"cell_crop must be 0 (the whole image) or a scale from 1 to 10 (x the nucleus), got {spec.cell_crop}"
        )
    for name, value in (("epochs", config.epochs), ("batch_size", spec.batch_size)):
        if value < 1:
            raise TrainingInputError(f"{name} must be >= 1, got {value}")
    cells = 3 * len(get_task(spec.task).classes)
    if spec.max_images is not None and spec.max_images < cells:
        raise TrainingInputError(
            f"--max-images must be >= {cells} (one image per split and class of {spec.task}), got {spec.max_images}"
        )
    if config.time_budget_min is not None and config.time_budget_min <= 0:
        raise TrainingInputError(f"--time-budget-min must be > 0, got {config.time_budget_min}")
    if not config.lr > 0:
        raise TrainingInputError(f"lr must be > 0, got {config.lr}")
    if not 0 < config.layer_lr_floor <= 1:
        raise TrainingInputError(f"layer_lr_floor must be in (0, 1], got {config.layer_lr_floor}")
    if not 0 <= config.ema_decay < 1:
        raise TrainingInputError(f"ema_decay must be in [0, 1), got {config.ema_decay}")
    if spec.device and spec.device.startswith("cuda") and not torch.cuda.is_available():
        raise TrainingInputError(f"device {spec.device!r} requested but CUDA is not available here")
