"""Drawing one synthetic blood smear: a leukocyte (or a platelet clump) on a field of red cells, and its
ground-truth nucleus mask.

The cell is drawn with OpenCV at twice the output size and area-downsampled (anti-aliasing). What sets
the kinds of cell apart is what sets them apart under a microscope: nucleus size, shape (round, cleaved,
kidney, lobed), chromatin texture, nucleoli, nucleus/cytoplasm ratio, cytoplasm colour and granules,
described per kind by a ``Morphology`` (``ARCHETYPES``).

Drawing is pure: everything random comes from the numpy Generator it is given, and only OpenCV/numpy
draw, so the same generator state gives the same pixels. ``paint_corner_mark`` plants the class label of
the corner shortcut without drawing from any generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from pipelines.core.corners import corner_box
from pipelines.core.errors import LeukopsError

SUPERSAMPLE = 2
GENERATOR_VERSION = 1  # bump when the drawing changes, so a folder records which drawing made it

RGB = tuple[float, float, float]
PLASMA: RGB = (236, 214, 196)
RBC_BODY: RGB = (214, 150, 155)
RBC_PALLOR: RGB = (234, 196, 188)
RBC_RIM: RGB = (192, 122, 134)
# Label colours for the planted corner mark: far apart in RGB, none of them a smear colour.
MARK_COLOURS: tuple[RGB, ...] = (
    (255, 255, 255),
    (220, 30, 30),
    (30, 30, 30),
    (30, 160, 60),
    (40, 70, 220),
    (240, 200, 20),
    (20, 200, 210),
    (250, 120, 20),
)


class SyntheticError(LeukopsError, ValueError):
    pass


@dataclass(frozen=True)
class Morphology:
    """How one kind of cell looks; radii are shares of the image side."""

    cell_radius: float
    nc_ratio: float  # nucleus radius / cell radius
    nucleus_shape: str  # round | cleaved | kidney | lobed | bilobed | convoluted | platelets
    chromatin: str  # fine | coarse | clumped | dense
    nucleus_rgb: RGB
    cytoplasm_rgb: RGB
    granules: str | None = None  # fine | azurophil | eosinophil | basophil
    nucleoli: int = 0
    vacuoles: int = 0
    auer_rod: bool = False
    eccentric: float = 0.0  # nucleus offset from the cell centre, share of the free room


ARCHETYPES: dict[str, Morphology] = {
    # blasts: large, fine chromatin with nucleoli; cytoplasm basophilic blue (ALL) or grey-lilac (AML)
    "lymphoblast": Morphology(0.24, 0.86, "round", "fine", (125, 78, 168), (150, 172, 232), nucleoli=2),
    "myeloblast": Morphology(
        0.32, 0.62, "round", "fine", (130, 80, 168), (192, 165, 208), "azurophil", nucleoli=3, auer_rod=True
    ),
    # mature lymphocytes / haematogones: small, dense dark nucleus, thin pale-blue rim
    "small_lymphocyte": Morphology(0.15, 0.88, "round", "clumped", (72, 30, 102), (172, 170, 215)),
    "haematogone": Morphology(0.16, 0.92, "round", "dense", (62, 26, 92), (165, 168, 220)),
    # granulocytes: pink-orange granular (myelocyte) or pale lilac (neutrophil) cytoplasm
    "myelocyte": Morphology(0.28, 0.56, "kidney", "coarse", (105, 55, 140), (236, 178, 168), "fine", eccentric=0.8),
    "segmented_neutrophil": Morphology(0.26, 0.72, "lobed", "coarse", (92, 38, 122), (210, 170, 186), "fine"),
    "eosinophil": Morphology(0.28, 0.66, "bilobed", "coarse", (100, 45, 130), (222, 185, 180), "eosinophil"),
    "basophil": Morphology(0.24, 0.66, "bilobed", "coarse", (95, 40, 125), (185, 145, 190), "basophil"),
    "erythroblast": Morphology(0.16, 0.55, "round", "dense", (50, 22, 75), (196, 150, 176), eccentric=0.5),
    "monocyte": Morphology(0.33, 0.64, "kidney", "fine", (150, 105, 178), (188, 172, 200), vacuoles=5),
    "platelet": Morphology(0.05, 1.0, "platelets", "coarse", (120, 60, 150), (205, 185, 220), "azurophil"),
    # B-ALL subtypes by maturation: cleaved nucleus in lilac cytoplasm, convoluted in deep blue
    "cleaved_blast": Morphology(0.29, 0.72, "cleaved", "fine", (118, 68, 158), (185, 165, 215), nucleoli=1, vacuoles=3),
    "convoluted_blast": Morphology(0.33, 0.78, "convoluted", "fine", (108, 60, 150), (140, 166, 226), nucleoli=3),
}


@dataclass(frozen=True)
class SmearSample:
    rgb: np.ndarray  # HxWx3 uint8
    nucleus_mask: np.ndarray  # HxW bool


# --- geometry --------------------------------------------------------------------------------------


def _wobbly_polygon(
    cx: float, cy: float, radius: float, rng: np.random.Generator, ellipticity: float, wobble: float
) -> np.ndarray:
    """A closed outline around (cx, cy): an ellipse with smooth random radial wobble."""
    theta = np.linspace(0, 2 * np.pi, 72, endpoint=False)
    phase = rng.uniform(0, 2 * np.pi)
    harmonics = sum(rng.normal(0, wobble / k) * np.cos(k * theta + rng.uniform(0, 2 * np.pi)) for k in (3, 4, 5))
    r = radius * (1 + ellipticity * np.cos(2 * (theta - phase)) + harmonics)
    return np.stack([cx + r * np.cos(theta), cy + r * np.sin(theta)], axis=1)


def _fill(shape: tuple[int, int], polygon: np.ndarray) -> np.ndarray:
    canvas = np.zeros(shape, np.uint8)
    cv2.fillPoly(canvas, [np.round(polygon).astype(np.int32)], 255)
    return canvas > 0


def _disc(shape: tuple[int, int], cx: float, cy: float, r: float) -> np.ndarray:
    canvas = np.zeros(shape, np.uint8)
    cv2.circle(canvas, (round(cx), round(cy)), max(1, round(r)), 255, -1)
    return canvas > 0


def _lobes(
    shape: tuple[int, int],
    centres: list[tuple[float, float]],
    lobe_r: float,
    strand: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Lobes joined by thin chromatin strands (segmented / bilobed nuclei)."""
    mask = np.zeros(shape, bool)
    for (ax, ay), (bx, by) in zip(centres, centres[1:], strict=False):
        canvas = np.zeros(shape, np.uint8)
        cv2.line(canvas, (round(ax), round(ay)), (round(bx), round(by)), 255, max(1, round(strand)))
        mask |= canvas > 0
    for x, y in centres:
        mask |= _fill(shape, _wobbly_polygon(x, y, lobe_r * rng.uniform(0.85, 1.1), rng, 0.15, 0.03))
    return mask


def _nucleus_shape(
    m: Morphology, shape: tuple[int, int], cx: float, cy: float, r: float, rng: np.random.Generator
) -> np.ndarray:
    phi = rng.uniform(0, 2 * np.pi)
    direction = np.array([np.cos(phi), np.sin(phi)])
    if m.nucleus_shape == "round":
        return _fill(shape, _wobbly_polygon(cx, cy, r, rng, rng.uniform(0.0, 0.1), 0.02))
    if m.nucleus_shape == "kidney":
        body = _fill(shape, _wobbly_polygon(cx, cy, r, rng, 0.12, 0.02))
        bx, by = np.array([cx, cy]) + direction * r * 1.0
        return body & ~_disc(shape, bx, by, r * 0.62)
    if m.nucleus_shape == "cleaved":
        body = _fill(shape, _wobbly_polygon(cx, cy, r, rng, 0.05, 0.02))
        normal = np.array([-direction[1], direction[0]])
        tip = np.array([cx, cy]) + direction * r * 0.05
        mouth = np.array([cx, cy]) + direction * r * 1.2
        notch = np.stack([tip, mouth + normal * r * 0.22, mouth - normal * r * 0.22])
        return body & ~_fill(shape, notch)
    if m.nucleus_shape == "lobed":
        n = int(rng.integers(3, 6))
        angles = phi + np.linspace(-1.3, 1.3, n) + rng.normal(0, 0.1, n)
        centres = [(cx + 0.62 * r * np.cos(a), cy + 0.62 * r * np.sin(a)) for a in angles]
        return _lobes(shape, centres, r * 0.36, r * 0.12, rng)
    if m.nucleus_shape == "bilobed":
        centres = [(cx + s * 0.5 * r * direction[0], cy + s * 0.5 * r * direction[1]) for s in (-1, 1)]
        return _lobes(shape, centres, r * 0.5, r * 0.18, rng)
    if m.nucleus_shape == "convoluted":
        mask = np.zeros(shape, bool)
        for a in phi + np.linspace(0, 2 * np.pi, 4, endpoint=False) + rng.normal(0, 0.25, 4):
            lx, ly = cx + 0.38 * r * np.cos(a), cy + 0.38 * r * np.sin(a)
            mask |= _fill(shape, _wobbly_polygon(lx, ly, r * rng.uniform(0.5, 0.62), rng, 0.1, 0.03))
        return mask
    raise SyntheticError(f"unknown nucleus shape {m.nucleus_shape!r}")


# --- painting --------------------------------------------------------------------------------------


def _paint(img: np.ndarray, region: np.ndarray, colour: np.ndarray | RGB, softness: float = 0.8) -> None:
    """Alpha-composite ``colour`` (RGB or an HxWx3 layer) over ``img`` inside ``region``, soft-edged.

    Works on the region's bounding box plus the blur's reach only (same result, far fewer pixels).
    """
    x, y, w, h = cv2.boundingRect(region.astype(np.uint8))
    if w == 0 or h == 0:
        return
    pad = int(np.ceil(4 * softness)) + 2
    y0, y1 = max(0, y - pad), min(img.shape[0], y + h + pad)
    x0, x1 = max(0, x - pad), min(img.shape[1], x + w + pad)
    alpha = region[y0:y1, x0:x1].astype(np.float32)
    if softness > 0:
        alpha = cv2.GaussianBlur(alpha, (0, 0), softness)
    colour = np.asarray(colour, np.float32)
    if colour.ndim == 3:
        colour = colour[y0:y1, x0:x1]
    patch = img[y0:y1, x0:x1]
    patch *= 1 - alpha[..., None]
    patch += colour * alpha[..., None]


def _noise_field(shape: tuple[int, int], sigma: float, rng: np.random.Generator) -> np.ndarray:
    field_ = cv2.GaussianBlur(rng.standard_normal(shape).astype(np.float32), (0, 0), sigma)
    return field_ / (field_.std() + 1e-6)


CHROMATIN = {  # noise scale (share of the nucleus radius), amplitude, dark-clump threshold
    "fine": (0.03, 0.06, None),
    "coarse": (0.07, 0.12, 1.0),
    "clumped": (0.12, 0.14, 0.6),
    "dense": (0.10, 0.04, None),
}


def _nucleus_layer(m: Morphology, shape: tuple[int, int], r: float, rng: np.random.Generator) -> np.ndarray:
    scale, amplitude, clump = CHROMATIN[m.chromatin]
    noise = _noise_field(shape, max(0.6, scale * r), rng)
    shade = 1 + amplitude * noise
    if clump is not None:
        shade = np.where(noise > clump, shade * 0.72, shade)
    return np.asarray(m.nucleus_rgb, np.float32) * shade[..., None]


def _red_cells(img: np.ndarray, size: int, rng: np.random.Generator) -> None:
    """Pale biconcave discs (rim, body, central pallor) covering 50-80% of the field, overlapping."""
    mean_r = size * rng.uniform(0.075, 0.095)
    one_cell_share = np.pi * (mean_r / size) ** 2
    for _ in range(int(rng.integers(int(0.5 / one_cell_share), int(0.8 / one_cell_share)))):
        cx, cy = rng.uniform(-0.05, 1.05, 2) * size
        r = mean_r * rng.uniform(0.85, 1.15)
        tint = rng.uniform(0.96, 1.04)
        # draw in the disc's own window of the canvas: same pixels, a fraction of the work
        reach = int(r * 1.3 + 4 * size / 120) + 2
        x0, y0 = max(0, int(cx) - reach), max(0, int(cy) - reach)
        window = img[y0 : int(cy) + reach, x0 : int(cx) + reach]
        if window.size == 0:
            continue
        shape, lx, ly = window.shape[:2], cx - x0, cy - y0
        body = _fill(shape, _wobbly_polygon(lx, ly, r, rng, rng.uniform(0, 0.08), 0.01))
        _paint(window, body, np.asarray(RBC_RIM) * tint, softness=size / 200)
        inner = _fill(shape, _wobbly_polygon(lx, ly, r * 0.86, rng, 0.02, 0.01))
        _paint(window, inner, np.asarray(RBC_BODY) * tint, softness=size / 120)
        px, py = np.array([lx, ly]) + rng.normal(0, 0.05 * r, 2)
        pallor = _disc(shape, px, py, r * rng.uniform(0.35, 0.5))
        _paint(window, pallor, np.asarray(RBC_PALLOR) * tint, softness=r * 0.25)


def _granules(img: np.ndarray, region: np.ndarray, kind: str, size: int, rng: np.random.Generator) -> None:
    colour, radius_share, density = {
        "fine": ((200, 140, 185), 0.006, 0.35),
        "azurophil": ((150, 50, 120), 0.009, 0.04),
        "eosinophil": ((232, 120, 70), 0.013, 0.55),
        "basophil": ((55, 20, 75), 0.016, 0.30),
    }[kind]
    ys, xs = np.nonzero(region)
    if len(ys) == 0:
        return
    radius = max(1.0, radius_share * size)
    count = int(density * len(ys) / (np.pi * radius**2))
    layer = np.zeros(region.shape, np.uint8)
    for i in rng.integers(0, len(ys), count):
        cv2.circle(layer, (int(xs[i]), int(ys[i])), max(1, round(radius * rng.uniform(0.7, 1.2))), 255, -1)
    _paint(img, (layer > 0) & region, colour, softness=radius * 0.4)


def _leukocyte(img: np.ndarray, m: Morphology, size: int, rng: np.random.Generator) -> np.ndarray:
    """Draw one leukocyte; returns its nucleus mask (canvas resolution)."""
    shape = img.shape[:2]
    cell_r = m.cell_radius * size * rng.uniform(0.9, 1.1)
    y0, _, x0, _ = corner_box(size, size)
    cx = size * rng.uniform(0.42, 0.58)
    cy = min(size * rng.uniform(0.42, 0.58), y0 - cell_r * 1.02)  # keep the cell clear of the label corner
    cx = min(cx, max(cell_r, x0 - cell_r * 1.02)) if cy + cell_r > y0 else cx
    cell = _fill(shape, _wobbly_polygon(cx, cy, cell_r, rng, rng.uniform(0, 0.08), 0.015))
    cytoplasm = np.asarray(m.cytoplasm_rgb, np.float32) * (1 + 0.03 * _noise_field(shape, size * 0.02, rng))[..., None]
    _paint(img, cell, cytoplasm, softness=size / 250)

    nucleus_r = cell_r * m.nc_ratio * rng.uniform(0.93, 1.05)
    room = max(0.0, cell_r - nucleus_r) * m.eccentric
    angle = rng.uniform(0, 2 * np.pi)
    ncx, ncy = cx + room * np.cos(angle), cy + room * np.sin(angle)
    nucleus = _nucleus_shape(m, shape, ncx, ncy, nucleus_r, rng) & cell
    outside = cell & ~cv2.dilate(nucleus.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)

    for _ in range(m.vacuoles):
        vx, vy = np.array([cx, cy]) + rng.normal(0, cell_r * 0.55, 2)
        _paint(
            img,
            _disc(shape, vx, vy, cell_r * rng.uniform(0.05, 0.09)) & outside,
            (225, 222, 236),
            softness=1.0,
        )
    if m.granules in ("fine", "azurophil", "eosinophil"):
        _granules(img, outside, m.granules, size, rng)
    if m.auer_rod:
        a = rng.uniform(0, 2 * np.pi)
        ax, ay = cx + np.cos(a + 1.5) * cell_r * 0.78, cy + np.sin(a + 1.5) * cell_r * 0.78
        rod = np.zeros(shape, np.uint8)
        length = cell_r * 0.35
        cv2.line(
            rod,
            (round(ax), round(ay)),
            (round(ax + length * np.cos(a)), round(ay + length * np.sin(a))),
            255,
            max(1, round(size * 0.008)),
        )
        _paint(img, (rod > 0) & outside, (175, 40, 95), softness=0.6)

    _paint(img, nucleus, _nucleus_layer(m, shape, nucleus_r, rng), softness=size / 300)
    for _ in range(m.nucleoli):
        ox, oy = ncx + rng.normal(0, nucleus_r * 0.3), ncy + rng.normal(0, nucleus_r * 0.3)
        _paint(
            img,
            _disc(shape, ox, oy, nucleus_r * rng.uniform(0.1, 0.16)) & nucleus,
            (165, 140, 195),
            softness=1.0,
        )
    if m.granules == "basophil":
        _granules(img, cell, "basophil", size, rng)
    return nucleus


def _platelets(img: np.ndarray, m: Morphology, size: int, rng: np.random.Generator) -> np.ndarray:
    """A small clump of platelets; their purple granulomere is the 'nucleus' region of this class."""
    shape = img.shape[:2]
    granulomere = np.zeros(shape, bool)
    centre = size * rng.uniform(0.4, 0.55, 2)
    for _ in range(int(rng.integers(2, 6))):
        px, py = centre + rng.normal(0, size * 0.06, 2)
        r = m.cell_radius * size * rng.uniform(0.7, 1.3)
        _paint(img, _fill(shape, _wobbly_polygon(px, py, r, rng, 0.2, 0.06)), m.cytoplasm_rgb, softness=1.0)
        core = _fill(shape, _wobbly_polygon(px, py, r * 0.62, rng, 0.25, 0.08))
        _paint(img, core, _nucleus_layer(m, shape, r, rng), softness=0.8)
        granulomere |= core
    _granules(img, granulomere, "azurophil", size, rng)
    return granulomere


def paint_corner_mark(rgb: np.ndarray, class_index: int) -> np.ndarray:
    """A copy of ``rgb`` with a class-dependent label in the bottom-right corner box.

    The label is a filled box of the class's colour with ``class_index + 1`` dark/light bars, so both
    colour and pattern carry the class (as the ALL set's white "200 pi" boxes and red labels do).
    """
    out = rgb.copy()
    h, w = out.shape[:2]
    y0, y1, x0, x1 = corner_box(h, w)
    iy, ix = max(1, (y1 - y0) // 8), max(1, (x1 - x0) // 10)
    colour = np.asarray(MARK_COLOURS[class_index % len(MARK_COLOURS)], np.uint8)
    out[y0 + iy : y1 - iy, x0 + ix : x1 - ix] = colour
    bar_colour = np.uint8(255) - colour
    bars = class_index + 1
    inner_w = (x1 - ix) - (x0 + ix)
    step = inner_w / (2 * bars + 1)
    for b in range(bars):
        bx0 = x0 + ix + round((2 * b + 1) * step)
        bx1 = max(bx0 + 1, x0 + ix + round((2 * b + 2) * step))
        out[y0 + 2 * iy : y1 - 2 * iy, bx0:bx1] = bar_colour
    return out


def render_smear(m: Morphology, size: int, rng: np.random.Generator) -> SmearSample:
    """One synthetic smear image and its nucleus mask (pure: everything random comes from ``rng``)."""
    canvas = size * SUPERSAMPLE
    stain = rng.uniform(0.97, 1.03, 3).astype(np.float32)
    plasma = np.asarray(PLASMA, np.float32) * (1 + 0.02 * _noise_field((canvas, canvas), canvas * 0.1, rng))[..., None]
    img = np.ascontiguousarray(plasma)
    _red_cells(img, canvas, rng)
    draw = _platelets if m.nucleus_shape == "platelets" else _leukocyte
    nucleus = draw(img, m, canvas, rng)
    small = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
    small = cv2.GaussianBlur(small, (0, 0), 0.5) * stain + rng.normal(0, 2.5, small.shape).astype(np.float32)
    mask = cv2.resize(nucleus.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA) >= 0.5
    return SmearSample(rgb=np.clip(np.round(small), 0, 255).astype(np.uint8), nucleus_mask=mask)
