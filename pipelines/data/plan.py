"""Planning a batch: which scanned files form it, its id, and where each file's bytes go.

Data identity (DESIGN.md): an image is its sha256; a batch is the files of one source whose bytes are
new *to that source*, with id = hash(source, sorted shas, label-map version, suite version). A decodable
original goes to its content-addressed raw key, uploaded only when no batch stored it before; an image
another source brought is not uploaded again; undecodable bytes are kept under the batch's quarantine
prefix, so nothing a lab sent is lost.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.data.manifests import published_manifest_keys, read_manifests
from pipelines.io import layout

if TYPE_CHECKING:
    from pipelines.data.scan import HashedFile
    from pipelines.data.sources import Source
    from pipelines.io.storage import ObjectStore

FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "BMP": "bmp", "TIFF": "tif", "GIF": "gif", "WEBP": "webp"}


@dataclass(frozen=True)
class BatchPlan:
    source: Source
    batch_id: str
    files: list[HashedFile]  # in path order: the files new to the source, and those that could not be read
    first: dict[str, tuple[int, str]]  # sha → (row, path) of its first file
    elsewhere: dict[str, dict[str, str]]  # sha → {label, source, key} accepted from other sources
    stored: frozenset[str]  # raw keys that already exist


def make_batch_id(source: str, shas: Iterable[str], label_map_version: str, suite_version: str) -> str:
    text = "\n".join([source, label_map_version, suite_version, *sorted(set(shas))])
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def safe_ext(path: str) -> str:
    suffix = Path(path).suffix.lower().lstrip(".")
    return suffix if re.fullmatch(r"[a-z0-9]{1,8}", suffix) else "bin"


def first_occurrences(ordered: list[HashedFile]) -> dict[str, tuple[int, str]]:
    """sha → (row, path) of its first file; later rows with that sha are in-batch duplicates."""
    first: dict[str, tuple[int, str]] = {}
    for row, f in enumerate(ordered):
        if f.sha256 is not None:
            first.setdefault(f.sha256, (row, f.entry.path))
    return first


def label_conflict(label: str | None, other: dict[str, str] | None) -> str | None:
    if other is None or label is None or other["label"] == label:
        return None
    return f"labelled {label!r} here but {other['label']!r} in source {other['source']!r}"


def stored_raw_keys(store: ObjectStore, shas: set[str], pool: ThreadPoolExecutor) -> frozenset[str]:
    """The raw keys that already exist for these shas: one LIST per shard instead of a HEAD per image,
    and only for the shards that exist (one delimited LIST finds those)."""
    depth = 2 if len(shas) >= 256 else 4  # the 256 top shards ab/, or one tiny shard ab/cd/ per image
    present = set(store.list(f"{layout.RAW_SHARDS}/", recursive=False))  # the top shard folders that exist
    prefixes = sorted({layout.raw_shard_dir(s, depth) for s in shas if layout.raw_shard_dir(s, 2) in present})
    return frozenset(k for keys in pool.map(store.list, prefixes) for k in keys)


def accepted_elsewhere(store: ObjectStore, source_name: str) -> dict[str, dict[str, str]]:
    """sha → {label, source, key} of images already accepted from other sources."""
    keys = [k for k in published_manifest_keys(store) if layout.batch_of_manifest_key(k)[0] != source_name]
    frame = read_manifests(store, keys)
    frame = frame[frame["status"] == "accepted"].drop_duplicates("sha256")
    return {r.sha256: {"label": r.label, "source": r.source, "key": r.key} for r in frame.itertuples()}


def plan_batch(
    store: ObjectStore,
    source: Source,
    suite_version: str,
    scanned: list[HashedFile],
    known: set[str],
    pool: ThreadPoolExecutor,
) -> BatchPlan | None:
    """The batch of the scanned files whose sha is not in ``known``; None when there is none."""
    fresh = [h for h in scanned if h.sha256 is not None and h.sha256 not in known]
    if not fresh:
        return None
    files = sorted(fresh + [h for h in scanned if h.sha256 is None], key=lambda h: h.entry.path)
    shas = {h.sha256 for h in fresh}
    batch_id = make_batch_id(source.name, shas, source.label_map_version, suite_version)
    stored = stored_raw_keys(store, shas, pool)
    return BatchPlan(source, batch_id, files, first_occurrences(files), accepted_elsewhere(store, source.name), stored)


def file_record(plan: BatchPlan, row: int, hashed: HashedFile) -> dict[str, Any]:
    """The manifest record of one file before its bytes are placed: where it came from, and its sha."""
    entry, source = hashed.entry, plan.source
    return {
        "row": row,
        "source": source.name,
        "batch_id": plan.batch_id,
        "role": source.role,
        "path": entry.path,
        "patient_id": entry.patient_id,
        "source_label": entry.source_label,
        "label": source.label_map.get(entry.source_label),
        "path_error": entry.path_error,
        "read_error": hashed.read_error,
        "sha256": hashed.sha256,
        "ext": safe_ext(entry.path),
        "label_map_version": source.label_map_version,
        "created": False,
    }


def place(plan: BatchPlan, row: int, record: dict[str, Any], sha: str) -> tuple[dict[str, Any], bool]:
    """The record with its key and duplicate facts, and whether its bytes must be uploaded."""
    first_row, first_path = plan.first[sha]
    if first_row != row:
        record["duplicate_of"] = first_path
    other = plan.elsewhere.get(sha)
    if other is not None:
        record.update(cross_source=other["source"], label_conflict=label_conflict(record["label"], other))
    if record.get("decode_error"):  # undecodable bytes are kept with the batch, never lost
        record["key"] = layout.rejected_original_key(plan.source.name, plan.batch_id, sha, record["ext"])
        return record, "duplicate_of" not in record
    record["ext"] = FORMAT_EXT.get(record["format"], record["ext"])
    if other is not None:
        record["key"] = other["key"]  # bytes already stored: not re-uploaded
        return record, False
    record["key"] = layout.raw_key(sha, record["ext"])
    record["created"] = "duplicate_of" not in record and record["key"] not in plan.stored
    return record, record["created"]
