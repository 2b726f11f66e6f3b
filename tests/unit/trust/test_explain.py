"""The per-sample explanation report, its sample and its overlay grids, without servers."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from pipelines.trust.explain import ExplainError, explain_images, model_input_images, overlay_grid, sample_split

from .smear import smear


def test_sample_split_is_seeded_and_class_balanced() -> None:
    frame = pd.DataFrame({"sha256": [f"{i:04x}" for i in range(30)], "label": ["a"] * 20 + ["b"] * 7 + ["c"] * 3})
    first = sample_split(frame, ["a", "b", "c"], 9, seed=1)
    assert first["label"].value_counts().to_dict() == {"a": 3, "b": 3, "c": 3}
    pd.testing.assert_frame_equal(first, sample_split(frame.sample(frac=1, random_state=5), ["a", "b", "c"], 9, 1))
    assert not sample_split(frame, ["a", "b", "c"], 9, seed=2)["sha256"].equals(first["sha256"])


def test_overlay_grid_is_a_png() -> None:
    image = smear()
    png = overlay_grid([{"image": image, "grad-cam": image}, {"image": image}], "class AML")
    assert png.startswith(b"\x89PNG")
    with pytest.raises(ExplainError, match="no rows"):
        overlay_grid([], "empty")


def test_explain_images_reports_the_contract_metrics() -> None:
    from pipelines.model.backbones import create_backbone
    from pipelines.model.preprocess import preprocessing_from, to_tensor_batch
    from pipelines.trust.lime_explainer import classifier_fn

    backbone = create_backbone("custom_cnn", 3, pretrained=False, image_size=64)
    backbone.model.eval()
    preprocessing = preprocessing_from(backbone.data_config)
    loaded = SimpleNamespace(
        module=backbone.model,
        classes=["ALL", "AML", "CLL"],
        preprocessing=preprocessing,
        gradcam_layer=backbone.gradcam_layer,
        predict_proba=classifier_fn(backbone.model, lambda imgs: to_tensor_batch(list(imgs), preprocessing)),
    )
    labels = ["ALL", "AML", "CLL"] * 2
    images = [smear(label, i // 3, 80) for i, label in enumerate(labels)]
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
        "shortcut_flips",
        "shortcut_n_images",
        "shortcut_flip_rate_upper",
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
