"""Planning a batch: which scanned files form it, its id, and where each file's bytes go.

Data identity (DESIGN.md): an image is its sha256; a batch is the files of one source with a new
*decision key* (sha, label, label-map version; ``decisions``) and the failures not recorded before, with
id = hash(source, sorted keys, label-map version, suite version). Every file of a sha in the batch is in
it, so the same bytes under two labels are seen together: both rows are a label conflict. A decodable
original goes to its content-addressed raw key, uploaded only when no batch stored it before; an image
another source brought is not uploaded again; undecodable bytes are kept under the batch's quarantine
prefix, so nothing a lab sent is lost.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.data.decisions import SourceHistory, decision_key, failure_key, newest_decisions
from pipelines.data.manifests import held_manifest_keys, published_manifest_keys, read_manifests
from pipelines.io import layout
from pipelines.io.storage import ObjectMissingError

if TYPE_CHECKING:
    from pipelines.data.scan import HashedFile
    from pipelines.data.sources import Source
    from pipelines.io.storage import ObjectStore

NO_HISTORY = SourceHistory({}, {}, frozenset())
FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "BMP": "bmp", "TIFF": "tif", "GIF": "gif", "WEBP": "webp"}


@dataclass(frozen=True)
class BatchPlan:
    source: Source
    batch_id: str
    files: list[HashedFile]  # in path order: the files new to the source, and those that could not be read
    first: dict[str, tuple[int, str]]  # sha → (row, path) of its first file
    elsewhere: dict[str, dict[str, str | None]]  # sha → {label, source, key} from other sources (key None: in flight)
    stored: frozenset[str]  # raw keys that already exist
    labels: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # sha → (label, path) of its files
    history: SourceHistory = NO_HISTORY


def make_batch_id(source: str, keys: Iterable[str], label_map_version: str, suite_version: str) -> str:
    """``keys``: the decision and failure keys of the batch's files (a relabel gets a new id)."""
    text = "\n".join([source, label_map_version, suite_version, *sorted(set(keys))])
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


def labels_in_batch(ordered: list[HashedFile], label_map: dict[str, str]) -> dict[str, list[tuple[str, str]]]:
    """sha → (label, path) of each of its files with a known label, in path order."""
    found: dict[str, list[tuple[str, str]]] = {}
    for f in ordered:
        label = label_map.get(f.entry.source_label)
        if f.sha256 is not None and label is not None:
            found.setdefault(f.sha256, []).append((label, f.entry.path))
    return found


def in_batch_conflict(files: list[tuple[str, str]]) -> str | None:
    """``label conflict: Pro vs Benign (...)`` when the same bytes came under two labels in one batch."""
    labels = list(dict.fromkeys(label for label, _ in files))
    if len(labels) < 2:
        return None
    paths = ", ".join(repr(path) for _, path in files[:3]) + (", …" if len(files) > 3 else "")
    return f"label conflict: {' vs '.join(labels)} (same bytes at {paths})"


def label_conflict(label: str | None, other: dict[str, str | None] | None) -> str | None:
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


def accepted_elsewhere(store: ObjectStore, source_name: str, shas: set[str]) -> dict[str, dict[str, str | None]]:
    """sha → {label, source, key} of these images as other sources decided them: their newest accepted
    decision in a published or held batch, else their label in a batch another ingest has in flight (no
    key: its bytes may not have landed yet). Two ingests that plan at the same moment still miss each
    other (DESIGN.md, known limitations)."""
    keys = [k for k in published_manifest_keys(store) if layout.batch_of_manifest_key(k)[0] != source_name]
    keys += [k for k in held_manifest_keys(store) if layout.batch_of_quarantined_manifest_key(k)[0] != source_name]
    frame = newest_decisions(read_manifests(store, keys))
    frame = frame[(frame["status"] == "accepted") & frame["sha256"].isin(shas)].sort_values(["source", "batch_id"])
    found = {r.sha256: {"label": r.label, "source": r.source, "key": r.key} for r in frame.itertuples()}
    for other, labels in inflight_labels(store, source_name).items():
        for sha in shas & labels.keys() - found.keys():
            found[sha] = {"label": labels[sha], "source": other, "key": None}
    return found


def inflight_labels(store: ObjectStore, source_name: str) -> dict[str, dict[str, str]]:
    """source → {sha: label} of the batches other sources are ingesting now (``layout.inflight_batch_key``)."""
    found: dict[str, dict[str, str]] = {}
    for key in store.list(layout.inflight_dir()):
        try:
            intent = store.get_json(key)
        except ObjectMissingError:  # that batch was published (or held) since the listing: read above
            continue
        if intent["source"] != source_name:
            found.setdefault(intent["source"], {}).update(intent["labels"])
    return found


def select_files(
    scanned: list[HashedFile], history: SourceHistory, source: Source
) -> tuple[list[HashedFile], list[str]]:
    """(the batch's files in path order, their keys): every file of a sha with a new decision key, and
    the failures not recorded before. A known decision or a recorded failure is not added again."""

    def key_of(h: HashedFile) -> str:
        if h.sha256 is None:
            return failure_key(h.entry.path, h.entry.path_error or h.read_error)
        return decision_key(h.sha256, source.label_map.get(h.entry.source_label), source.label_map_version)

    keys = {id(h): key_of(h) for h in scanned}
    fresh = {h.sha256 for h in scanned if h.sha256 is not None and not history.is_known(keys[id(h)], h.sha256)}
    failed = [h for h in scanned if h.sha256 is None and keys[id(h)] not in history.failures]
    files = sorted([h for h in scanned if h.sha256 in fresh] + failed, key=lambda h: h.entry.path)
    return files, [keys[id(h)] for h in files]


def plan_batch(
    store: ObjectStore,
    source: Source,
    suite_version: str,
    scanned: list[HashedFile],
    history: SourceHistory,
    pool: ThreadPoolExecutor,
) -> BatchPlan | None:
    """The batch of the scanned files with a new decision (or an unrecorded failure); None when there is none."""
    files, keys = select_files(scanned, history, source)
    if not files:
        return None
    shas = {h.sha256 for h in files if h.sha256 is not None}
    batch_id = make_batch_id(source.name, keys, source.label_map_version, suite_version)
    return BatchPlan(
        source,
        batch_id,
        files,
        first_occurrences(files),
        accepted_elsewhere(store, source.name, shas),
        stored_raw_keys(store, shas, pool),
        labels_in_batch(files, source.label_map),
        history,
    )


def file_record(plan: BatchPlan, row: int, hashed: HashedFile) -> dict[str, Any]:
    """The manifest record of one file before its bytes are placed: where it came from, its sha, and (for
    a decision) its revision and the decision it replaces."""
    entry, source = hashed.entry, plan.source
    replaced = plan.history.replaced(hashed.sha256) if hashed.sha256 and not hashed.read_error else {}
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
        **replaced,
    }


def place(plan: BatchPlan, row: int, record: dict[str, Any], sha: str) -> tuple[dict[str, Any], bool]:
    """The record with its key, duplicate and conflict facts, and whether its bytes must be uploaded.

    Same bytes under one label: later rows are duplicates; under two labels: every row is a label
    conflict (neither label wins). Only a sha's first row uploads its bytes."""
    first_row, first_path = plan.first[sha]
    is_first = first_row == row
    conflict = in_batch_conflict(plan.labels.get(sha, []))
    if conflict:
        record["label_conflict"] = conflict
    elif not is_first:
        record["duplicate_of"] = first_path
    other = plan.elsewhere.get(sha)
    if other is not None:
        record["cross_source"] = other["source"]
        record["label_conflict"] = conflict or label_conflict(record["label"], other)
    if record.get("decode_error"):  # undecodable bytes are kept with the batch, never lost
        record["key"] = layout.rejected_original_key(plan.source.name, plan.batch_id, sha, record["ext"])
        return record, is_first
    record["ext"] = FORMAT_EXT.get(record["format"], record["ext"])
    if other is not None and other["key"]:
        record["key"] = other["key"]  # bytes already stored: not re-uploaded
        return record, False
    record["key"] = layout.raw_key(sha, record["ext"])
    record["created"] = is_first and record["key"] not in plan.stored
    return record, record["created"]
