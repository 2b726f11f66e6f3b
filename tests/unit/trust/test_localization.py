"""Localization metrics on hand-built heatmaps whose right answers are known exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipelines.core.corners import corner_box, corner_boxes
from pipelines.trust.localization import (
    LocalizationInputError,
    aggregate_reports,
    box_mask,
    flat_metrics,
    localization_report,
    pointing_game,
    region_score,
    relevance_mass_accuracy,
    relevance_rank_accuracy,
)

H = W = 112


@pytest.fixture
def masks() -> tuple[np.ndarray, np.ndarray]:
    """A round nucleus inside a larger cell, everything else plasma."""
    yy, xx = np.mgrid[:H, :W]
    r2 = (yy - 50) ** 2 + (xx - 50) ** 2
    return r2 < 15**2, r2 < 30**2


def test_corner_box_is_the_all_sets_60x40_label_box() -> None:
    assert corner_box(224, 224) == (184, 224, 164, 224)
    share = box_mask(224, 224, corner_box(224, 224)).mean()
    assert share == pytest.approx(60 * 40 / 224**2)
    boxes = corner_boxes(100, 200)
    assert set(boxes) == {"top_left", "top_right", "bottom_left", "bottom_right"}
    assert boxes["bottom_right"] == corner_box(100, 200)
    assert boxes["top_left"][0] == 0 and boxes["top_left"][2] == 0


def test_uniform_heatmap_scores_the_area_share_everywhere(masks) -> None:
    nucleus, foreground = masks
    report = localization_report(np.ones((H, W)), nucleus, foreground)
    for region in ("nucleus", "background", "corner", "other_corners", "artefact"):
        assert report[region]["mass"] == pytest.approx(report[region]["area_share"])
        assert report[region]["enrichment"] == pytest.approx(1.0)
    assert report["pointing_game"] == pytest.approx(nucleus.mean())
    assert report["rank_accuracy"] == pytest.approx(nucleus.mean())


def test_nucleus_only_heatmap_puts_all_mass_in_the_nucleus(masks) -> None:
    nucleus, foreground = masks
    heatmap = nucleus * 0.7 + np.random.default_rng(0).uniform(-0.2, 0, (H, W))  # negatives must not count
    report = localization_report(heatmap, nucleus, foreground)
    assert report["nucleus"]["mass"] == pytest.approx(1.0)
    assert report["nucleus"]["enrichment"] == pytest.approx(1 / nucleus.mean())
    assert report["pointing_game"] == 1.0
    assert report["rank_accuracy"] == pytest.approx(1.0)
    assert report["artefact"]["mass"] == pytest.approx(0.0)


def test_corner_only_heatmap_is_all_artefact(masks) -> None:
    nucleus, foreground = masks
    heatmap = box_mask(H, W, corner_box(H, W)).astype(float)
    report = localization_report(heatmap, nucleus, foreground)
    assert report["corner"]["mass"] == pytest.approx(1.0)
    assert report["artefact"]["mass"] == pytest.approx(1.0)
    assert report["corner"]["enrichment"] > 15  # 1 / 4.8% area share
    assert report["other_corners"]["mass"] == pytest.approx(0.0)
    assert report["nucleus"]["mass"] == 0.0
    assert report["pointing_game"] == 0.0
    # top-|nucleus| pixels: the whole corner box, then zeros tied at random, some of them in the nucleus
    corner_pixels, k = heatmap.sum(), nucleus.sum()
    assert report["rank_accuracy"] == pytest.approx((k - corner_pixels) / (H * W - corner_pixels))


def test_pointing_game_and_rank_accuracy_on_a_peak() -> None:
    mask = np.zeros((10, 10), bool)
    mask[2:4, 2:4] = True
    heatmap = np.zeros((10, 10))
    heatmap[3, 3] = 5.0  # the maximum, inside
    heatmap[8, 8] = 4.0  # second, outside
    heatmap[2, 2] = 3.0
    assert pointing_game(heatmap, mask) == 1.0
    assert pointing_game(heatmap.T[::-1, ::-1], mask) == 0.0
    # top-4 pixels: (3,3) in, (8,8) out, (2,2) in, then 97 tied zeros of which 2 are in the mask
    assert relevance_rank_accuracy(heatmap, mask) == pytest.approx((2 + 1 * 2 / 97) / 4)
    assert relevance_mass_accuracy(heatmap, mask) == pytest.approx(8 / 12)


def test_undefined_values_are_none_and_bad_inputs_are_refused(masks) -> None:
    nucleus, foreground = masks
    assert region_score(np.zeros((H, W)), nucleus)["mass"] is None
    assert region_score(np.ones((H, W)), np.zeros((H, W), bool))["enrichment"] is None
    assert relevance_rank_accuracy(np.ones((H, W)), np.zeros((H, W), bool)) is None
    with pytest.raises(LocalizationInputError, match="differs from heatmap shape"):
        localization_report(np.ones((H, W)), nucleus[:-1], foreground)
    with pytest.raises(LocalizationInputError, match="NaN"):
        localization_report(np.full((H, W), np.nan), nucleus, foreground)
    with pytest.raises(LocalizationInputError, match="bottom_right"):
        localization_report(np.ones((H, W)), nucleus, foreground, boxes={"top_left": (0, 5, 0, 5)})


def test_aggregate_per_class_and_overall_then_flat_metrics(masks) -> None:
    nucleus, foreground = masks
    on_nucleus = localization_report(nucleus.astype(float), nucleus, foreground)
    uniform = localization_report(np.ones((H, W)), nucleus, foreground)
    aggregate = aggregate_reports([on_nucleus, uniform, uniform], ["a", "b", "b"])
    assert aggregate["per_class"]["a"]["nucleus"]["mass"] == pytest.approx(1.0)
    assert aggregate["per_class"]["b"]["nucleus"]["enrichment"] == pytest.approx(1.0)
    overall = aggregate["overall"]
    assert overall["n"] == 3
    assert overall["nucleus"]["mass"] == pytest.approx((1 + 2 * nucleus.mean()) / 3)
    assert overall["pointing_game"] == pytest.approx((1 + 2 * nucleus.mean()) / 3)
    flat = flat_metrics(overall, "gradcam_")
    assert flat["gradcam_nucleus_mass"] == pytest.approx(overall["nucleus"]["mass"])
    assert {"gradcam_nucleus_enrichment", "gradcam_artefact_mass", "gradcam_artefact_enrichment"} <= set(flat)
    json.dumps(aggregate, allow_nan=False)  # JSON-safe: undefined values are None, never NaN
    with pytest.raises(LocalizationInputError):
        aggregate_reports([uniform], [])


def test_the_cell_region_is_reported_when_its_mask_is_given(masks) -> None:
    nucleus, foreground = masks
    cell = np.zeros_like(nucleus)
    cell[nucleus.any(axis=1)] = True  # the nucleus' rows: a region holding it
    on_cell = localization_report(cell.astype(float), nucleus, foreground, cell_mask=cell)
    assert on_cell["cell"]["mass"] == pytest.approx(1.0)
    assert on_cell["cell"]["enrichment"] == pytest.approx(1 / cell.mean())
    without = localization_report(cell.astype(float), nucleus, foreground)
    assert "cell" not in without
    assert "gradcam_cell_enrichment" in flat_metrics(aggregate_reports([on_cell], ["a"])["overall"], "gradcam_")
    # a summary is only as wide as its reports: no cell figure from reports that lack one
    assert "gradcam_cell_enrichment" not in flat_metrics(
        aggregate_reports([on_cell, without], ["a", "a"])["overall"], "gradcam_"
    )
    with pytest.raises(LocalizationInputError, match="cell_mask"):
        localization_report(np.ones((H, W)), nucleus, foreground, cell_mask=cell[:-1])
