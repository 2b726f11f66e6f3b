"""Determinism and devices: seeding, device choice, channels_last, and the CUDA path (fp16 autocast).

channels_last on every device: oneDNN's CPU convolutions are faster in it too (the product's fit, 2 cores,
benchmarks/channels_last.py: efficientnet_lite0 at 160 px 12.3 -> 19.8 img/s, mobilenetv2 at 96 px
39.6 -> 50.7), so a time-budgeted CPU run gets more epochs; timm's CNNs take either layout."""

from __future__ import annotations

import random

import numpy as np
import torch
from torch import nn


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(requested: str | None = None) -> torch.device:
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


MEMORY_FORMAT = torch.channels_last  # the layout of training's model and image batches (read at each call)


def to_layout(model: nn.Module) -> nn.Module:
    """``model`` with its 4-D weights in `MEMORY_FORMAT`, the layout `to_device` gives the batches."""
    return model.to(memory_format=MEMORY_FORMAT)


def to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    batch = batch.to(device, non_blocking=True)
    return batch.contiguous(memory_format=MEMORY_FORMAT) if batch.dim() == 4 else batch


def autocast(device: torch.device) -> torch.autocast:
    return torch.autocast(device_type=device.type, dtype=torch.float16, enabled=device.type == "cuda")
