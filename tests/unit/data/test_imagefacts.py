import io
import struct

import cv2
import numpy as np
import pytest
from PIL import Image

from pipelines.data.imagefacts import (
    DECODE_REASONS,
    FACT_COLUMNS,
    ImageDecodeError,
    decode_image,
    image_facts,
    perceptual_hash,
)
from pipelines.data.ledger import hamming_to_all, phash_ints


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg(rgb: np.ndarray, quality: int = 90) -> bytes:
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return data.tobytes()


@pytest.fixture
def smear() -> np.ndarray:
    rng = np.random.default_rng(0)
    rgb = np.full((64, 64, 3), (230, 200, 210), np.uint8)
    cv2.circle(rgb, (32, 32), 12, (120, 60, 160), -1)
    return np.clip(rgb + rng.normal(0, 4, rgb.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"just some text, not an image", "not_an_image"),
    ],
)
def test_decode_refuses_non_images(data, reason):
    with pytest.raises(ImageDecodeError) as err:
        decode_image(data)
    assert err.value.reason == reason


def test_decode_refuses_truncated_jpeg(smear):
    data = _jpeg(smear)
    with pytest.raises(ImageDecodeError) as err:
        decode_image(data[: len(data) // 2])
    assert err.value.reason in {"truncated", "corrupt"}


def test_decode_refuses_pixel_bomb_before_decoding(smear):
    with pytest.raises(ImageDecodeError) as err:
        decode_image(_png(np.zeros((200, 200, 3), np.uint8)), max_pixels=10_000)
    assert err.value.reason == "too_many_pixels"


def test_grey_and_rgba_decode_to_rgb_and_keep_channel_count(smear):
    grey = decode_image(_png(smear[..., 0]))
    rgba = decode_image(_png(np.dstack([smear, np.full(smear.shape[:2], 255, np.uint8)])))
    assert grey.rgb.shape == (64, 64, 3) and grey.source_channels == 1
    assert rgba.rgb.shape == (64, 64, 3) and rgba.source_channels == 4


def test_facts_are_complete_and_track_brightness(smear):
    facts = image_facts(smear)
    assert set(facts) == set(FACT_COLUMNS)
    brighter = image_facts(np.clip(smear.astype(int) + 40, 0, 255).astype(np.uint8))
    assert brighter["brightness"] > facts["brightness"] + 30
    assert 0 < facts["purple_share"] < 1


def test_phash_survives_reencoding_and_resize_but_not_other_images(shared_data):
    files = sorted((shared_data / "all_taleqani" / "Early").glob("*.jpg"))[:2]
    original = decode_image(files[0].read_bytes()).rgb
    reencoded = decode_image(_jpeg(original, quality=60)).rgb
    resized = cv2.resize(original, (200, 200), interpolation=cv2.INTER_AREA)
    other = decode_image(files[1].read_bytes()).rgb
    hashes = phash_ints([perceptual_hash(rgb) for rgb in (original, reencoded, resized, other)])
    reencoded_bits, resized_bits, other_bits = hamming_to_all(hashes[0], hashes[1:])
    assert reencoded_bits <= 4 and resized_bits <= 4 and other_bits > 12


def test_hue_ignores_white_background_and_keeps_pinks_either_side_of_red_close():
    def flat(rgb, white_share=0.0):
        image = np.zeros((64, 64, 3), np.uint8)
        image[:] = rgb
        image[: int(64 * white_share)] = 255
        return image

    pink = image_facts(flat((200, 60, 120)))["hue_mean"]
    assert image_facts(flat((200, 60, 120), white_share=0.5))["hue_mean"] == pytest.approx(pink)
    orange_red = image_facts(flat((200, 90, 60)))["hue_mean"]
    assert -40 < pink < 0 < orange_red < 20  # neighbours across red, not 334 vs 12


def test_sixteen_bit_greyscale_is_scaled_not_clipped_and_float_images_are_refused():
    sixteen = np.full((32, 32), 40000, np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(sixteen).save(buffer, format="PNG")
    decoded = decode_image(buffer.getvalue())
    assert decoded.rgb.shape == (32, 32, 3) and int(decoded.rgb[0, 0, 0]) == 40000 >> 8
    floats = io.BytesIO()
    Image.fromarray(np.full((32, 32), 0.5, np.float32)).save(floats, format="TIFF")
    with pytest.raises(ImageDecodeError) as err:
        decode_image(floats.getvalue())
    assert err.value.reason == "unsupported_mode"


def test_non_raster_formats_are_not_opened():
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    with pytest.raises(ImageDecodeError) as err:
        decode_image(eps)
    assert err.value.reason == "not_an_image"


def _with_orientation(rgb: np.ndarray, fmt: str, orientation: int) -> bytes:
    image = Image.fromarray(rgb)
    exif = image.getexif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, exif=exif)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_exif_orientation_is_applied_so_ingest_training_and_serving_see_the_upright_image(fmt):
    stored = np.full((32, 64, 3), 255, np.uint8)  # 64 wide, 32 high, as the sensor wrote it
    stored[:, :16] = (200, 0, 0)  # a red band on the left
    decoded = decode_image(_with_orientation(stored, fmt, 6))  # 6: turn 90° clockwise to display
    assert decoded.rgb.shape == (64, 32, 3)  # upright: 32 wide, 64 high
    assert decoded.rgb[:8, :, 0].mean() > 180 and decoded.rgb[:8, :, 1].mean() < 40  # the left band is now on top
    assert decoded.rgb[-8:, :, 1].mean() > 200
    plain = decode_image(_with_orientation(stored, fmt, 1))
    assert plain.rgb.shape == (32, 64, 3)


PILLOW_FUZZ_ERRORS = [
    MemoryError,
    OverflowError,
    NotImplementedError,
    ValueError,
    struct.error,
    SyntaxError,
    TypeError,
    EOFError,
    IndexError,
    KeyError,
    ZeroDivisionError,
    OSError,
]


@pytest.mark.parametrize("stage", ["load", "convert"])
@pytest.mark.parametrize("error", PILLOW_FUZZ_ERRORS)
def test_the_exceptions_pillow_raises_on_hostile_files_become_decode_errors(smear, monkeypatch, stage, error):
    """Pillow's own fuzzers treat these as expected for hostile files; the mode conversion is guarded too."""
    data = _png(smear)

    def hostile(*args, **kwargs):
        raise error("hostile bytes")

    monkeypatch.setattr(Image.Image, stage, hostile)
    with pytest.raises(ImageDecodeError) as err:
        decode_image(data)
    assert err.value.reason in DECODE_REASONS and "hostile bytes" in err.value.detail


def test_a_decompression_bomb_found_while_loading_is_refused(smear, monkeypatch):
    data = _png(smear)

    def bomb(*args, **kwargs):
        raise Image.DecompressionBombError("image size exceeds limit")

    monkeypatch.setattr(Image.Image, "load", bomb)
    with pytest.raises(ImageDecodeError) as err:
        decode_image(data)
    assert err.value.reason == "too_many_pixels"


def test_the_side_range_is_the_ingest_suites():
    """Serving refuses what ingest refuses: both read `IMAGE_SIDE_RANGE`, which must equal the suite's rule."""
    import json
    from pathlib import Path

    from pipelines.data.imagefacts import IMAGE_SIDE_RANGE

    suite = json.loads((Path(__file__).resolve().parents[3] / "expectations/suites/image_batch.json").read_text())
    ranges = {
        e["kwargs"]["column"]: (e["kwargs"]["min_value"], e["kwargs"]["max_value"])
        for e in suite["expectations"]
        if e["kwargs"].get("column") in ("width", "height") and "min_value" in e["kwargs"]
    }
    assert ranges == {"width": IMAGE_SIDE_RANGE, "height": IMAGE_SIDE_RANGE}
