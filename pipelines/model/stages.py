"""Fine-tuning stages: which parameters learn in each phase of a run, at which peak LR, for how long."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

if TYPE_CHECKING:
    from pipelines.model.train import TrainConfig


@dataclass(frozen=True)
class Stage:
    """One training phase: which parameters learn (name prefixes; ``""`` = all), at which peak LR, how
    long, and the first layer group's LR scale (layer-wise decay; 1 = uniform)."""

    name: str
    epochs: int
    lr: float
    trainable: tuple[str, ...]
    layer_lr_floor: float = 1.0


def fine_tuning_stages(
    config: TrainConfig, *, pretrained: bool, head: Sequence[str], finetune: Sequence[str] = ("",)
) -> list[Stage]:
    """For ImageNet weights: an optional ``head_epochs`` stage training ``head`` (parameter prefixes of the
    new classifier) alone, then ``finetune`` (default: everything) with layer-wise LR decay. From random
    init there is nothing to protect: one stage trains everything at one LR."""
    if not pretrained:
        return [Stage("full", config.epochs, config.lr, ("",))]
    head_epochs = min(config.head_epochs, config.epochs // 2)
    stages = [Stage("head", head_epochs, config.lr, tuple(head))] if head_epochs else []
    opened = ("",) if "" in finetune else (*finetune, *head)
    stages.append(Stage("finetune", config.epochs - head_epochs, config.lr, opened, config.layer_lr_floor))
    return stages


def is_trainable(name: str, prefixes: Iterable[str]) -> bool:
    return any(p == "" or name == p or name.startswith(p + ".") for p in prefixes)


def apply_stage(model: nn.Module, stage: Stage) -> None:
    trained = 0
    for name, param in model.named_parameters():
        param.requires_grad_(is_trainable(name, stage.trainable))
        trained += param.requires_grad
    if not trained:
        raise ValueError(f"stage {stage.name!r} trains no parameter (prefixes {stage.trainable})")


def freeze_frozen_batchnorm(model: nn.Module) -> None:
    """Frozen BatchNorm layers keep their ImageNet running statistics (train mode would overwrite them)."""
    for module in model.modules():
        if isinstance(module, _BatchNorm) and not any(p.requires_grad for p in module.parameters()):
            module.eval()
