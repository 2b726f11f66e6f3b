"""Where an explanation heatmap puts its mass: nucleus localization and artefact checks (numpy only).

Definitions follow Quantus (Hedström et al., 2023): relevance mass accuracy (Arras et al., 2022) is
the share of positive attribution inside the region; relevance rank accuracy is the share of the
top-|region| pixels that fall inside it; the pointing game (Zhang et al., 2018) asks whether the
maximum lies inside. Every mass is reported beside the region's area share, the score a uniform
heatmap gets, and their ratio (enrichment): 1 means "no better than chance", above 1 means the
heatmap concentrates there.

The corner boxes come from ``core.corners`` (shared geometry): the synthetic shortcut mark is painted in
``corner_box`` and preprocessing masks the same box, so a region checked here is the region planted or masked.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from pipelines.core.corners import LABEL_CORNER, Box, corner_boxes
from pipelines.core.errors import LeukopsError


class LocalizationInputError(LeukopsError, ValueError):
    pass


def box_mask(h: int, w: int, box: Box) -> np.ndarray:
    mask = np.zeros((h, w), dtype=bool)
    y0, y1, x0, x1 = box
    mask[y0:y1, x0:x1] = True
    return mask


def _check_inputs(heatmap: np.ndarray, **masks: np.ndarray) -> np.ndarray:
    heatmap = np.asarray(heatmap, dtype=np.float64)
    if heatmap.ndim != 2:
        raise LocalizationInputError(f"heatmap must be 2-D (HxW), got shape {heatmap.shape}")
    if not np.isfinite(heatmap).all():
        raise LocalizationInputError("heatmap holds NaN or infinite values")
    for name, mask in masks.items():
        if np.shape(mask) != heatmap.shape:
            raise LocalizationInputError(f"{name} shape {np.shape(mask)} differs from heatmap shape {heatmap.shape}")
    return heatmap


def region_score(heatmap: np.ndarray, region: np.ndarray) -> dict[str, float | None]:
    """Positive attribution mass in ``region``, its area share, and their ratio (enrichment).

    Mass is None when the heatmap has no positive value (nothing to localise); enrichment is None
    when the region is empty.
    """
    heatmap = _check_inputs(heatmap, region=region)
    region = np.asarray(region, dtype=bool)
    positive = np.clip(heatmap, 0, None)
    total = positive.sum()
    area_share = float(region.mean())
    mass = float(positive[region].sum() / total) if total > 0 else None
    enrichment = mass / area_share if mass is not None and area_share > 0 else None
    return {"mass": mass, "area_share": area_share, "enrichment": enrichment}


def relevance_mass_accuracy(heatmap: np.ndarray, mask: np.ndarray) -> float | None:
    """Quantus RelevanceMassAccuracy: positive attribution inside ``mask`` / total positive attribution."""
    return region_score(heatmap, mask)["mass"]


def pointing_game(heatmap: np.ndarray, mask: np.ndarray) -> float:
    """Quantus PointingGame: 1.0 when the heatmap maximum lies inside ``mask``, else 0.0.

    Tied maxima count as the share of them inside the mask (the expected hit under random
    tie-breaking), so a flat heatmap scores the mask's area share instead of an artefact of pixel order.
    """
    heatmap = _check_inputs(heatmap, mask=mask)
    at_max = heatmap == heatmap.max()
    return float(np.asarray(mask, bool)[at_max].mean())


def relevance_rank_accuracy(heatmap: np.ndarray, mask: np.ndarray) -> float | None:
    """Quantus RelevanceRankAccuracy: share of the top-|mask| attribution pixels that lie inside ``mask``.

    Pixels tied at the cut-off value are counted fractionally (expected value under random
    tie-breaking), so a flat heatmap scores the mask's area share. None for an empty mask.
    """
    heatmap = _check_inputs(heatmap, mask=mask)
    mask = np.asarray(mask, bool)
    k = int(mask.sum())
    if k == 0:
        return None
    values = heatmap.ravel()
    cutoff = np.partition(values, values.size - k)[values.size - k]
    above, tied = heatmap > cutoff, heatmap == cutoff
    tied_taken = (k - int(above.sum())) / int(tied.sum())
    inside = mask[above].sum() + tied_taken * mask[tied].sum()
    return float(inside / k)


def localization_report(
    heatmap: np.ndarray,
    nucleus_mask: np.ndarray,
    foreground_mask: np.ndarray,
    boxes: Mapping[str, Box] | None = None,
    cell_mask: np.ndarray | None = None,
) -> dict:
    """Every localization figure of one heatmap (HxW; masks of the same shape).

    Regions: ``nucleus``; ``cell`` (the central leukocyte, nucleus and cytoplasm, when ``cell_mask`` is
    given: the evidence region of tasks whose classes differ in cytoplasm too); ``background`` (no cell:
    not foreground); ``corner`` (the label box, ``boxes[LABEL_CORNER]``, default ``corner_boxes(h, w)``);
    ``other_corners`` (the three other corner boxes, a control: a label shortcut shows as corner enrichment
    well above theirs); ``artefact`` (background or label corner: regions that hold no cell evidence).
    Each as {mass, area_share, enrichment}; plus ``pointing_game`` and ``rank_accuracy`` for the nucleus.
    """
    cells = {} if cell_mask is None else {"cell_mask": cell_mask}
    heatmap = _check_inputs(heatmap, nucleus_mask=nucleus_mask, foreground_mask=foreground_mask, **cells)
    h, w = heatmap.shape
    boxes = dict(boxes) if boxes is not None else corner_boxes(h, w)
    if LABEL_CORNER not in boxes:
        raise LocalizationInputError(f"corner boxes must include {LABEL_CORNER!r}, got {sorted(boxes)}")
    nucleus = np.asarray(nucleus_mask, bool)
    background = ~np.asarray(foreground_mask, bool)
    corner = box_mask(h, w, boxes[LABEL_CORNER])
    other_corners = np.zeros((h, w), bool)
    for name, box in boxes.items():
        if name != LABEL_CORNER:
            other_corners |= box_mask(h, w, box)
    report = {
        "nucleus": region_score(heatmap, nucleus),
        "background": region_score(heatmap, background),
        "corner": region_score(heatmap, corner),
        "other_corners": region_score(heatmap, other_corners),
        "artefact": region_score(heatmap, background | corner),
        "pointing_game": pointing_game(heatmap, nucleus) if nucleus.any() else None,
        "rank_accuracy": relevance_rank_accuracy(heatmap, nucleus),
    }
    if cell_mask is not None:
        report["cell"] = region_score(heatmap, np.asarray(cell_mask, bool))
    return report


REGIONS = ("nucleus", "cell", "background", "corner", "other_corners", "artefact")  # "cell": when given
SCALARS = ("pointing_game", "rank_accuracy")


def _mean(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def _summarise(reports: list[dict]) -> dict:
    summary: dict = {"n": len(reports)}
    for region in (region for region in REGIONS if all(region in r for r in reports)):
        mass = _mean(r[region]["mass"] for r in reports)
        area = _mean(r[region]["area_share"] for r in reports)
        # Ratio of means, not mean of ratios: a few tiny regions must not dominate the enrichment.
        enrichment = mass / area if mass is not None and area else None
        summary[region] = {"mass": mass, "area_share": area, "enrichment": enrichment}
    for name in SCALARS:
        summary[name] = _mean(r[name] for r in reports)
    return summary


def aggregate_reports(reports: list[dict], labels: list[str]) -> dict:
    """Mean localization figures overall and per class: {"overall": {...}, "per_class": {label: {...}}}."""
    if len(reports) != len(labels):
        raise LocalizationInputError(f"{len(reports)} reports but {len(labels)} labels")
    if not reports:
        raise LocalizationInputError("no localization reports to aggregate")
    per_class = {
        label: _summarise([r for r, lab in zip(reports, labels, strict=True) if lab == label])
        for label in sorted(set(labels))
    }
    return {"overall": _summarise(reports), "per_class": per_class}


def flat_metrics(summary: dict, prefix: str) -> dict[str, float]:
    """One summary (e.g. ``aggregate["overall"]``) as flat MLflow metrics: ``<prefix><region>_mass``,
    ``_area_share``, ``_enrichment``, ``<prefix>pointing_game``, ``<prefix>rank_accuracy``; None dropped."""
    flat = {}
    for region in (region for region in REGIONS if region in summary):
        for key, value in summary[region].items():
            flat[f"{prefix}{region}_{key}"] = value
    for name in SCALARS:
        flat[f"{prefix}{name}"] = summary[name]
    return {k: float(v) for k, v in flat.items() if v is not None}
