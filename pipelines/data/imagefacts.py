"""Safe image decoding and per-image facts, shared by ingest, drift monitoring and serving.

``decode_image`` refuses anything that is not a plain raster image, and refuses decompression bombs
by reading the header's dimensions before decoding any pixel. ``image_facts`` computes the numbers
that validation checks and drift monitoring compares (same function everywhere, so serving logs and
ingest manifests are comparable).
"""

from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipelines.core.errors import LeukopsError

DEFAULT_MAX_PIXELS = 40_000_000
# Plain raster formats only: Pillow's other openers (EPS via Ghostscript, PSD, FITS, ...) are not for smears.
RASTER_FORMATS = ("JPEG", "PNG", "BMP", "TIFF", "WEBP", "GIF")
DECODE_REASONS = (
    "empty",
    "not_an_image",
    "corrupt",
    "truncated",
    "too_many_pixels",
    "unsupported_mode",
    "decoder_error",
)
# What Pillow's own fuzzers expect from hostile files besides OSError/SyntaxError/ValueError (a parser
# that trusts a size, an offset or a tag type from the file): a decode error, never a crashed batch.
HOSTILE_FILE_ERRORS = (
    TypeError,
    struct.error,
    EOFError,
    IndexError,
    KeyError,
    ZeroDivisionError,
    OverflowError,
    NotImplementedError,
    MemoryError,
)
FACT_COLUMNS = (
    "width",
    "height",
    "channels",
    "brightness",
    "contrast",
    "blur_var",
    "hue_mean",
    "saturation_mean",
    "red_mean",
    "green_mean",
    "blue_mean",
    "purple_share",
    "hematoxylin_od",
    "eosin_od",
)
# Optical-density colour-deconvolution vectors for haematoxylin and eosin (Ruifrok & Johnston 2001).
_HE_STAINS = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_HE_INVERSE = np.linalg.inv(_HE_STAINS / np.linalg.norm(_HE_STAINS, axis=1, keepdims=True))


class ImageDecodeError(LeukopsError, ValueError):
    """The bytes are not a usable image; ``reason`` is a short machine-readable code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# The side lengths an image may have: the ingest suite's `size_out_of_range` rule
# (expectations/suites/image_batch.json, checked equal by a test); serving applies the same.
IMAGE_SIDE_RANGE = (64, 8192)
_CHANNEL_NOTES = {1: "greyscale (1 channel)", 2: "greyscale + alpha (2 channels)", 4: "RGBA (4 channels)"}


@dataclass(frozen=True)
class DecodedImage:
    rgb: np.ndarray  # HxWx3 uint8, RGB
    format: str  # e.g. JPEG, PNG, BMP
    source_channels: int  # channels as stored (1 grey, 3 RGB, 4 RGBA)

    @property
    def conversion_notes(self) -> list[str]:
        """What decoding changed, as a person reads it (ingest records ``source_channels``; serving says so)."""
        if self.source_channels in _CHANNEL_NOTES:
            return [f"converted from {_CHANNEL_NOTES[self.source_channels]} to RGB"]
        return []

    def side_error(self) -> str | None:
        """Why the image's size breaks `IMAGE_SIDE_RANGE`, or None."""
        height, width = self.rgb.shape[:2]
        low, high = IMAGE_SIDE_RANGE
        if min(height, width) < low or max(height, width) > high:
            return f"{width}x{height} px is outside {low}..{high} px a side"
        return None


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Decode bytes to upright RGB uint8, refusing empty, non-image, truncated and oversized inputs.

    The EXIF orientation is applied here, in the one decoder ingest, training, explanations and
    serving share, so a phone photo rotated by its tag is the same image to all of them.
    """
    if not data:
        raise ImageDecodeError("empty", "0-byte file")
    image = _open(data)
    width, height = image.size
    if width * height > max_pixels:
        raise ImageDecodeError("too_many_pixels", f"{width}x{height} exceeds the {max_pixels}-pixel limit")
    fmt, mode = image.format or "UNKNOWN", image.mode
    channels = {"1": 1, "L": 1, "P": 3, "RGB": 3, "RGBA": 4, "LA": 2, "CMYK": 4}
    return DecodedImage(rgb=_upright_rgb8(image), format=fmt, source_channels=channels.get(mode, len(image.getbands())))


def _open(data: bytes) -> Image.Image:
    """The image with its header read, no pixel decoded yet (so a bomb is refused from its size)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data), formats=RASTER_FORMATS)
    except UnidentifiedImageError as err:
        raise ImageDecodeError("not_an_image", f"not a recognised raster image ({', '.join(RASTER_FORMATS)})") from err
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageDecodeError("too_many_pixels", str(err)) from err
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageDecodeError("corrupt", f"unreadable header: {err}") from err
    except HOSTILE_FILE_ERRORS as err:
        raise ImageDecodeError("decoder_error", f"header: {type(err).__name__}: {err}") from err


def _upright_rgb8(image: Image.Image) -> np.ndarray:
    """Decode the pixels, turn them by the EXIF orientation and convert them, all inside one guard: each
    step parses bytes from the file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()  # PIL raises on truncated data, where OpenCV would return half-grey pixels
            ImageOps.exif_transpose(image, in_place=True)
            return _to_rgb8(image)
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageDecodeError("too_many_pixels", str(err)) from err
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageDecodeError("truncated", f"pixel data could not be decoded: {err}") from err
    except HOSTILE_FILE_ERRORS as err:
        raise ImageDecodeError("decoder_error", f"pixels: {type(err).__name__}: {err}") from err


def _to_rgb8(image: Image.Image) -> np.ndarray:
    """RGB uint8 pixels. 16-bit greyscale (microscopy TIFF/PNG) is scaled to 8 bits, where PIL's
    ``convert("RGB")`` would clip it to white; 32-bit integer and float images are refused."""
    if image.mode.startswith("I;16"):
        grey = (np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if image.mode in ("I", "F"):
        raise ImageDecodeError("unsupported_mode", f"{image.mode!r} (32-bit integer/float) pixels are not supported")
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def greyscale(rgb: np.ndarray) -> np.ndarray:
    """HxW uint8 luma of an RGB image; callers that need it twice pass it to the functions below."""
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)


def perceptual_hash(rgb: np.ndarray, grey: np.ndarray | None = None) -> str:
    """64-bit DCT perceptual hash (pHash) as 16 hex digits: robust to re-encoding and small resizes."""
    grey = (greyscale(rgb) if grey is None else grey).astype(np.float32)
    small = cv2.resize(grey, (32, 32), interpolation=cv2.INTER_AREA)
    low = cv2.dct(small)[:8, :8].flatten()
    bits = low > np.median(low[1:])
    return f"{int(''.join('1' if b else '0' for b in bits), 2):016x}"


# Per-level lookup tables: facts reduce to per-channel histograms, which keeps them ~0.3 ms per image.
_OD_OF_LEVEL = -np.log(np.clip(np.arange(256, dtype=np.float64), 1, 255) / 255.0)
MIN_HUE_SATURATION = 20  # HSV saturation (0-255) below which a pixel has no usable hue
_HUE_ANGLE = np.arange(180) * (2 * np.pi / 180.0)


def _channel_histograms(image: np.ndarray) -> np.ndarray:
    """3x256 histogram of an HxWx3 uint8 image."""
    return np.stack([cv2.calcHist([image], [c], None, [256], [0, 256]).ravel() for c in range(3)])


def _laplacian_variance(grey: np.ndarray) -> float:
    """Variance of the 3x3 Laplacian (focus measure). Its values are small integers, exact in int16, and
    OpenCV's double-precision meanStdDev gives numpy's ``var()`` (to 1e-15) at a fifth of the cost."""
    std = cv2.meanStdDev(cv2.Laplacian(grey, cv2.CV_16S))[1][0, 0]
    return float(std * std)


def _stain_hue(hsv: np.ndarray) -> float:
    """Circular mean hue of the coloured pixels, in degrees within (-180, 180].

    Grey plasma and white background (saturation < MIN_HUE_SATURATION) have no meaningful hue (OpenCV
    calls it 0, red), so they are left out; the range is cut at cyan, far from every stain, so pinks just
    below and just above red stay neighbours (-14 and 8, not 346 and 8) for drift tests.
    """
    coloured = cv2.inRange(hsv, (0, MIN_HUE_SATURATION, 0), (180, 255, 255))
    hue_hist = cv2.calcHist([hsv], [0], coloured, [180], [0, 180]).ravel()  # hue is circular: histogram
    if not hue_hist.any():
        return 0.0
    return float(np.degrees(np.arctan2(hue_hist @ np.sin(_HUE_ANGLE), hue_hist @ np.cos(_HUE_ANGLE))))


def image_facts(rgb: np.ndarray, source_channels: int = 3, grey: np.ndarray | None = None) -> dict[str, float]:
    """Scalar facts about one RGB image (names in FACT_COLUMNS).

    Means of per-pixel quantities come from channel histograms (the stain means are linear in the
    per-channel optical densities, so mean-then-deconvolve equals deconvolve-then-mean).
    """
    grey = greyscale(rgb) if grey is None else grey
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    n = float(grey.size)
    rgb_hist = _channel_histograms(rgb)
    rgb_means = rgb_hist @ np.arange(256) / n
    mean_od = rgb_hist @ _OD_OF_LEVEL / n
    stains = mean_od @ _HE_INVERSE
    hue_mean = _stain_hue(hsv)
    purple = cv2.countNonZero(cv2.inRange(hsv, (120, 40, 0), (165, 255, 255))) / n
    grey_mean, grey_std = cv2.meanStdDev(grey)
    return {
        "width": float(rgb.shape[1]),
        "height": float(rgb.shape[0]),
        "channels": float(source_channels),
        "brightness": float(grey_mean[0, 0]),
        "contrast": float(grey_std[0, 0]),
        "blur_var": _laplacian_variance(grey),
        "hue_mean": hue_mean,
        "saturation_mean": float(cv2.mean(hsv)[1]),
        "red_mean": float(rgb_means[0]),
        "green_mean": float(rgb_means[1]),
        "blue_mean": float(rgb_means[2]),
        "purple_share": float(purple),
        "hematoxylin_od": float(stains[0]),
        "eosin_od": float(stains[1]),
    }
