"""Grad-CAM for one served request: the heatmap on the input image, its PNG overlay and localization figures.

The map is computed by ``pipelines.trust.gradcam.gradcam`` on the model's own preprocessing of the image, then
mapped back onto the input's pixel grid (downscaled to at most 1024 px a side), so the overlay matches the
input image and the localization
figures (nucleus and artefact masses, from the same functions the promotion gate's figures come from)
refer to the image the client sent.
"""

from __future__ import annotations

import base64

import cv2
import numpy as np
from numpy.lib.array_utils import byte_bounds

from pipelines.model.cell_crop import cell_square
from pipelines.model.preprocess import CELL_CROP_KEY, DEFAULT_ROI_THRESHOLD, roi_crop
from pipelines.model.segmentation import foreground_mask, leukocyte_mask, nucleus_mask
from pipelines.trust.gradcam import gradcam, heat_overlay
from pipelines.trust.localization import flat_metrics, localization_report
from serving.model import ServedModel

EXPLAIN_MAX_SIDE = 1024  # overlays of larger uploads are returned downscaled (width/height say to what)


def roi_box(rgb: np.ndarray, preprocessing: dict) -> tuple[int, int, int, int]:
    """(y, x, h, w) of the region the model saw: the ROI crop of ``preprocess`` (whole image without it), then
    its cell-centred square when the model crops to the cell (which may reach past the image: mirrored there).

    ``preprocess.roi_crop`` returns a slice (a view) of its input, so the view's offset in memory is
    exactly where the crop starts; this reuses the one ROI function instead of re-deriving its box.
    """
    y, x, h, w = 0, 0, rgb.shape[0], rgb.shape[1]
    crop = rgb
    if preprocessing.get("roi_crop"):
        rgb = np.ascontiguousarray(rgb)
        crop = roi_crop(rgb, int(preprocessing.get("roi_threshold", DEFAULT_ROI_THRESHOLD)))
        offset = byte_bounds(crop)[0] - byte_bounds(rgb)[0]
        y, rest = divmod(offset, rgb.strides[0])
        y, x, h, w = int(y), int(rest // rgb.strides[1]), crop.shape[0], crop.shape[1]
    square = cell_square(crop, float(preprocessing[CELL_CROP_KEY])) if preprocessing.get(CELL_CROP_KEY) else None
    if square is None:
        return y, x, h, w
    left, top, side = square
    return y + top, x + left, side, side


def heatmap_on_input(heat: np.ndarray, rgb: np.ndarray, preprocessing: dict) -> np.ndarray:
    """The model-input heatmap mapped back onto the input image's pixel grid (0 outside the region it saw)."""
    y, x, h, w = roi_box(rgb, preprocessing)
    on_input = np.zeros(rgb.shape[:2], dtype=np.float32)
    resized = np.clip(cv2.resize(heat.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR), 0, None)
    top, left = max(0, y), max(0, x)
    bottom, right = min(rgb.shape[0], y + h), min(rgb.shape[1], x + w)
    on_input[top:bottom, left:right] = resized[top - y : bottom - y, left - x : right - x]
    return on_input


def localization_figures(rgb: np.ndarray, heat: np.ndarray) -> dict[str, float]:
    """Nucleus / cell / background / corner masses, area shares and enrichments, pointing game, rank accuracy."""
    nuclei, foreground = nucleus_mask(rgb), foreground_mask(rgb)
    report = localization_report(heat, nuclei, foreground, cell_mask=leukocyte_mask(rgb, nuclei, foreground))
    return flat_metrics(report, "")


def png_base64(rgb: np.ndarray) -> str:
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError(f"PNG encoding of a {rgb.shape} overlay failed")
    return base64.b64encode(encoded.tobytes()).decode("ascii")


def explain_image(served: ServedModel, rgb: np.ndarray, class_index: int) -> dict:
    """Grad-CAM of ``class_index`` for one image: overlay PNG (base64) of the input size + localization."""
    model = served.model
    batch = model.batch([rgb])
    with served.lock:
        heat = gradcam(model, model.gradcam_layer, batch, target=class_index)[0]
    on_input = heatmap_on_input(heat, rgb, model.preprocessing)
    view, on_view = _bounded(rgb), _bounded(on_input)
    return {
        "method": "gradcam",
        "target_class": model.classes[class_index],
        "overlay_png_base64": png_base64(heat_overlay(view, on_view)),
        "width": view.shape[1],
        "height": view.shape[0],
        "input_width": rgb.shape[1],
        "input_height": rgb.shape[0],
        "localization": localization_figures(view, on_view),
    }


def _bounded(image: np.ndarray) -> np.ndarray:
    """The image at most EXPLAIN_MAX_SIDE px a side: overlays and masks of a 40 MP upload would take GBs
    (the heatmap itself is only as fine as the model's feature map)."""
    scale = EXPLAIN_MAX_SIDE / max(image.shape[:2])
    if scale >= 1:
        return image
    size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)
