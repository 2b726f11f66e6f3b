"""Hostile image files for fuzzing the shared decoder: small valid seeds, then seeded mutations.

Seeds are ≤ 64 px images in every raster format ingest accepts (and the modes labs send: grey, RGBA,
palette, 16-bit, progressive, tiled, compressed TIFF, EXIF-rotated JPEG). A mutant is a seed with byte
flips, a truncation, a header edit (a random integer written over the first bytes, where the sizes
and offsets live), a zeroed range or a repeated chunk. The same seed number always gives the same
files, so a failure found once is found again.
"""

from __future__ import annotations

import io
import random
import struct
from collections.abc import Iterator

import numpy as np
from PIL import Image

SEED_SIDE = 48
HEADER_BYTES = 256  # where formats keep dimensions, offsets, counts and (TIFF) the tag directory


def _seed_pixels(side: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[:side, :side]
    rgb = np.stack([x * 4, y * 4, (x + y) * 2], axis=-1) % 256
    return (rgb + rng.integers(0, 16, rgb.shape)).clip(0, 255).astype(np.uint8)


def _encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def seed_files(side: int = SEED_SIDE) -> dict[str, bytes]:
    """name → bytes of small valid images, one per format and notable variant."""
    rgb = Image.fromarray(_seed_pixels(side))
    grey, rgba = rgb.convert("L"), rgb.convert("RGBA")
    deep = Image.fromarray((np.asarray(grey, np.uint16) * 257).astype(np.uint16))
    exif = rgb.getexif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    return {
        "rgb.png": _encoded(rgb, "PNG"),
        "grey.png": _encoded(grey, "PNG"),
        "rgba.png": _encoded(rgba, "PNG"),
        "grey_alpha.png": _encoded(rgba.convert("LA"), "PNG"),
        "palette.png": _encoded(rgb.quantize(16), "PNG"),
        "deep.png": _encoded(deep, "PNG"),
        "baseline.jpg": _encoded(rgb, "JPEG", quality=85),
        "progressive.jpg": _encoded(rgb, "JPEG", quality=85, progressive=True),
        "grey.jpg": _encoded(grey, "JPEG"),
        "cmyk.jpg": _encoded(rgb.convert("CMYK"), "JPEG"),
        "rotated.jpg": _encoded(rgb, "JPEG", exif=exif),
        "raw.tif": _encoded(rgb, "TIFF"),
        "lzw.tif": _encoded(rgb, "TIFF", compression="tiff_lzw"),
        "deflate.tif": _encoded(rgba, "TIFF", compression="tiff_adobe_deflate"),
        "packbits.tif": _encoded(grey, "TIFF", compression="packbits"),
        "tiled.tif": _encoded(rgb, "TIFF", tile=(16, 16)),
        "deep.tif": _encoded(deep, "TIFF"),
        "cmyk.tif": _encoded(rgb.convert("CMYK"), "TIFF"),
        "bilevel.tif": _encoded(grey.convert("1"), "TIFF", compression="group4"),
        "strips.tif": _encoded(rgb, "TIFF", tiffinfo={278: 4}),  # RowsPerStrip 4: many strip offsets
        "jpeg.tif": _encoded(rgb, "TIFF", compression="jpeg"),
        "palette.gif": _encoded(rgb.quantize(32), "GIF"),
        "rgb.bmp": _encoded(rgb, "BMP"),
        "rle.bmp": _encoded(rgb.quantize(16), "BMP"),  # palette BMP
        "lossy.webp": _encoded(rgb, "WEBP", quality=80),
        "lossless.webp": _encoded(rgba, "WEBP", lossless=True),
    }


def _flip_bytes(data: bytearray, rng: random.Random) -> None:
    for _ in range(rng.randint(1, 8)):
        data[rng.randrange(len(data))] = rng.randrange(256)


def _truncate(data: bytearray, rng: random.Random) -> None:
    del data[rng.randrange(len(data)) :]


def _edit_header(data: bytearray, rng: random.Random) -> None:
    """A random 16- or 32-bit integer, either byte order, over the header: sizes, offsets, counts."""
    code = rng.choice(["<H", ">H", "<I", ">I"])
    value = rng.choice([0, 1, 2, 3, 4, 8, 16, 32, 0xFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, rng.randrange(1 << 16)])
    value &= (1 << (8 * struct.calcsize(code))) - 1
    packed = struct.pack(code, value)
    offset = rng.randrange(0, max(1, min(HEADER_BYTES, len(data)) - len(packed)))
    data[offset : offset + len(packed)] = packed


def _zero_range(data: bytearray, rng: random.Random) -> None:
    start = rng.randrange(len(data))
    end = min(len(data), start + rng.randint(1, 64))
    data[start:end] = bytes(end - start)


def _repeat_chunk(data: bytearray, rng: random.Random) -> None:
    start = rng.randrange(len(data))
    chunk = data[start : start + rng.randint(1, 256)]
    at = rng.randrange(len(data))
    data[at:at] = chunk * rng.randint(1, 4)


MUTATIONS = {
    "flip": _flip_bytes,
    "truncate": _truncate,
    "header": _edit_header,
    "zero": _zero_range,
    "repeat": _repeat_chunk,
}


def mutants(count: int, seed: int = 0, seeds: dict[str, bytes] | None = None) -> Iterator[tuple[str, bytes]]:
    """``count`` (name, bytes) mutants, cycling over the seed files; one to three mutations each."""
    rng = random.Random(seed)
    seeds = seeds or seed_files()
    names = sorted(seeds)
    for index in range(count):
        base = names[index % len(names)]
        data = bytearray(seeds[base])
        applied = rng.choices(list(MUTATIONS), k=rng.randint(1, 3))
        for mutation in applied:
            if data:
                MUTATIONS[mutation](data, rng)
        yield f"{index:05d}-{base}-{'+'.join(applied)}", bytes(data)
