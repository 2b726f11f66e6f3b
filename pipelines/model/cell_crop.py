"""Cell-centred crop: the same cell fills the same share of the model's input, whatever the lab's magnification.

Labs digitise smears at different magnifications and crop sizes: a PBC (CellaVision DM96) crop shows a
leukocyte about a quarter of the frame wide, a CellaVision-blog crop about half. A network trained on one
lab learns sizes and textures at that scale and misreads the other (lymphocytes read as monocytes). Cropping
a square around the cell's nucleus, ``scale`` times the nucleus extent, and resizing it to the input size
maps every lab onto one scale, where the cell's own morphology (nucleus shape, N:C ratio, granules) is
what is left to learn. The nucleus comes from the stain-aware segmenter (`model.segmentation`, Dice 0.97
on expert masks), run on a small copy for speed: the one nearest the image centre with its lobes
(`central_nucleus`; single-cell crops are centred on their cell). An image without
a nucleus (a red-cell field, a blank) is returned unchanged, so the crop never fails an image.
"""

from __future__ import annotations

import cv2
import numpy as np

from pipelines.model.segmentation import central_nucleus, nucleus_mask

SEGMENT_SIDE = 160  # px: the nucleus is found on a copy this size (the crop box is scaled back)


def nucleus_box(rgb: np.ndarray) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1) of the nucleus nearest the image centre, in ``rgb``'s pixels; None without one."""
    height, width = rgb.shape[:2]
    factor = SEGMENT_SIDE / max(height, width)
    small = cv2.resize(
        rgb, (max(16, round(width * factor)), max(16, round(height * factor))), interpolation=cv2.INTER_AREA
    )
    ys, xs = np.nonzero(central_nucleus(nucleus_mask(small)))
    if len(ys) == 0:
        return None
    sy, sx = height / small.shape[0], width / small.shape[1]
    return int(xs.min() * sx), int(ys.min() * sy), int(np.ceil((xs.max() + 1) * sx)), int(np.ceil((ys.max() + 1) * sy))


def cell_square(rgb: np.ndarray, scale: float) -> tuple[int, int, int] | None:
    """(left, top, side) of the square around the central nucleus, ``scale`` times its larger extent, in
    ``rgb``'s pixels (it may reach past the image); None when no nucleus is found."""
    box = nucleus_box(rgb)
    if box is None:
        return None
    x0, y0, x1, y1 = box
    side = max(2, round(scale * max(x1 - x0, y1 - y0)))
    return round((x0 + x1 - side) / 2), round((y0 + y1 - side) / 2), side


def cell_crop(rgb: np.ndarray, scale: float) -> np.ndarray:
    """The `cell_square` of ``rgb`` (mirrored where it reaches past the image); ``rgb`` itself without a nucleus."""
    square = cell_square(rgb, scale)
    if square is None:
        return rgb
    left, top, side = square
    height, width = rgb.shape[:2]
    pad = max(0, -left, -top, left + side - width, top + side - height)
    if pad:
        rgb = cv2.copyMakeBorder(rgb, pad, pad, pad, pad, cv2.BORDER_REFLECT_101)
    return rgb[top + pad : top + pad + side, left + pad : left + pad + side]
