"""Ingest one source: hash its files, keep the ones new to it, decode, upload, validate, publish a batch.

Data identity (DESIGN.md): an image is its sha256; a batch is the files of one source whose bytes are
new *to that source*, with id = hash(source, sorted shas, label-map version, suite version). Decodable
originals go to ``raw/`` content-addressed (never re-uploaded); undecodable bytes are kept under the
batch's quarantine prefix so nothing a lab sent is lost. The batch manifest is written last:
``manifests/batches/<source>/<batch_id>.parquet`` for an accepted batch, or
``quarantine/<source>/<batch_id>/manifest.parquet`` for a quarantined one (published to ``manifests``
only by ``release_batch``). Image metadata (EXIF, PNG text) never reaches a manifest or a log: only
the decoded pixels' facts do.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.core.errors import LeukopsError
from pipelines.data.imagefacts import (
    DEFAULT_MAX_PIXELS,
    FACT_COLUMNS,
    ImageDecodeError,
    decode_image,
    greyscale,
    image_facts,
)
from pipelines.data.imagefacts import perceptual_hash as phash_of
from pipelines.data.sources import Source, SourceFile, list_files, load_source, reader_for
from pipelines.io.storage import content_key, sha256_hex
from pipelines.data.validation import Suite, Validation, load_suite, preload_gx, validate_manifest

if TYPE_CHECKING:
    import pandas as pd

    from pipelines.core.settings import Settings
    from pipelines.io.storage import ObjectStore

BATCHES_PREFIX = "manifests/batches"
QUARANTINE_PREFIX = "quarantine"
REPORTS_PREFIX = "reports/validation"
DEFAULT_KEEP_BYTES = 1 << 30  # file contents the scan pass may keep in memory for the upload
FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "BMP": "bmp", "TIFF": "tif", "GIF": "gif", "WEBP": "webp"}
TEXT_COLUMNS = (
    "source", "batch_id", "role", "path", "patient_id", "sha256", "key", "phash", "ext", "format", "label",
    "source_label", "path_error", "read_error", "decode_error", "decode_detail", "duplicate_of",
    "label_conflict", "cross_source", "label_map_version",
)  # fmt: skip
MANIFEST_COLUMNS = (
    "row",
    *TEXT_COLUMNS,
    "size_bytes",
    *FACT_COLUMNS,
    "suite_version",
    "status",
    "reason",
    "detail",
)


class IngestError(LeukopsError):
    pass


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


@dataclass
class IngestReport:
    source: str
    status: str  # "accepted" | "quarantined" | "nothing_new"
    message: str
    batch_id: str | None = None
    files_seen: int = 0
    already_ingested: int = 0
    accepted: int = 0
    rejected: int = 0
    new_objects: int = 0
    cross_source_duplicates: int = 0
    rejections: list[dict[str, str]] = field(default_factory=list)
    quarantine_reasons: list[str] = field(default_factory=list)
    manifest: str | None = None
    validation: str | None = None
    data_docs: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- pure steps ---------------------------------------------------------------------------------------


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


def examine(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict[str, Any]:
    """Decode and measure one file's bytes: facts, perceptual hash, format, or the decode failure."""
    try:
        decoded = decode_image(data, max_pixels)
    except ImageDecodeError as err:
        return {"decode_error": err.reason, "decode_detail": err.detail}
    grey = greyscale(decoded.rgb)
    facts = image_facts(decoded.rgb, decoded.source_channels, grey)
    return {"format": decoded.format, "phash": phash_of(decoded.rgb, grey), **facts}


def label_conflict(label: str | None, other: dict[str, str] | None) -> str | None:
    if other is None or label is None or other["label"] == label:
        return None
    return f"labelled {label!r} here but {other['label']!r} in source {other['source']!r}"


def manifest_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Rows → a frame with every manifest column, text columns as objects (None, never NaN)."""
    import pandas as pd

    frame = pd.DataFrame(rows)
    for column in MANIFEST_COLUMNS:
        if column not in frame:
            frame[column] = None
    for column in TEXT_COLUMNS:
        frame[column] = frame[column].astype(object).where(frame[column].notna(), None)
    for column in ("size_bytes", *FACT_COLUMNS):
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype(float)
    return frame[list(MANIFEST_COLUMNS)].sort_values("row").reset_index(drop=True)


# -- reading a source ---------------------------------------------------------------------------------


def _scan_one(reader, entry: SourceFile, known: set[str], budget: ByteBudget, max_pixels: int) -> HashedFile:
    """Never raises for a bad file: an unreadable one is returned with its ``read_error``."""
    if entry.path_error:
        return HashedFile(entry, None)
    try:
        data = reader.read(entry.path)
    except (OSError, LeukopsError) as err:
        return HashedFile(entry, None, f"could not read {entry.path!r}: {err}")
    sha = sha256_hex(data)
    if sha in known:
        return HashedFile(entry, sha)
    preload_gx()  # something is new, so GX will validate it: its seconds-long import overlaps this pass
    kept = data if budget.take(len(data)) else None
    return HashedFile(entry, sha, examined={**examine(data, max_pixels), "size_bytes": len(data)}, data=kept)


def scan_files(
    reader,
    entries: list[SourceFile],
    pool: ThreadPoolExecutor,
    known: set[str],
    *,
    keep_bytes: int = 0,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: Callable[[], object] = lambda: None,
) -> list[HashedFile]:
    """First pass, one read per file: sha256 of every file, and for files new to the source (sha not in
    ``known``) their facts. Their bytes are kept for upload while they fit in ``keep_bytes``; the rest
    is re-read and verified when uploaded (a source may be larger than memory)."""
    budget = ByteBudget(keep_bytes)

    def scan(entry: SourceFile) -> HashedFile:
        scanned = _scan_one(reader, entry, known, budget, max_pixels)
        progress()
        return scanned

    return list(pool.map(scan, entries))


# -- S3 index of what was ingested before ---------------------------------------------------------------


def _manifest_keys(store: ObjectStore, source: str | None = None) -> list[str]:
    published = store.list(f"{BATCHES_PREFIX}/{source}/" if source else f"{BATCHES_PREFIX}/")
    held = store.list(f"{QUARANTINE_PREFIX}/{source}/" if source else f"{QUARANTINE_PREFIX}/")
    return [k for k in published if k.endswith(".parquet")] + [k for k in held if k.endswith("/manifest.parquet")]


def read_manifests(store: ObjectStore, keys: list[str]) -> pd.DataFrame:
    import pandas as pd

    frames = [store.get_parquet(k) for k in keys]
    return pd.concat(frames, ignore_index=True) if frames else manifest_frame([])


def all_manifests(store: ObjectStore, source: str | None = None) -> pd.DataFrame:
    """Every batch manifest row (published and quarantined) of one source, or of all sources."""
    return read_manifests(store, _manifest_keys(store, source))


def accepted_rows(store: ObjectStore, source_name: str) -> pd.DataFrame:
    """Accepted rows of every published (accepted or released) batch of a source."""
    keys = [k for k in store.list(f"{BATCHES_PREFIX}/{source_name}/") if k.endswith(".parquet")]
    frame = read_manifests(store, keys)
    return frame[frame["status"] == "accepted"].reset_index(drop=True)


def stored_raw_keys(store: ObjectStore, shas: set[str], pool: ThreadPoolExecutor) -> frozenset[str]:
    """The raw/ keys that already exist for these shas: one LIST per shard instead of a HEAD per image,
    and only for the shards that exist (one delimited LIST finds those)."""
    depth = 2 if len(shas) >= 256 else 4  # 256 shards of raw/sha256/ab/, or one tiny shard per image
    present = set(store.list("raw/sha256/", recursive=False))  # the shard folders ab/ that exist
    wanted = {f"raw/sha256/{s[:2]}/" + (f"{s[2:4]}/" if depth == 4 else "") for s in shas}
    prefixes = sorted(p for p in wanted if p[: len("raw/sha256/ab/")] in present)
    return frozenset(k for keys in pool.map(store.list, prefixes) for k in keys)


def accepted_elsewhere(store: ObjectStore, source_name: str) -> dict[str, dict[str, str]]:
    """sha → {label, source, key} of images already accepted from other sources."""
    keys = [
        k
        for k in store.list(f"{BATCHES_PREFIX}/")
        if k.endswith(".parquet") and not k.startswith(f"{BATCHES_PREFIX}/{source_name}/")
    ]
    frame = read_manifests(store, keys)
    frame = frame[frame["status"] == "accepted"].drop_duplicates("sha256")
    return {r.sha256: {"label": r.label, "source": r.source, "key": r.key} for r in frame.itertuples()}


# -- the ingest ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _BatchPlan:
    source: Source
    batch_id: str
    first: dict[str, tuple[int, str]]
    elsewhere: dict[str, dict[str, str]]
    stored: frozenset[str]  # raw/ keys that already exist


Upload = tuple[str, bytes]  # (key, bytes) still to be put


def _process(
    plan: _BatchPlan, reader, store: ObjectStore, row: int, hashed: HashedFile
) -> tuple[dict[str, Any], Upload | None]:
    """Second pass for one file: its manifest record and upload. Bytes kept from the first pass are
    returned for upload later; a file that was not kept is re-read, verified and uploaded now. Never
    raises for a bad file."""
    entry, source = hashed.entry, plan.source
    record: dict[str, Any] = {
        "row": row, "source": source.name, "batch_id": plan.batch_id, "role": source.role, "path": entry.path,
        "patient_id": entry.patient_id, "source_label": entry.source_label,
        "label": source.label_map.get(entry.source_label), "path_error": entry.path_error,
        "read_error": hashed.read_error, "sha256": hashed.sha256, "ext": safe_ext(entry.path),
        "label_map_version": source.label_map_version, "created": False,
    }  # fmt: skip
    if hashed.sha256 is None:
        return record, None
    placed, upload = _place(plan, row, {**record, **hashed.examined}, hashed.sha256)
    if not upload:
        return placed, None
    key = placed["key"]
    if hashed.data is not None:
        return placed, (key, hashed.data)
    try:
        data = reader.read(entry.path)
    except (OSError, LeukopsError) as err:
        return {**record, "read_error": f"could not read {entry.path!r}: {err}"}, None
    if sha256_hex(data) != hashed.sha256:
        return {**record, "read_error": f"{entry.path!r} changed while it was being ingested"}, None
    store.put_bytes(key, data)
    return placed, None


def _place(plan: _BatchPlan, row: int, record: dict[str, Any], sha: str) -> tuple[dict[str, Any], bool]:
    """The record with its key and duplicate facts, and whether its bytes must be uploaded."""
    source = plan.source
    first_row, first_path = plan.first[sha]
    if first_row != row:
        record["duplicate_of"] = first_path
    other = plan.elsewhere.get(sha)
    if other is not None:
        record.update(cross_source=other["source"], label_conflict=label_conflict(record["label"], other))
    if record.get("decode_error"):  # undecodable bytes are kept with the batch, never lost
        record["key"] = f"{QUARANTINE_PREFIX}/{source.name}/{plan.batch_id}/rejected/{sha}.{record['ext']}"
        return record, "duplicate_of" not in record
    record["ext"] = FORMAT_EXT.get(record["format"], record["ext"])
    if other is not None:
        record["key"] = other["key"]  # bytes already stored: not re-uploaded
        return record, False
    record["key"] = content_key(sha, record["ext"])
    record["created"] = "duplicate_of" not in record and record["key"] not in plan.stored
    return record, record["created"]


def _upload_docs(store: ObjectStore, docs_dir: Path, prefix: str, pool: ThreadPoolExecutor) -> str:
    files = [p for p in docs_dir.rglob("*") if p.is_file()]
    list(pool.map(lambda p: store.put_bytes(f"{prefix}/{p.relative_to(docs_dir).as_posix()}", p.read_bytes()), files))
    return store.uri(f"{prefix}/index.html")


def _summary(validation: Validation, source: Source, batch_id: str) -> dict[str, Any]:
    frame = validation.frame
    return {
        "source": source.name,
        "batch_id": batch_id,
        "suite_version": validation.suite_version,
        "accepted": int((frame["status"] == "accepted").sum()),
        "rejected": int((frame["status"] == "rejected").sum()),
        "rejected_share": validation.rejected_share,
        "quarantine_reasons": validation.quarantine_reasons,
        "gx_success": validation.result.get("success"),
    }


def validate_and_report(
    store: ObjectStore,
    frame: pd.DataFrame,
    source: Source,
    suite: Suite,
    batch_id: str,
    report_prefix: str,
    pool: ThreadPoolExecutor,
) -> tuple[Validation, str, str]:
    """GX suite on the manifest, Data Docs and the validation JSON uploaded under ``report_prefix``."""
    with tempfile.TemporaryDirectory(prefix="leukops-gx-") as tmp:
        validation = validate_manifest(
            frame, suite, list(source.canonical_classes), docs_dir=Path(tmp), run_name=batch_id
        )
        docs = _upload_docs(store, Path(tmp), report_prefix, pool)
    result_uri = store.put_json(
        f"{report_prefix}/validation.json",
        {**_summary(validation, source, batch_id), "gx": validation.result},
    )
    return validation, docs, result_uri


def ingest_source(
    source: Source,
    settings: Settings,
    store: ObjectStore,
    *,
    run_date: str,
    suite: Suite | None = None,
    progress: bool = False,
    workers: int = 8,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    keep_bytes: int = DEFAULT_KEEP_BYTES,
) -> IngestReport:
    """Ingest the files of ``source`` new to it; ``run_date`` (YYYY-MM-DD) names the report folder.

    Files are read once when they fit in ``keep_bytes``; their uploads then run while GX validates
    the manifest (which does not depend on them), and the manifest is published only after both.
    """
    from tqdm import tqdm

    suite = suite or load_suite(settings)
    reader = reader_for(source, settings)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        known_rows = pool.submit(all_manifests, store, source.name)
        entries = list_files(source, reader)
        known = set(known_rows.result()["sha256"].dropna())
        with (
            tqdm(total=len(entries), desc=f"scan {source.name}", unit="img", disable=not progress) as bar,
            ThreadPoolExecutor(max_workers=scan_threads(source, workers)) as scan_pool,
        ):
            scanned = scan_files(
                reader, entries, scan_pool, known, keep_bytes=keep_bytes, max_pixels=max_pixels, progress=bar.update
            )
        fresh = [h for h in scanned if h.sha256 is not None and h.sha256 not in known]
        already = sum(1 for h in scanned if h.sha256 in known)
        if not fresh:
            return IngestReport(
                source.name, "nothing_new", f"nothing new in {source.location}: no objects, no batch created",
                files_seen=len(entries), already_ingested=already,
            )  # fmt: skip
        batch = sorted(fresh + [h for h in scanned if h.sha256 is None], key=lambda h: h.entry.path)
        batch_id = make_batch_id(source.name, (h.sha256 for h in fresh), source.label_map_version, suite.version)
        stored = stored_raw_keys(store, {h.sha256 for h in fresh}, pool)
        plan = _BatchPlan(source, batch_id, first_occurrences(batch), accepted_elsewhere(store, source.name), stored)
        rereads = any(h.sha256 is not None and h.data is None for h in batch)
        run = pool.map if rereads else map  # kept bytes need no I/O here: only re-reads are worth threads
        outcomes = list(run(lambda item: _process(plan, reader, store, *item), enumerate(batch)))
        records = [record for record, _ in outcomes]
        frame = manifest_frame(records).assign(suite_version=suite.version)
        validation, docs, result_uri = _upload_while_validating(
            store, [upload for _, upload in outcomes if upload is not None], frame, source, suite, batch_id,
            f"{REPORTS_PREFIX}/{run_date}/{batch_id}", pool, progress,
        )  # fmt: skip
    report = _report(source, batch_id, validation, records, len(entries), already)
    report.data_docs, report.validation = docs, result_uri
    report.manifest = _publish(store, source, batch_id, validation, run_date)
    return report


def scan_threads(source: Source, workers: int) -> int:
    """Decoding and measuring a local file is CPU work that holds the GIL part of the time: beyond two
    threads per core they only queue for it (2 cores: 8 threads scan ~30% slower than 4). Reads from an
    S3 landing zone wait on the network, so they use every worker."""
    if source.is_s3:
        return workers
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(workers, 2 * cores))


def _upload_while_validating(
    store: ObjectStore,
    uploads: list[Upload],
    frame: pd.DataFrame,
    source: Source,
    suite: Suite,
    batch_id: str,
    report_prefix: str,
    pool: ThreadPoolExecutor,
    progress: bool,
) -> tuple[Validation, str, str]:
    """GX validates the manifest while the uploads run (it needs the facts, not the objects); returns
    only when every upload has landed, so the manifest that names them can be published."""
    from tqdm import tqdm

    with tqdm(total=len(uploads), desc=f"upload {source.name}", unit="img", disable=not progress) as bar:
        futures = [pool.submit(store.put_bytes, key, data) for key, data in uploads]
        for future in futures:
            future.add_done_callback(lambda _: bar.update())
        validated = validate_and_report(store, frame, source, suite, batch_id, report_prefix, pool)
        for future in futures:
            future.result()
    return validated


def _report(source: Source, batch_id: str, validation: Validation, records, seen: int, already: int) -> IngestReport:
    frame = validation.frame
    rejected = frame[frame["status"] == "rejected"]
    status = "quarantined" if validation.quarantined else "accepted"
    accepted = int((frame["status"] == "accepted").sum())
    message = f"batch {batch_id} of {source.name}: {accepted} accepted, {len(rejected)} rejected" + (
        f"; QUARANTINED ({'; '.join(validation.quarantine_reasons)})" if validation.quarantined else ""
    )
    return IngestReport(
        source=source.name, status=status, message=message, batch_id=batch_id, files_seen=seen,
        already_ingested=already, accepted=accepted, rejected=len(rejected),
        new_objects=sum(1 for r in records if r["created"]),
        cross_source_duplicates=int(frame["cross_source"].notna().sum()),
        rejections=[{"path": r.path, "reason": r.reason, "detail": r.detail} for r in rejected.itertuples()],
        quarantine_reasons=validation.quarantine_reasons,
    )  # fmt: skip


def _publish(store: ObjectStore, source: Source, batch_id: str, validation: Validation, run_date: str) -> str:
    """The manifest is written last: a crash before it leaves only immutable objects a rerun reuses."""
    if not validation.quarantined:
        return store.put_parquet(f"{BATCHES_PREFIX}/{source.name}/{batch_id}.parquet", validation.frame)
    held = f"{QUARANTINE_PREFIX}/{source.name}/{batch_id}"
    store.put_json(f"{held}/validation.json", {**_summary(validation, source, batch_id), "gx": validation.result})
    store.put_json(
        f"{held}/quarantined.json",
        {"event": "quarantined", "date": run_date, **_summary(validation, source, batch_id)},
    )
    return store.put_parquet(f"{held}/manifest.parquet", validation.frame)


# -- quarantine triage ----------------------------------------------------------------------------------


def quarantined_batches(store: ObjectStore) -> list[dict[str, Any]]:
    """Every batch ever quarantined, with its reasons and whether (and why) it was released."""
    batches = []
    for key in store.list(f"{QUARANTINE_PREFIX}/"):
        if not key.endswith("/manifest.parquet"):
            continue
        _, source, batch_id, _ = key.split("/", 3)
        held = f"{QUARANTINE_PREFIX}/{source}/{batch_id}"
        event = store.get_json(f"{held}/quarantined.json")
        released = store.exists(f"{BATCHES_PREFIX}/{source}/{batch_id}.parquet")
        release = store.get_json(f"{held}/released.json") if released else None
        batches.append(
            {
                "batch_id": batch_id,
                "source": source,
                "status": "released" if released else "quarantined",
                "quarantined_on": event.get("date"),
                "reasons": event.get("quarantine_reasons", []),
                "accepted": event.get("accepted"),
                "rejected": event.get("rejected"),
                "release": release,
                "manifest": store.uri(key),
            }
        )
    return batches


def _find_quarantined(store: ObjectStore, batch_id: str) -> tuple[str, str]:
    matches = [b for b in quarantined_batches(store) if b["batch_id"] == batch_id]
    if not matches:
        raise IngestError(f"no quarantined batch {batch_id!r} (see `leukops quarantine list`)")
    return matches[0]["source"], matches[0]["status"]


def release_batch(
    store: ObjectStore,
    settings: Settings,
    batch_id: str,
    reason: str,
    *,
    run_date: str,
    released_by: str = "",
) -> dict[str, Any]:
    """Re-validate a quarantined batch with the current suite and publish it; the audit trail stays."""
    if not reason.strip():
        raise IngestError("a release needs a --reason (it is kept in the audit trail)")
    source_name, status = _find_quarantined(store, batch_id)
    if status == "released":
        raise IngestError(f"batch {batch_id} of {source_name} was already released")
    source, suite = load_source(source_name, settings), load_suite(settings)
    held = f"{QUARANTINE_PREFIX}/{source_name}/{batch_id}"
    frame = store.get_parquet(f"{held}/manifest.parquet").drop(columns=["status", "reason", "detail"])
    frame = frame.assign(suite_version=suite.version)
    with ThreadPoolExecutor(max_workers=8) as pool:
        validation, docs, result_uri = validate_and_report(
            store, frame, source, suite, batch_id, f"{REPORTS_PREFIX}/{run_date}/{batch_id}-release", pool
        )
    event = {
        "event": "released", "date": run_date, "reason": reason, "released_by": released_by,
        "revalidation": _summary(validation, source, batch_id) | {"data_docs": docs, "result": result_uri},
    }  # fmt: skip
    store.put_json(f"{held}/released.json", event)
    manifest = store.put_parquet(f"{BATCHES_PREFIX}/{source_name}/{batch_id}.parquet", validation.frame)
    return {**event, "batch_id": batch_id, "source": source_name, "manifest": manifest}
