"""The first pass of an ingest: read every file of a source once, hash it, and measure the new ones.

A file whose sha256 a manifest of the source already holds is only hashed; a new one is decoded and
measured (facts, perceptual hash, format, or why it cannot be decoded). Image metadata (EXIF, PNG text)
is never read into the results: only the decoded pixels' facts are.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pipelines.core.errors import LeukopsError
from pipelines.data.imagefacts import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image, greyscale, image_facts
from pipelines.data.imagefacts import perceptual_hash as phash_of
from pipelines.data.sources import Source, SourceFile
from pipelines.data.validation import preload_gx
from pipelines.io.storage import sha256_hex

if TYPE_CHECKING:
    from pipelines.data.sources import LocalReader, S3Reader

DEFAULT_KEEP_BYTES = 1 << 30  # file contents the scan pass may keep in memory for the upload


@dataclass(frozen=True)
class HashedFile:
    entry: SourceFile
    sha256: str | None  # None when the file could not (or must not) be read
    read_error: str | None = None
    examined: dict[str, Any] | None = None  # examine() of the bytes, for files new to the source
    data: bytes | None = field(default=None, repr=False, compare=False)  # kept so it is read only once


class ByteBudget:
    """How many bytes of file contents may stay in memory between the two passes (thread-safe)."""

    def __init__(self, limit: int) -> None:
        self.left = limit
        self._lock = threading.Lock()

    def take(self, size: int) -> bool:
        with self._lock:
            if size > self.left:
                return False
            self.left -= size
            return True


def examine(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict[str, Any]:
    """Decode and measure one file's bytes: facts, perceptual hash, format, or the decode failure."""
    try:
        decoded = decode_image(data, max_pixels)
    except ImageDecodeError as err:
        return {"decode_error": err.reason, "decode_detail": err.detail}
    grey = greyscale(decoded.rgb)
    facts = image_facts(decoded.rgb, decoded.source_channels, grey)
    return {"format": decoded.format, "phash": phash_of(decoded.rgb, grey), **facts}


def read_error(path: str, err: Exception) -> str:
    return f"could not read {path!r}: {err}"


def _scan_one(
    reader: LocalReader | S3Reader, entry: SourceFile, known: set[str], budget: ByteBudget, max_pixels: int
) -> HashedFile:
    """Never raises for a bad file: an unreadable one is returned with its ``read_error``."""
    if entry.path_error:
        return HashedFile(entry, None)
    if entry.not_read:
        return HashedFile(entry, None, entry.not_read)
    try:
        data = reader.read(entry.path)
    except (OSError, LeukopsError) as err:
        return HashedFile(entry, None, read_error(entry.path, err))
    sha = sha256_hex(data)
    if sha in known:
        return HashedFile(entry, sha)
    preload_gx()  # something is new, so GX will validate it: its seconds-long import overlaps this pass
    kept = data if budget.take(len(data)) else None
    return HashedFile(entry, sha, examined={**examine(data, max_pixels), "size_bytes": len(data)}, data=kept)


def scan_files(
    reader: LocalReader | S3Reader,
    entries: list[SourceFile],
    pool: ThreadPoolExecutor,
    known: set[str],
    *,
    keep_bytes: int = 0,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: Callable[[], object] = lambda: None,
) -> list[HashedFile]:
    """One read per file: sha256 of every file, and for files new to the source (sha not in ``known``)
    their facts. Their bytes are kept for upload while they fit in ``keep_bytes``; the rest is re-read
    and verified when uploaded (a source may be larger than memory)."""
    budget = ByteBudget(keep_bytes)

    def scan(entry: SourceFile) -> HashedFile:
        scanned = _scan_one(reader, entry, known, budget, max_pixels)
        progress()
        return scanned

    return list(pool.map(scan, entries))


def scan_threads(source: Source, workers: int) -> int:
    """Decoding and measuring a local file is CPU work that holds the GIL part of the time: beyond two
    threads per core they only queue for it (2 cores: 8 threads scan ~30% slower than 4). Reads from an
    S3 landing zone wait on the network, so they use every worker."""
    if source.is_s3:
        return workers
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(workers, 2 * cores))
