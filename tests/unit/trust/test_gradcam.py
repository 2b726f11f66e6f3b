"""Grad-CAM (captum) maps: on the evidence, positive only, the predicted class by default, every backbone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pipelines.trust.gradcam import gradcam


class SignedNet(nn.Module):
    """Class 1's logit is the mean feature activation, class 0's its negative."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.features(x).mean(dim=(1, 2, 3))
        return torch.stack([-pooled, pooled], dim=1)


def test_gradcam_lands_on_the_evidence_and_keeps_only_positive_influence() -> None:
    torch.manual_seed(0)
    model = SignedNet().eval()
    nn.init.uniform_(model.features[0].weight, 0.1, 1.0)
    x = torch.zeros(3, 3, 16, 16)
    x[..., :6, :6] = torch.rand(3, 3, 6, 6) + 0.5  # the only content: top-left
    maps = gradcam(model, model.features, x, target=1)
    assert maps.shape == (3, 16, 16) and (maps >= 0).all()
    assert maps[:, :7, :7].sum() / maps.sum() > 0.95  # 6x6 content + the 3x3 conv's 1-px reach
    assert gradcam(model, model.features, x, target=0).max() == 0  # ReLU: negative evidence dropped
    assert all(m.inplace for m in model.modules() if hasattr(m, "inplace"))  # restored after the hooks


def test_gradcam_targets_the_predicted_class_by_default() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model = model.eval()
    x = torch.rand(4, 3, 16, 16)
    predicted = model(x).argmax(1)
    default = gradcam(model, model[0], x)
    explicit = gradcam(model, model[0], x, target=predicted.tolist())
    np.testing.assert_allclose(default, explicit)
    other = gradcam(model, model[0], x, target=((predicted + 1) % 6).tolist())
    assert not np.allclose(default, other)


@pytest.mark.parametrize(
    "name",
    [
        "densenet121",
        "mobilenetv2_100",
        "vgg16",
        "inception_v3",
        "resnet50",
        "legacy_xception",
        "custom_cnn",
        "efficientnet_lite0",
    ],
)
def test_gradcam_runs_for_every_allowed_backbone(name: str) -> None:
    from pipelines.model.backbones import BACKBONES, create_backbone

    assert name in BACKBONES
    size = 96 if name == "inception_v3" else 64
    backbone = create_backbone(name, 3, pretrained=False, image_size=size)
    backbone.model.eval()
    x = torch.rand(2, 3, size, size)
    maps = gradcam(backbone.model, backbone.gradcam_layer, x)
    assert maps.shape == (2, size, size)
    assert np.isfinite(maps).all() and (maps >= 0).all()
