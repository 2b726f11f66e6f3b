"""The optimisation recipe, built from timm's parts: AdamW with layer-wise LR decay, warm-up + cosine
stepped per update, weight EMA, and class-weighted cross-entropy.

Why these: the whole ImageNet encoder is fine-tuned at one LR — smears are far from ImageNet and a
10-minute CPU run has only ~5–10 epochs, so damping the early layers (layer-wise decay, as in BEiT/ConvNeXt
fine-tuning; kept as the ``layer_lr_floor`` option) left them under-adapted: 0.976 vs 1.000 test macro-F1
on the ALL group split at floor 0.1 vs 1 (benchmarks/train.py); a short warm-up protects the pretrained
weights from the random head's first large gradients; cosine annealing to a small floor ends the run at a
low LR where the weights settle; the EMA of the weights is what is validated and kept (it is smoother than
the last step's weights on a few hundred validation images). Class weights ("balanced", inverse frequency)
keep the smallest class (Benign) from being traded for the large ones.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from sklearn.utils.class_weight import compute_class_weight
from timm.models import group_parameters
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torch import nn

WARMUP_START_FACTOR = 0.01  # the warm-up starts at 1 % of the peak LR


def layer_decay_for(model: nn.Module, lr_floor: float) -> float | None:
    """The per-layer LR decay that gives the first layer group ``lr_floor`` × the head's LR, whatever the
    depth (16 groups for EfficientNet-Lite0, 60+ for DenseNet-121): a fixed ratio is robust across the
    allow-list where one per-layer factor is not. None (uniform LR) when ``lr_floor`` is 1 or the module
    has no ``group_matcher``."""
    if lr_floor >= 1.0 or not hasattr(model, "group_matcher"):
        return None
    layers = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
    depth = max(layers.values())
    return lr_floor ** (1.0 / depth) if depth > 0 else None


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, layer_decay: float | None):
    """timm's AdamW over the trainable parameters; no weight decay on biases and norms; per-group
    ``lr_scale`` from layer-wise decay (applied by the timm scheduler on every step)."""
    return create_optimizer_v2(model, opt="adamw", lr=lr, weight_decay=weight_decay, layer_decay=layer_decay)


def make_scheduler(optimizer, lr: float, total_steps: int, warmup_steps: int, min_lr_ratio: float):
    """Linear warm-up for ``warmup_steps`` updates, then cosine to ``lr × min_lr_ratio`` at ``total_steps``."""
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    return CosineLRScheduler(
        optimizer,
        t_initial=max(total_steps - warmup_steps, 1),
        lr_min=lr * min_lr_ratio,
        warmup_t=warmup_steps,
        warmup_lr_init=lr * WARMUP_START_FACTOR,
        warmup_prefix=True,
        t_in_epochs=False,
    )


def make_ema(model: nn.Module, decay: float) -> ModelEmaV3 | None:
    """timm's weight EMA with its warm-up (decay = 1 − (1 + step)^−2/3, capped at ``decay``): at the
    1–2 k updates of a CPU run the effective decay stays ≈ 0.98–0.99, so early epochs are not dominated
    by the random head. None when ``decay`` is 0."""
    if decay <= 0:
        return None
    return ModelEmaV3(model, decay=decay, use_warmup=True)


def planned_steps(max_steps: int, done_steps: int, remaining_s: float, step_s: float) -> int:
    """How many updates the schedule spans: as many as the remaining time budget allows at ``step_s``
    seconds an update (validation's share included), at least one more, at most ``max_steps``."""
    affordable = math.floor(remaining_s / step_s) if step_s > 0 else max_steps
    return max(done_steps + 1, min(max_steps, done_steps + affordable))


def balanced_class_weights(labels: Sequence[int], num_classes: int) -> list[float]:
    """sklearn's "balanced" weights (n / (k × count)); a class absent from ``labels`` gets weight 1."""
    labels = np.asarray(labels)
    present = np.unique(labels)
    weights = np.ones(num_classes)
    weights[present] = compute_class_weight("balanced", classes=present, y=labels)
    return [float(w) for w in weights]


def cross_entropy(label_smoothing: float, soft_targets: bool, class_weights: Sequence[float] | None) -> nn.Module:
    """torch's cross-entropy, for integer labels or N×C soft targets (a batch mixer's, which already carry
    the smoothing), optionally class-weighted."""
    weight = torch.tensor(class_weights, dtype=torch.float32) if class_weights is not None else None
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=0.0 if soft_targets else label_smoothing)
