"""Grad-CAM maps of a classifier (captum's ``LayerGradCam``) and their heat overlay on the image.

The layer is the backbone's Grad-CAM layer (chosen once by the backbone factory); attributions are
ReLU'd and upsampled bilinearly to the input resolution.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from captum.attr import LayerAttribution, LayerGradCam


def _module_of(loaded_or_module: object) -> torch.nn.Module:
    return loaded_or_module.module if hasattr(loaded_or_module, "module") else loaded_or_module


@contextlib.contextmanager
def _without_inplace(module: torch.nn.Module) -> Iterator[None]:
    """In-place activations after the hooked layer would overwrite the activation Grad-CAM needs."""
    switched = [m for m in module.modules() if getattr(m, "inplace", False) is True]
    for m in switched:
        m.inplace = False
    try:
        yield
    finally:
        for m in switched:
            m.inplace = True


def gradcam(
    loaded_or_module: object,
    gradcam_layer: torch.nn.Module,
    batch_tensor: torch.Tensor,
    target: int | Sequence[int] | torch.Tensor | None = None,
    chunk: int = 16,
) -> np.ndarray:
    """Grad-CAM maps (N x H x W, >= 0) at the input resolution; target = predicted class by default."""
    module = _module_of(loaded_or_module).eval()
    device = next(module.parameters()).device
    cam = LayerGradCam(module, gradcam_layer)
    maps = []
    with _without_inplace(module):
        for start in range(0, batch_tensor.shape[0], chunk):
            x = batch_tensor[start : start + chunk].to(device)
            tgt = _targets(module, x, target, start)
            attr = cam.attribute(x, target=tgt, relu_attributions=True)
            up = LayerAttribution.interpolate(attr, tuple(x.shape[-2:]), interpolate_mode="bilinear")
            maps.append(up.detach().sum(dim=1).clamp_min(0).cpu().numpy())
    return np.concatenate(maps).astype(np.float32)


def _targets(module: torch.nn.Module, x: torch.Tensor, target: object, start: int) -> torch.Tensor:
    if target is None:
        with torch.no_grad():
            return module(x).argmax(dim=1)
    if isinstance(target, int):
        return torch.full((x.shape[0],), target, dtype=torch.long, device=x.device)
    return torch.as_tensor(target, device=x.device)[start : start + x.shape[0]].long()


def heat_overlay(rgb: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The heatmap (normalised to its max) in the jet colour map blended over the image, uint8 RGB."""
    import matplotlib

    scaled = heat / heat.max() if heat.max() > 0 else heat
    colour = (matplotlib.colormaps["jet"](scaled)[..., :3] * 255).astype(np.float32)
    return ((1 - alpha) * rgb.astype(np.float32) + alpha * colour).clip(0, 255).astype(np.uint8)
