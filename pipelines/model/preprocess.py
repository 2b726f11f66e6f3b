"""Preprocessing as in the paper, described by one JSON-able dict that is saved with the model.

Per image: ROI crop (bounding box of the largest contour of the "not black" mask: drops black borders and
margins, a no-op without them) → optional bottom-right corner mask (the scale-bar label of the ALL set,
filled with the normalisation mean so it becomes 0 after normalising) → optional cell-centred crop
(``cell_crop``: a square around the central nucleus, that many times its extent, `pipelines.model.cell_crop`,
so every lab's magnification maps onto one scale) → resize to the model's input size with
its interpolation → optional stain normalisation (``stain_normalizer``: a `pipelines.model.stain`
normaliser fitted on the training split's reference images by `with_stain_normalizer`; after the resize,
where it costs ~3 ms an image instead of ~23 ms at 360 px; the corner mask is laid again after it so the
fill stays neutral) → normalise with its mean/std. Training adds flips and a PIL augmentation between the
resize and the normalisation (`build_transform`); inference uses `to_tensor_batch`. Both share
`prepare_image`, so a served model sees exactly what it was trained on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image
from timm.data.transforms import str_to_pil_interp

from pipelines.core.corners import CORNER_HEIGHT_SHARE, CORNER_WIDTH_SHARE
from pipelines.core.errors import LeukopsError
from pipelines.data.imagefacts import ImageDecodeError, decode_image
from pipelines.model.cell_crop import cell_crop
from pipelines.model.stain import StainError, StainNormalizer, fit_normalizer, normalize_stain, reference_sample

log = logging.getLogger(__name__)

PREPROCESSING_VERSION = 1
DEFAULT_ROI_THRESHOLD = 20  # grey level (0-255) under which a pixel counts as black border
# (height, width) fractions: the same box the localization metrics and the synthetic shortcut use
DEFAULT_CORNER_BOX = (CORNER_HEIGHT_SHARE, CORNER_WIDTH_SHARE)
MIN_ROI_AREA_FRACTION = 0.05  # a smaller "largest contour" is noise, not the field of view

REQUIRED_KEYS = ("input_size", "mean", "std", "interpolation", "roi_crop", "mask_corner", "corner_box")

CELL_CROP_KEY = "cell_crop"  # absent: no cell-centred crop (every model before it)
STAIN_KEY = "stain_normalizer"  # absent or None: no stain normalisation (every model before it)

PilTransform = Callable[[Image.Image], Image.Image]


class PreprocessError(LeukopsError, ValueError):
    pass


def preprocessing_from(
    data_config: dict[str, Any],
    *,
    roi_crop: bool = True,
    roi_threshold: int = DEFAULT_ROI_THRESHOLD,
    mask_corner: bool = False,
    corner_box: Sequence[float] = DEFAULT_CORNER_BOX,
    cell_crop: float = 0.0,
) -> dict[str, Any]:
    """The preprocessing dict for a model whose timm data config is `data_config` (see `Backbone`);
    ``cell_crop`` > 0: crop to the central cell, that many times its nucleus extent (`model.cell_crop`)."""
    try:
        channels, height, width = (int(v) for v in data_config["input_size"])
        mean = [float(v) for v in data_config["mean"]]
        std = [float(v) for v in data_config["std"]]
        interpolation = str(data_config.get("interpolation", "bilinear"))
    except (KeyError, TypeError, ValueError) as error:
        raise PreprocessError(f"data config {data_config!r} is not a timm data config ({error})") from None
    box = [float(v) for v in corner_box]
    if len(box) != 2 or not all(0 < v < 1 for v in box):
        raise PreprocessError(f"corner_box must be two fractions in (0, 1), got {list(corner_box)}")
    preprocessing = {
        "preprocessing_version": PREPROCESSING_VERSION,
        "input_size": [channels, height, width],
        "mean": mean,
        "std": std,
        "interpolation": interpolation,
        "roi_crop": bool(roi_crop),
        "roi_threshold": int(roi_threshold),
        "mask_corner": bool(mask_corner),
        "corner_box": box,
        "corner_fill": [round(255 * m) for m in mean],
    }
    if cell_crop:
        preprocessing[CELL_CROP_KEY] = float(cell_crop)
    _check(preprocessing)
    return preprocessing


def roi_crop(rgb: np.ndarray, threshold: int = DEFAULT_ROI_THRESHOLD) -> np.ndarray:
    """Crop to the bounding box of the largest non-black region; unchanged when there is no black border."""
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    mask = (grey > threshold).astype(np.uint8)
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return rgb
    largest = max(contours, key=cv2.contourArea)
    x, y, w, h = cv2.boundingRect(largest)
    if w * h < MIN_ROI_AREA_FRACTION * grey.size or (w, h) == (grey.shape[1], grey.shape[0]):
        return rgb
    return rgb[y : y + h, x : x + w]


def mask_corner(
    rgb: np.ndarray, box: Sequence[float] = DEFAULT_CORNER_BOX, fill: Sequence[int] = (124, 116, 104)
) -> np.ndarray:
    """A copy with the bottom-right `box` (height, width fractions) filled with the neutral colour `fill`."""
    height, width = rgb.shape[:2]
    box_h, box_w = max(1, round(box[0] * height)), max(1, round(box[1] * width))
    masked = rgb.copy()
    masked[height - box_h :, width - box_w :] = np.asarray(fill, dtype=rgb.dtype)
    return masked


def prepare_image(rgb: np.ndarray, preprocessing: dict[str, Any]) -> Image.Image:
    """ROI crop, corner mask and resize (no normalisation): the PIL image augmentations work on."""
    _check_rgb(rgb)
    if preprocessing["roi_crop"]:
        rgb = roi_crop(rgb, int(preprocessing.get("roi_threshold", DEFAULT_ROI_THRESHOLD)))
    if preprocessing["mask_corner"]:
        rgb = mask_corner(rgb, preprocessing["corner_box"], preprocessing.get("corner_fill", (124, 116, 104)))
    cropped_to_cell = bool(preprocessing.get(CELL_CROP_KEY))
    if cropped_to_cell:  # after the corner mask: the label box is a corner of the image, not of the crop
        rgb = cell_crop(rgb, float(preprocessing[CELL_CROP_KEY]))
    _, height, width = preprocessing["input_size"]
    image = Image.fromarray(np.ascontiguousarray(rgb))
    image = image.resize((width, height), str_to_pil_interp(preprocessing["interpolation"]))
    normalizer = stain_normalizer_of(preprocessing)
    if normalizer is None:
        return image
    normalised = normalize_stain(np.asarray(image), normalizer)
    if preprocessing["mask_corner"] and not cropped_to_cell:
        fill = preprocessing.get("corner_fill", (124, 116, 104))
        normalised = mask_corner(normalised, preprocessing["corner_box"], fill)
    return Image.fromarray(normalised)


def stain_normalizer_of(preprocessing: dict[str, Any]) -> StainNormalizer | None:
    """The stain normaliser a preprocessing dict carries, or None."""
    raw = preprocessing.get(STAIN_KEY)
    return StainNormalizer.from_dict(raw) if raw is not None else None


def with_stain_normalizer(
    preprocessing: dict[str, Any], method: str, paths: Sequence[Path], n_reference: int, seed: int
) -> dict[str, Any]:
    """``preprocessing`` plus the stain normaliser ``method`` fitted on a fixed sample (``n_reference``
    images drawn with ``seed``) of ``paths``, prepared as the model sees them (ROI crop, mask, resize);
    unchanged for ``none``. An undecodable reference file is skipped with a note naming it."""
    if method == "none":
        return preprocessing
    plain = {k: v for k, v in preprocessing.items() if k != STAIN_KEY}
    references = []
    for path in reference_sample(paths, n_reference, seed):
        try:
            references.append(np.asarray(prepare_image(decode_image(Path(path).read_bytes()).rgb, plain)))
        except (OSError, ImageDecodeError, PreprocessError) as error:
            log.warning("stain reference %s skipped: %s", path, error)
    return plain | {STAIN_KEY: fit_normalizer(method, references).to_dict()}


def normalise(image: Image.Image | np.ndarray, preprocessing: dict[str, Any]) -> torch.Tensor:
    """3×H×W float tensor: (pixel / 255 - mean) / std."""
    array = np.asarray(image, dtype=np.float32) / 255.0
    mean = np.asarray(preprocessing["mean"], np.float32)
    array = (array - mean) / np.asarray(preprocessing["std"], np.float32)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def to_tensor_batch(rgb_list: Sequence[np.ndarray], preprocessing: dict[str, Any]) -> torch.Tensor:
    """N×3×H×W normalised batch of RGB uint8 arrays, preprocessed as `preprocessing` says."""
    _check(preprocessing)
    if len(rgb_list) == 0:
        raise PreprocessError("to_tensor_batch: no images given")
    return torch.stack([normalise(prepare_image(rgb, preprocessing), preprocessing) for rgb in rgb_list])


class ImageTransform:
    """torchvision-style callable: RGB uint8 array (or PIL image) → normalised 3×H×W tensor.

    Training: random horizontal/vertical flips (orientation carries no class information in a smear) and
    then `augmentation` (a PIL → PIL callable, e.g. timm's RandAugment or AugMix) before normalising.
    Picklable, so DataLoader workers can use it.
    """

    def __init__(
        self, preprocessing: dict[str, Any], augmentation: PilTransform | None = None, *, train: bool = True
    ) -> None:
        _check(preprocessing)
        self.preprocessing = preprocessing
        self.augmentation = augmentation
        self.train = train

    def __call__(self, image: np.ndarray | Image.Image) -> torch.Tensor:
        rgb = np.asarray(image.convert("RGB")) if isinstance(image, Image.Image) else image
        return self.finish(self.prepare(rgb))

    def prepare(self, rgb: np.ndarray) -> Image.Image:
        """The deterministic part (`prepare_image`): what a dataset may compute once and keep."""
        return prepare_image(rgb, self.preprocessing)

    @property
    def prepared_bytes(self) -> int:
        """Bytes of one prepared image (RGB at the input size)."""
        _, height, width = self.preprocessing["input_size"]
        return 3 * int(height) * int(width)

    def finish(self, prepared: Image.Image) -> torch.Tensor:
        """The random part (flips, the augmentation, in training) and the normalisation."""
        if self.train:
            prepared = _random_flips(prepared)
            if self.augmentation is not None:
                prepared = self.augmentation(prepared)
        return normalise(prepared, self.preprocessing)

    def __repr__(self) -> str:
        return f"ImageTransform(train={self.train}, augmentation={self.augmentation!r})"


def build_transform(
    preprocessing: dict[str, Any], augmentation: PilTransform | None = None, *, train: bool = True
) -> ImageTransform:
    """The per-image transform for a Dataset: training (flips + `augmentation`) or evaluation."""
    return ImageTransform(preprocessing, augmentation, train=train)


def _random_flips(image: Image.Image) -> Image.Image:
    if torch.rand(()) < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if torch.rand(()) < 0.5:
        image = image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    return image


def _check(preprocessing: dict[str, Any]) -> None:
    if not isinstance(preprocessing, dict):
        raise PreprocessError(f"preprocessing must be a dict, got {type(preprocessing).__name__}")
    missing = [key for key in REQUIRED_KEYS if key not in preprocessing]
    if missing:
        raise PreprocessError(f"preprocessing dict lacks {missing}; it has {sorted(preprocessing)}")
    if len(preprocessing["input_size"]) != 3 or int(preprocessing["input_size"][0]) != 3:
        size = preprocessing["input_size"]
        raise PreprocessError(f"preprocessing input_size must be [3, H, W], got {size}")
    scale = preprocessing.get(CELL_CROP_KEY)
    if scale is not None and not (isinstance(scale, int | float) and 1 <= scale <= 10):
        raise PreprocessError(f"preprocessing {CELL_CROP_KEY} must be a scale from 1 to 10, got {scale!r}")
    try:
        stain_normalizer_of(preprocessing)
    except StainError as error:
        raise PreprocessError(f"preprocessing {STAIN_KEY}: {error}") from None


def _check_rgb(rgb: Any) -> None:
    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        is_array = isinstance(rgb, np.ndarray)
        described = f"{rgb.dtype} array of shape {rgb.shape}" if is_array else type(rgb).__name__
        raise PreprocessError(f"expected an RGB uint8 array of shape H×W×3, got {described}")
    if min(rgb.shape[:2]) < 2:
        raise PreprocessError(f"image of shape {rgb.shape} is too small to preprocess")
