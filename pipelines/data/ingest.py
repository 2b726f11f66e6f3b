"""Ingest one source: scan its files, plan the batch of its new decisions, upload, validate, publish.

The steps live in their own modules: ``scan`` (read, hash, measure), ``plan`` (batch id, dedupe, keys),
``validation`` (the GX suite and its reports) and ``quarantine`` (hold / list / release); this module
wires them and moves the bytes. The batch manifest is written last: published
(``layout.batch_manifest_key``) for an accepted batch, held (``layout.quarantined_manifest_key``) for a
quarantined one, so a crash before it leaves only immutable objects that a rerun reuses. While a
batch is in flight its (sha, label) pairs are kept under ``layout.inflight_batch_key`` so a concurrent
ingest of another source sees its labels (``plan.accepted_elsewhere``).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from pipelines.core.errors import LeukopsError
from pipelines.data.decisions import source_history
from pipelines.data.imagefacts import DEFAULT_MAX_PIXELS
from pipelines.data.manifests import all_manifests, manifest_frame, publish_manifest
from pipelines.data.plan import BatchPlan, file_record, place, plan_batch
from pipelines.data.quarantine import hold_batch, verdict_manifest_key
from pipelines.data.scan import DEFAULT_KEEP_BYTES, HashedFile, read_error, scan_files, scan_threads
from pipelines.data.sources import Source, list_files, reader_for
from pipelines.data.validation import Suite, Validation, load_suite, validate_and_report
from pipelines.io import layout
from pipelines.io.storage import sha256_hex

if TYPE_CHECKING:
    import pandas as pd

    from pipelines.core.settings import Settings
    from pipelines.data.sources import LocalReader, S3Reader
    from pipelines.io.storage import ObjectStore

Upload = tuple[str, bytes]  # (key, bytes) still to be put


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
    record_verdict: Callable[[IngestReport], None] | None = None,
) -> IngestReport:
    """Ingest the files of ``source`` new to it; ``run_date`` (YYYY-MM-DD) names the report folder.
    ``record_verdict`` gets the final report just before its manifest is published: a retry that fails
    after the publish still finds the verdict (the Airflow task alerts on it again).

    Files are read once when they fit in ``keep_bytes``; their uploads then run while GX validates
    the manifest (which does not depend on them), and the manifest is published only after both.
    """
    from tqdm import tqdm

    suite = suite or load_suite(settings)
    reader = reader_for(source, settings)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        known_rows = pool.submit(all_manifests, store, source.name)
        entries = list_files(source, reader)
        history = source_history(known_rows.result())
        known = history.examined()
        with (
            tqdm(total=len(entries), desc=f"scan {source.name}", unit="img", disable=not progress) as bar,
            ThreadPoolExecutor(max_workers=scan_threads(source, workers)) as scan_pool,
        ):
            scanned = scan_files(
                reader, entries, scan_pool, known, keep_bytes=keep_bytes, max_pixels=max_pixels, progress=bar.update
            )
        plan = plan_batch(store, source, suite.version, scanned, history, pool)
        already = len(scanned) - (len(plan.files) if plan else 0)
        if plan is None:
            return IngestReport(
                source.name,
                "nothing_new",
                f"nothing new in {source.location}: no objects, no batch created",
                files_seen=len(entries),
                already_ingested=already,
            )
        inflight = layout.inflight_batch_key(source.name, plan.batch_id)
        store.put_json(inflight, _intent(plan))
        rereads = any(h.sha256 is not None and h.data is None for h in plan.files)
        run = pool.map if rereads else map  # kept bytes need no I/O here: only re-reads are worth threads
        outcomes = list(run(lambda item: _process(plan, reader, store, *item), enumerate(plan.files)))
        records = [record for record, _ in outcomes]
        frame = manifest_frame(records).assign(suite_version=suite.version)
        uploads = [upload for _, upload in outcomes if upload is not None]
        report_prefix = layout.validation_report_prefix(run_date, plan.batch_id)
        validation, docs, result_uri = _upload_while_validating(
            store, uploads, frame, plan, suite, report_prefix, pool, progress
        )
    report = _report(source, plan.batch_id, validation, records, len(entries), already)
    report.data_docs, report.validation = docs, result_uri
    report.manifest = store.uri(verdict_manifest_key(report.to_dict()))
    if record_verdict is not None:
        record_verdict(report)
    report.manifest = _publish(store, source, plan.batch_id, validation, run_date)
    store.delete(inflight)
    return report


def _intent(plan: BatchPlan) -> dict[str, Any]:
    """What a concurrent ingest of another source needs of this batch: each sha's (first) label."""
    labels = {sha: files[0][0] for sha, files in plan.labels.items()}
    return {"source": plan.source.name, "batch_id": plan.batch_id, "labels": labels}


def _process(
    plan: BatchPlan, reader: LocalReader | S3Reader, store: ObjectStore, row: int, hashed: HashedFile
) -> tuple[dict[str, Any], Upload | None]:
    """Second pass for one file: its manifest record and upload. Bytes kept from the first pass are
    returned for upload later; a file that was not kept is re-read, verified and uploaded now. Never
    raises for a bad file."""
    record = file_record(plan, row, hashed)
    if hashed.sha256 is None:
        return record, None
    examined = hashed.examined or plan.history.newest[hashed.sha256]["examined"]  # known bytes: facts kept
    placed, upload = place(plan, row, {**record, **examined}, hashed.sha256)
    if not upload:
        return placed, None
    key, path = placed["key"], hashed.entry.path
    if hashed.data is not None:
        return placed, (key, hashed.data)
    try:
        data = reader.read(path)
    except (OSError, LeukopsError) as err:
        return {**record, "read_error": read_error(path, err)}, None
    if sha256_hex(data) != hashed.sha256:
        return {**record, "read_error": f"{path!r} changed while it was being ingested"}, None
    store.put_bytes(key, data)
    return placed, None


def _upload_while_validating(
    store: ObjectStore,
    uploads: list[Upload],
    frame: pd.DataFrame,
    plan: BatchPlan,
    suite: Suite,
    report_prefix: str,
    pool: ThreadPoolExecutor,
    progress: bool,
) -> tuple[Validation, str, str]:
    """GX validates the manifest while the uploads run (it needs the facts, not the objects); returns
    only when every upload has landed, so the manifest that names them can be published."""
    from tqdm import tqdm

    source = plan.source
    with tqdm(total=len(uploads), desc=f"upload {source.name}", unit="img", disable=not progress) as bar:
        futures = [pool.submit(store.put_bytes, key, data) for key, data in uploads]
        for future in futures:
            future.add_done_callback(lambda _: bar.update())
        validated = validate_and_report(store, frame, source, suite, plan.batch_id, report_prefix, pool)
        for future in futures:
            future.result()
    return validated


def _report(
    source: Source, batch_id: str, validation: Validation, records: list[dict[str, Any]], seen: int, already: int
) -> IngestReport:
    frame = validation.frame
    rejected = frame[frame["status"] == "rejected"]
    status = "quarantined" if validation.quarantined else "accepted"
    accepted = int((frame["status"] == "accepted").sum())
    message = f"batch {batch_id} of {source.name}: {accepted} accepted, {len(rejected)} rejected" + (
        f"; QUARANTINED ({'; '.join(validation.quarantine_reasons)})" if validation.quarantined else ""
    )
    return IngestReport(
        source=source.name,
        status=status,
        message=message,
        batch_id=batch_id,
        files_seen=seen,
        already_ingested=already,
        accepted=accepted,
        rejected=len(rejected),
        new_objects=sum(1 for r in records if r["created"]),
        cross_source_duplicates=int(frame["cross_source"].notna().sum()),
        rejections=[{"path": r.path, "reason": r.reason, "detail": r.detail} for r in rejected.itertuples()],
        quarantine_reasons=validation.quarantine_reasons,
    )


def _publish(store: ObjectStore, source: Source, batch_id: str, validation: Validation, run_date: str) -> str:
    if validation.quarantined:
        return hold_batch(store, source, batch_id, validation, run_date)
    return publish_manifest(store, source.name, batch_id, validation.frame)
