"""Nucleus / cell segmentation: Dice against expert masks (real CellaVision) and synthetic ground truth."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipelines.cli import main
from pipelines.devstack.synthetic import synth_sample, write_synthetic
from pipelines.model.segmentation import (
    SegmentationError,
    central_nucleus,
    dice,
    foreground_mask,
    leukocyte_mask,
    nucleus_mask,
    score_folder,
)

# Measured (this segmenter, 100 expert masks): mean 0.967, median 0.982, worst 0.675. The floors sit
# ~2 points below: they tolerate OpenCV/scikit-image drift but catch a real regression (for scale: the
# H&E haematoxylin channel scores 0.88 mean, a plain global Otsu on saturation 0.89).
CELLAVISION_MEAN_FLOOR = 0.95
CELLAVISION_MEDIAN_FLOOR = 0.96
# Measured on 10 images per class at 128 px, seed 1: 0.93-0.99 per task (platelet clumps are the hardest).
SYNTHETIC_MEAN_FLOOR = 0.90


def test_dice_basics() -> None:
    a = np.zeros((10, 10), bool)
    b = a.copy()
    assert dice(a, b) == 1.0  # both empty: agree
    a[:5] = True
    assert dice(a, a) == 1.0
    b[5:] = True
    assert dice(a, b) == 0.0
    b[4] = True
    assert dice(a, b) == pytest.approx(2 * 10 / (50 + 60))
    with pytest.raises(SegmentationError, match="shapes differ"):
        dice(a, b[:5])


def test_dice_on_the_100_cellavision_expert_masks(shared_data: Path) -> None:
    report = score_folder(shared_data / "wbc_seg_cellavision", shared_data / "wbc_seg_cellavision_masks")
    assert report["n"] == 100
    assert not report["unmatched_images"] and not report["errors"]
    assert report["dice_mean"] >= CELLAVISION_MEAN_FLOOR, report
    assert report["dice_median"] >= CELLAVISION_MEDIAN_FLOOR, report
    assert set(report["per_folder"]) == {"basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil"}
    # SOURCE.md ships next to the masks: not an image, so never counted as unmatched
    assert not report["unmatched_masks"]


def test_dice_on_synthetic_ground_truth(tmp_path: Path) -> None:
    write_synthetic(tmp_path, "wbc", per_class=3, size=128, seed=11)
    report = score_folder(tmp_path / "images", tmp_path / "masks")
    assert report["n"] == 24
    assert report["dice_mean"] >= SYNTHETIC_MEAN_FLOOR, report


def test_foreground_holds_the_cells_and_not_the_plasma() -> None:
    sample = synth_sample("five_class", "AML", 0, 128, 4)
    fg, nucleus = foreground_mask(sample.rgb), nucleus_mask(sample.rgb)
    assert nucleus.shape == fg.shape == sample.rgb.shape[:2]
    assert (fg & sample.nucleus_mask).sum() >= 0.98 * sample.nucleus_mask.sum()
    assert not (nucleus & ~fg).any()
    plasma = ~fg
    assert 0.1 < plasma.mean() < 0.6  # red cells cover 50-80% of the synthetic field
    grey = sample.rgb.mean(axis=2)
    assert grey[plasma].mean() > grey[fg].mean() + 20  # the plasma is the brightest part


def test_a_field_of_red_cells_only_has_no_nucleus(shared_data: Path) -> None:
    """Top-left 110 px of PBC platelet crops: red cells and plasma only, where Otsu alone finds 'nuclei'."""
    files = sorted((shared_data / "pbc" / "platelet").glob("*.jpg"))[:4]
    for path in files:
        rgb = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        assert nucleus_mask(rgb).any(), path  # the whole crop holds the platelets
        assert not nucleus_mask(np.ascontiguousarray(rgb[:110, :110])).any(), path


def test_blank_and_invalid_images() -> None:
    flat = np.full((64, 64, 3), 230, np.uint8)
    assert not nucleus_mask(flat).any() and not foreground_mask(flat).any()
    with pytest.raises(SegmentationError, match="HxWx3 uint8"):
        nucleus_mask(np.zeros((64, 64), np.uint8))
    with pytest.raises(SegmentationError, match="too small"):
        nucleus_mask(np.zeros((8, 8, 3), np.uint8))


def test_score_folder_matches_by_subfolder_and_stem_and_reports_the_rest(tmp_path: Path) -> None:
    images, masks = tmp_path / "images", tmp_path / "masks"
    for folder in (images / "a", images / "b", masks / "a", masks / "b"):
        folder.mkdir(parents=True)
    for i, name in enumerate(("x", "y", "lonely", "broken")):
        sample = synth_sample("binary_all", "ALL", i, 64, 0)
        cv2.imwrite(str(images / "a" / f"{name}.jpg"), cv2.cvtColor(sample.rgb, cv2.COLOR_RGB2BGR))
        if name in ("x", "y"):
            cv2.imwrite(str(masks / "a" / f"{name}.png"), sample.nucleus_mask.astype(np.uint8) * 200)
    (masks / "a" / "broken.png").write_bytes(b"not a png")
    cv2.imwrite(str(masks / "b" / "x.png"), np.zeros((64, 64), np.uint8))  # same stem, other folder
    report = score_folder(images, masks, nucleus_value=200)
    assert report["n"] == 2 and report["dice_mean"] > 0.8
    assert report["unmatched_images"] == [str(images / "a" / "lonely.jpg")]
    assert report["unmatched_masks"] == [str(masks / "b" / "x.png")]
    assert len(report["errors"]) == 1 and "broken.png" in report["errors"][0]
    with pytest.raises(SegmentationError, match="does not exist"):
        score_folder(tmp_path / "nope", masks)
    with pytest.raises(SegmentationError, match="no image"):
        score_folder(images / "b", masks / "b")


def test_cli_segment_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_synthetic(tmp_path, "binary_all", per_class=2, size=96, seed=5)
    code = main(["segment", "--images", str(tmp_path / "images"), "--masks", str(tmp_path / "masks"), "--json"])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert data["n"] == 4 and 0.8 < data["dice_mean"] <= 1 and 0.8 < data["dice_median"] <= 1
    assert main(["segment", "--images", str(tmp_path / "missing"), "--masks", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_the_leukocyte_mask_against_the_100_expert_cell_masks(shared_data: Path) -> None:
    """Measured: Dice 0.80 mean against nucleus + cytoplasm (0.67 for the nucleus alone, which misses the
    cytoplasm); the floor sits 3 points below."""
    scores, nucleus_only = [], []
    for path in sorted((shared_data / "wbc_seg_cellavision").glob("*/*.bmp")):
        rgb = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        truth = cv2.imread(str(shared_data / "wbc_seg_cellavision_masks" / path.parent.name / f"{path.stem}.png"), 0)
        cell = leukocyte_mask(rgb)
        scores.append(dice(cell, truth >= 128))
        nucleus_only.append(dice(nucleus_mask(rgb), truth >= 128))
        assert not (central_nucleus(nucleus_mask(rgb)) & ~cell).any(), path  # the cell holds its nucleus
    assert len(scores) == 100
    assert np.mean(scores) >= 0.77 and np.mean(scores) > np.mean(nucleus_only) + 0.08


def test_the_central_nucleus_is_the_one_nearest_the_centre_with_its_lobes() -> None:
    nuclei = np.zeros((100, 100), bool)
    nuclei[45:55, 40:48] = nuclei[45:55, 50:58] = True  # two lobes 2 px apart, at the centre
    nuclei[5:15, 5:15] = True  # a neighbour's nucleus in the corner
    central = central_nucleus(nuclei)
    assert central[50, 44] and central[50, 54] and not central[10, 10]
    assert not central_nucleus(np.zeros((10, 10), bool)).any()
    assert not leukocyte_mask(np.full((64, 64, 3), 230, np.uint8)).any()
