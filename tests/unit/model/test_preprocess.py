"""Preprocessing: ROI crop, corner mask, resize + normalise from a timm data config, transforms."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.model.preprocess import (
    PreprocessError,
    build_transform,
    mask_corner,
    prepare_image,
    preprocessing_from,
    roi_crop,
    to_tensor_batch,
)

DATA_CONFIG = {
    "input_size": (3, 64, 64),
    "interpolation": "bicubic",
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    "crop_pct": 0.875,
}


@pytest.fixture(scope="module")
def smear(shared_data: Path) -> np.ndarray:
    path = shared_data / "all_taleqani" / "Benign" / "WBC-Benign-001.jpg"
    return np.asarray(Image.open(path).convert("RGB"))


def test_roi_crop_removes_a_black_border_and_keeps_a_borderless_image(smear: np.ndarray) -> None:
    bordered = np.zeros((smear.shape[0] + 50, smear.shape[1] + 70, 3), np.uint8)
    bordered[20 : 20 + smear.shape[0], 45 : 45 + smear.shape[1]] = smear
    cropped = roi_crop(bordered)
    assert cropped.shape == smear.shape
    assert np.array_equal(cropped, smear)
    assert roi_crop(smear) is smear


def test_roi_crop_ignores_specks_on_an_all_black_image() -> None:
    dark = np.zeros((100, 100, 3), np.uint8)
    dark[5:8, 5:8] = 255
    assert roi_crop(dark) is dark


def test_mask_corner_fills_only_the_bottom_right_box(smear: np.ndarray) -> None:
    masked = mask_corner(smear, box=(0.25, 0.5), fill=(1, 2, 3))
    height, width = smear.shape[:2]
    assert (masked[height - height // 4 :, width - width // 2 :] == (1, 2, 3)).all()
    untouched = np.ones(smear.shape[:2], bool)
    untouched[height - height // 4 :, width - width // 2 :] = False
    assert np.array_equal(masked[untouched], smear[untouched])
    assert not np.shares_memory(masked, smear)


def test_preprocessing_dict_is_json_and_follows_the_data_config() -> None:
    preprocessing = preprocessing_from(DATA_CONFIG, mask_corner=True, corner_box=(0.1, 0.2))
    assert json.loads(json.dumps(preprocessing)) == preprocessing
    assert preprocessing["input_size"] == [3, 64, 64] and preprocessing["interpolation"] == "bicubic"
    assert preprocessing["mask_corner"] and preprocessing["corner_box"] == [0.1, 0.2]
    assert preprocessing["corner_fill"] == [124, 116, 104]


def test_to_tensor_batch_resizes_and_normalises() -> None:
    preprocessing = preprocessing_from(DATA_CONFIG, roi_crop=False)
    grey = np.full((100, 150, 3), 200, np.uint8)
    batch = to_tensor_batch([grey, grey[:80]], preprocessing)
    assert batch.shape == (2, 3, 64, 64) and batch.dtype == torch.float32
    expected = (200 / 255 - np.asarray(DATA_CONFIG["mean"])) / np.asarray(DATA_CONFIG["std"])
    assert torch.allclose(batch[:, :, 10, 10], torch.tensor(expected, dtype=torch.float32).expand(2, 3), atol=1e-4)


def test_corner_mask_is_neutral_after_normalising(smear: np.ndarray) -> None:
    preprocessing = preprocessing_from(DATA_CONFIG, mask_corner=True, corner_box=(0.25, 0.25))
    batch = to_tensor_batch([smear], preprocessing)
    corner = batch[0, :, -10:, -10:]
    assert corner.abs().max() < 0.03  # the fill is the mean colour: ~0 once normalised
    unmasked = to_tensor_batch([smear], preprocessing_from(DATA_CONFIG))
    assert unmasked[0, :, -10:, -10:].abs().max() > 0.5


def test_train_transform_applies_flips_and_the_augmentation_eval_matches_inference(smear: np.ndarray) -> None:
    preprocessing = preprocessing_from(DATA_CONFIG)
    calls = []

    def record(image: Image.Image) -> Image.Image:
        calls.append(image.size)
        return image

    train = build_transform(preprocessing, record)
    torch.manual_seed(0)
    outputs = [train(smear) for _ in range(8)]
    assert calls == [(64, 64)] * 8
    assert any(not torch.equal(outputs[0], other) for other in outputs[1:])  # random flips happened
    evaluation = build_transform(preprocessing, record, train=False)
    assert torch.equal(evaluation(smear), to_tensor_batch([smear], preprocessing)[0])
    assert torch.equal(evaluation(Image.fromarray(smear)), evaluation(smear))
    assert len(calls) == 8  # no augmentation at evaluation


def test_prepare_image_uses_the_configured_size_and_interpolation(smear: np.ndarray) -> None:
    preprocessing = preprocessing_from({**DATA_CONFIG, "input_size": (3, 48, 80), "interpolation": "nearest"})
    image = prepare_image(smear, preprocessing)
    assert image.size == (80, 48)
    assert image == Image.fromarray(smear).resize((80, 48), Image.Resampling.NEAREST)


def test_bad_inputs_are_clear_errors() -> None:
    preprocessing = preprocessing_from(DATA_CONFIG)
    with pytest.raises(PreprocessError, match="H×W×3"):
        to_tensor_batch([np.zeros((10, 10), np.uint8)], preprocessing)
    with pytest.raises(PreprocessError, match="H×W×3"):
        to_tensor_batch([np.zeros((10, 10, 3), np.float32)], preprocessing)
    with pytest.raises(PreprocessError, match="no images"):
        to_tensor_batch([], preprocessing)
    with pytest.raises(PreprocessError, match="lacks \\['mean'\\]"):
        to_tensor_batch([np.zeros((10, 10, 3), np.uint8)], {k: v for k, v in preprocessing.items() if k != "mean"})
    with pytest.raises(PreprocessError, match="corner_box"):
        preprocessing_from(DATA_CONFIG, corner_box=(0.5, 1.5))
    with pytest.raises(PreprocessError, match="not a timm data config"):
        preprocessing_from({"mean": (0.5,)})
