"""Image-corner geometry shared by preprocessing (masks the label box), localization and the shortcut test
(measure it) and the synthetic smears (paint it), so each names the same region."""

from __future__ import annotations

# The scale-bar label of the ALL (Taleqani) set covers about 60x40 px of its 224x224 images.
CORNER_WIDTH_SHARE = 60 / 224
CORNER_HEIGHT_SHARE = 40 / 224
LABEL_CORNER = "bottom_right"

Box = tuple[int, int, int, int]  # y0, y1, x0, x1 (half-open, like numpy slices)


def corner_box(h: int, w: int) -> Box:
    """The bottom-right label box (y0, y1, x0, x1) of an h x w image: the planted/masked shortcut area."""
    return corner_boxes(h, w)[LABEL_CORNER]


def corner_boxes(h: int, w: int) -> dict[str, Box]:
    """All four image corners as boxes of the label-box size, keyed top_left ... bottom_right."""
    bh = max(1, round(h * CORNER_HEIGHT_SHARE))
    bw = max(1, round(w * CORNER_WIDTH_SHARE))
    return {
        "top_left": (0, bh, 0, bw),
        "top_right": (0, bh, w - bw, w),
        "bottom_left": (h - bh, h, 0, bw),
        "bottom_right": (h - bh, h, w - bw, w),
    }
