"""The model bundle: one metadata contract next to the weights, read back into the same classifier."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.model.backbones import create_backbone
from pipelines.model.bundle import (
    BUNDLE_FILE,
    BUNDLE_FORMAT,
    WEIGHTS_FILE,
    BundleError,
    LoadedModel,
    ModelBundle,
    read_bundle,
    save_bundle,
)
from pipelines.model.predict import InferenceConfig
from pipelines.model.preprocess import preprocessing_from

CLASSES = ["ALL", "Healthy"]


def _trained_bundle(
    tmp_path: Path, inference: InferenceConfig | None = None
) -> tuple[ModelBundle, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    backbone = create_backbone("custom_cnn", 2, pretrained=False, image_size=32, drop_rate=0.2, head_hidden=64)
    preprocessing = preprocessing_from(backbone.data_config)
    bundle = ModelBundle.for_backbone("binary_all", CLASSES, backbone, preprocessing, inference)
    save_bundle(bundle, backbone.model.state_dict(), tmp_path)
    return bundle, backbone.model.state_dict()


def _images(n: int = 3) -> list[np.ndarray]:
    return [np.random.default_rng(i).integers(0, 255, (40, 48, 3), dtype=np.uint8) for i in range(n)]


def test_a_saved_bundle_reads_back_as_the_same_classifier(tmp_path: Path) -> None:
    bundle, state = _trained_bundle(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [BUNDLE_FILE, WEIGHTS_FILE]
    loaded = read_bundle(tmp_path, run_id="run-1")
    assert loaded.bundle == bundle and loaded.run_id == "run-1"
    assert (loaded.task, loaded.classes, loaded.preprocessing) == ("binary_all", CLASSES, bundle.preprocessing)
    assert loaded.backbone.head_hidden == 64 and loaded.backbone.drop_rate == 0.2
    assert loaded.module.get_submodule(bundle.gradcam_layer_name) is loaded.gradcam_layer
    assert not loaded.module.training
    for name, tensor in loaded.module.state_dict().items():
        assert torch.equal(tensor, state[name]), name

    original = create_backbone("custom_cnn", 2, pretrained=False, image_size=32, drop_rate=0.2, head_hidden=64)
    original.model.load_state_dict(state)
    reference = LoadedModel(original, bundle)
    original.model.eval()
    assert np.allclose(loaded.predict_proba(_images()), reference.predict_proba(_images()), atol=1e-6)
    assert loaded.embed(_images(2)).shape == (2, loaded.module.encoder.num_features)


def test_the_contract_is_one_flat_json_and_records_how_training_started(tmp_path: Path) -> None:
    bundle, _ = _trained_bundle(tmp_path)
    saved = json.loads((tmp_path / BUNDLE_FILE).read_text())
    assert saved["format"] == BUNDLE_FORMAT and saved["backbone"] == "custom_cnn" and saved["image_size"] == 32
    assert saved["classes"] == CLASSES and saved["preprocessing"]["input_size"] == [3, 32, 32]
    assert saved["pretrained"] is False and saved["weights_source"] == "random-init"
    saved |= {"pretrained": True, "weights_source": "file:imagenet.pth"}
    (tmp_path / BUNDLE_FILE).write_text(json.dumps(saved))
    rebuilt = read_bundle(tmp_path).backbone
    assert rebuilt.pretrained and rebuilt.weights_source == "file:imagenet.pth"  # the record, not this init


def test_a_format_1_bundle_with_nested_backbone_config_still_loads(tmp_path: Path) -> None:
    bundle, _ = _trained_bundle(tmp_path)
    flat = json.loads((tmp_path / BUNDLE_FILE).read_text())
    nested = {k: flat[k] for k in ("task", "classes", "backbone", "image_size", "pretrained")}
    nested |= {"preprocessing": flat["preprocessing"], "gradcam_layer_name": flat["gradcam_layer_name"]}
    config = {"name": "custom_cnn", "num_classes": 2, "head_hidden": 64, "drop_rate": 0.2, "config_version": 1}
    nested |= {"format": 1, "backbone_config": config | {"weights_source": "random-init", "timm_version": "x"}}
    (tmp_path / BUNDLE_FILE).write_text(json.dumps(nested))
    loaded = read_bundle(tmp_path)
    assert loaded.bundle.head_hidden == 64 and loaded.bundle.timm_version == "x"
    assert loaded.predict_proba(_images(1)).shape == (1, 2)


def test_unreadable_bundles_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=BUNDLE_FILE):
        read_bundle(tmp_path)
    _trained_bundle(tmp_path)
    saved = json.loads((tmp_path / BUNDLE_FILE).read_text())
    (tmp_path / BUNDLE_FILE).write_text(json.dumps(saved | {"format": 99}))
    with pytest.raises(BundleError, match="unsupported bundle format 99"):
        read_bundle(tmp_path)


def test_temperature_and_tta_round_trip_and_every_prediction_applies_them(tmp_path: Path) -> None:
    inference = InferenceConfig(temperature=0.4, tta=("hflip",))
    bundle, _ = _trained_bundle(tmp_path / "calibrated", inference)
    saved = json.loads((tmp_path / "calibrated" / BUNDLE_FILE).read_text())
    assert (saved["temperature"], saved["tta"]) == (0.4, ["hflip"])
    calibrated = read_bundle(tmp_path / "calibrated")
    assert calibrated.bundle == bundle and calibrated.inference == inference

    _trained_bundle(tmp_path / "plain")  # same seed: the same weights, T = 1 and no TTA
    plain = read_bundle(tmp_path / "plain")
    outputs = calibrated.outputs(_images())
    assert np.allclose(outputs.proba, torch.softmax(torch.tensor(outputs.logits) / 0.4, dim=1).numpy())
    assert np.allclose(calibrated.predict_proba(_images()), outputs.proba)
    with torch.no_grad():
        batch = plain.batch(_images())
        flip_average = (plain.module(batch) + plain.module(batch.flip(-1))) / 2
    assert np.allclose(outputs.logits, flip_average.numpy(), atol=1e-5)


def test_a_format_2_bundle_loads_with_temperature_one_and_no_tta(tmp_path: Path) -> None:
    _trained_bundle(tmp_path, InferenceConfig(temperature=2.0, tta=("vflip",)))
    saved = json.loads((tmp_path / BUNDLE_FILE).read_text())
    old = {k: v for k, v in saved.items() if k not in ("temperature", "tta")} | {"format": 2}
    (tmp_path / BUNDLE_FILE).write_text(json.dumps(old))
    loaded = read_bundle(tmp_path)
    assert loaded.inference == InferenceConfig() and loaded.bundle.format == BUNDLE_FORMAT
    with torch.no_grad():
        expected = torch.softmax(loaded.module(loaded.batch(_images())), dim=1).numpy()
    assert np.allclose(loaded.predict_proba(_images()), expected, atol=1e-6)


def test_a_bundle_with_a_bad_temperature_names_the_file(tmp_path: Path) -> None:
    _trained_bundle(tmp_path)
    saved = json.loads((tmp_path / BUNDLE_FILE).read_text())
    (tmp_path / BUNDLE_FILE).write_text(json.dumps(saved | {"temperature": -1}))
    with pytest.raises(BundleError, match=rf"{BUNDLE_FILE}.*temperature must be a positive number"):
        read_bundle(tmp_path)
