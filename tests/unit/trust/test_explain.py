"""Grad-CAM (captum), LIME (lime) and the per-sample explanation report, without servers."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from lime import lime_image
from torch import nn

from pipelines.trust.explain import (
    LIME_VIEWS,
    ExplainError,
    classifier_fn,
    explain_images,
    gradcam,
    lime_explain,
    model_input_images,
    overlay_grid,
    sample_split,
    segmenter,
)


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


def _tiny_classifier() -> tuple[nn.Module, callable]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(128, 3)
    ).eval()

    def to_tensor(images):
        return torch.as_tensor(np.stack(images)).permute(0, 3, 1, 2).float() / 255

    return model, to_tensor


def _smear(label: str = "AML", index: int = 0, size: int = 96) -> np.ndarray:
    from pipelines.devstack.synthetic import synth_sample

    return synth_sample("five_class", label, index, size, seed=0).rgb


def test_lime_matches_the_lime_package_exactly() -> None:
    model, to_tensor = _tiny_classifier()
    image = _smear()

    def slow(images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return torch.softmax(model(to_tensor(list(images))), 1).numpy()

    reference = lime_image.LimeImageExplainer(random_state=3).explain_instance(
        image, slow, num_samples=200, random_seed=3
    )
    ours = lime_explain(image, classifier_fn(model, to_tensor, batch_size=64), num_samples=200, seed=3)
    assert ours.label == reference.top_labels[0] and ours.samples_used == 200
    np.testing.assert_array_equal(ours.segments, reference.segments)
    expected = dict(reference.local_exp[ours.label])
    got = ours.weights()
    assert expected.keys() == got.keys()
    np.testing.assert_allclose([got[k] for k in expected], list(expected.values()), atol=1e-6)


def test_adaptive_lime_stops_early_on_a_stable_ranking() -> None:
    model, to_tensor = _tiny_classifier()
    image = _smear()
    predict = classifier_fn(model, to_tensor)
    full = lime_explain(image, predict, num_samples=1000, seed=0)
    fast = lime_explain(image, predict, num_samples=1000, seed=0, adaptive=True, chunk=100)
    assert fast.samples_used < 1000
    assert len(set(fast.top_superpixels(5)) & set(full.top_superpixels(5))) >= 4


def test_lime_views_and_heatmap() -> None:
    model, to_tensor = _tiny_classifier()
    image = _smear()
    result = lime_explain(image, classifier_fn(model, to_tensor), num_samples=100, seed=0)
    views = result.views(num_features=3)
    assert tuple(views) == LIME_VIEWS
    for view in views.values():
        assert view.shape == image.shape and view.dtype == np.uint8
    hidden = ~np.isin(result.segments, result.top_superpixels(3))
    assert (views["positive_hide_rest"][hidden] == 0).mean() > 0.9  # the rest is hidden (black)
    heat = result.heatmap()
    assert heat.shape == image.shape[:2] and (heat >= 0).all()


def test_superpixel_algorithms() -> None:
    image = _smear()
    assert segmenter("slic", n_segments=20)(image).max() + 1 <= 40
    assert segmenter("quickshift")(image).max() >= 1
    with pytest.raises(ExplainError, match="felzenszwalb"):
        segmenter("felzenszwalb")


def test_lime_rejects_a_grey_image() -> None:
    model, to_tensor = _tiny_classifier()
    with pytest.raises(ExplainError, match="H x W x 3"):
        lime_explain(np.zeros((32, 32), np.uint8), classifier_fn(model, to_tensor))


def test_sample_split_is_seeded_and_class_balanced() -> None:
    frame = pd.DataFrame({"sha256": [f"{i:04x}" for i in range(30)], "label": ["a"] * 20 + ["b"] * 7 + ["c"] * 3})
    first = sample_split(frame, ["a", "b", "c"], 9, seed=1)
    assert first["label"].value_counts().to_dict() == {"a": 3, "b": 3, "c": 3}
    pd.testing.assert_frame_equal(first, sample_split(frame.sample(frac=1, random_state=5), ["a", "b", "c"], 9, 1))
    assert not sample_split(frame, ["a", "b", "c"], 9, seed=2)["sha256"].equals(first["sha256"])


def test_overlay_grid_is_a_png() -> None:
    image = _smear()
    png = overlay_grid([{"image": image, "grad-cam": image}, {"image": image}], "class AML")
    assert png.startswith(b"\x89PNG")
    with pytest.raises(ExplainError, match="no rows"):
        overlay_grid([], "empty")


def test_explain_images_reports_the_contract_metrics() -> None:
    from pipelines.model.backbones import create_backbone
    from pipelines.model.preprocess import preprocessing_from

    backbone = create_backbone("custom_cnn", 3, pretrained=False, image_size=64)
    backbone.model.eval()
    loaded = SimpleNamespace(
        module=backbone.model,
        classes=["ALL", "AML", "CLL"],
        preprocessing=preprocessing_from(backbone.data_config),
        gradcam_layer=backbone.gradcam_layer,
    )
    labels = ["ALL", "AML", "CLL"] * 2
    images = [_smear(label, i // 3, 80) for i, label in enumerate(labels)]
    result = explain_images(loaded, images, labels, lime_images=2, lime_samples=60)
    report = result.report
    assert set(report) >= {"gradcam", "lime", "shortcut", "segmentation"}
    assert set(report["gradcam"]["per_class"]) == {"ALL", "AML", "CLL"}
    assert report["lime"]["n"] == 2 and report["shortcut"]["n_images"] == 6
    for name in (
        "gradcam_nucleus_mass",
        "gradcam_nucleus_enrichment",
        "gradcam_artefact_mass",
        "gradcam_artefact_enrichment",
        "shortcut_flip_rate",
        "shortcut_f1_drop",
        "lime_nucleus_mass",
    ):
        assert name in result.metrics, name
        assert np.isfinite(result.metrics[name])
    assert 0 <= result.metrics["gradcam_nucleus_mass"] <= 1
    assert set(result.overlays) == {"ALL", "AML", "CLL"}
    with pytest.raises(ExplainError, match="not classes"):
        explain_images(loaded, images[:2], ["ALL", "Healthy"])


def test_model_input_images_undo_the_normalisation() -> None:
    prep = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}
    rgb = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    tensor = (torch.as_tensor(rgb).permute(0, 3, 1, 2) / 255 - torch.tensor(prep["mean"]).view(1, 3, 1, 1)) / (
        torch.tensor(prep["std"]).view(1, 3, 1, 1)
    )
    np.testing.assert_array_equal(np.stack(model_input_images(tensor, prep)), rgb)
