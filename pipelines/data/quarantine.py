"""Quarantine: hold a batch the suite refused, list the held batches, release one with a reason.

A held batch keeps its manifest, its validation result and an audit record under its quarantine
prefix (``layout.quarantined_batch_prefix``); none of it is ever deleted. Releasing re-validates the
manifest with the current suite, records who released it and why, and publishes it: snapshots then
see its accepted rows like those of any other batch.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from pipelines.core.errors import LeukopsError
from pipelines.data.manifests import held_manifest_keys, publish_manifest
from pipelines.data.sources import load_source
from pipelines.data.validation import Validation, batch_summary, load_suite, validate_and_report
from pipelines.io import layout

if TYPE_CHECKING:
    from pipelines.core.settings import Settings
    from pipelines.data.sources import Source
    from pipelines.io.storage import ObjectStore


class QuarantineError(LeukopsError):
    pass


def hold_batch(store: ObjectStore, source: Source, batch_id: str, validation: Validation, run_date: str) -> str:
    """Keep a quarantined batch for triage; the manifest is written last, as for a published one."""
    held = layout.quarantined_batch_prefix(source.name, batch_id)
    summary = batch_summary(validation, source, batch_id)
    store.put_json(layout.validation_result_key(held), {**summary, "gx": validation.result})
    store.put_json(
        layout.quarantine_event_key(source.name, batch_id, "quarantined"),
        {"event": "quarantined", "date": run_date, **summary},
    )
    return store.put_parquet(layout.quarantined_manifest_key(source.name, batch_id), validation.frame)


def verdict_manifest_key(report: dict[str, Any]) -> str | None:
    """The manifest an ingest verdict (``IngestReport.to_dict()``) publishes: held when quarantined,
    published when accepted; None when there was nothing new."""
    if report["status"] == "quarantined":
        return layout.quarantined_manifest_key(report["source"], report["batch_id"])
    if report["status"] == "accepted":
        return layout.batch_manifest_key(report["source"], report["batch_id"])
    return None


def verdict_landed(store: ObjectStore, report: dict[str, Any]) -> bool:
    """Is a stored verdict's batch published (or held)? A verdict is recorded before its manifest, so a
    retry that finds one without its manifest ingests again (the same batch) instead of trusting it."""
    key = verdict_manifest_key(report)
    return key is None or store.exists(key)


def quarantined_batches(store: ObjectStore) -> list[dict[str, Any]]:
    """Every batch ever quarantined, with its reasons and whether (and why) it was released."""
    return [_held_batch(store, key) for key in held_manifest_keys(store)]


def _held_batch(store: ObjectStore, manifest_key: str) -> dict[str, Any]:
    source, batch_id = layout.batch_of_quarantined_manifest_key(manifest_key)
    event = store.get_json(layout.quarantine_event_key(source, batch_id, "quarantined"))
    released = store.exists(layout.batch_manifest_key(source, batch_id))
    release = store.get_json(layout.quarantine_event_key(source, batch_id, "released")) if released else None
    return {
        "batch_id": batch_id,
        "source": source,
        "status": "released" if released else "quarantined",
        "quarantined_on": event.get("date"),
        "reasons": event.get("quarantine_reasons", []),
        "accepted": event.get("accepted"),
        "rejected": event.get("rejected"),
        "release": release,
        "manifest": store.uri(manifest_key),
    }


def _find_quarantined(store: ObjectStore, batch_id: str) -> tuple[str, str]:
    matches = [b for b in quarantined_batches(store) if b["batch_id"] == batch_id]
    if not matches:
        raise QuarantineError(f"no quarantined batch {batch_id!r} (see `leukops quarantine list`)")
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
        raise QuarantineError("a release needs a --reason (it is kept in the audit trail)")
    source_name, status = _find_quarantined(store, batch_id)
    if status == "released":
        raise QuarantineError(f"batch {batch_id} of {source_name} was already released")
    source, suite = load_source(source_name, settings), load_suite(settings)
    frame = store.get_parquet(layout.quarantined_manifest_key(source_name, batch_id))
    frame = frame.drop(columns=["status", "reason", "detail"]).assign(suite_version=suite.version)
    with ThreadPoolExecutor(max_workers=8) as pool:
        validation, docs, result_uri = validate_and_report(
            store, frame, source, suite, batch_id, layout.release_report_prefix(run_date, batch_id), pool
        )
    event = {
        "event": "released",
        "date": run_date,
        "reason": reason,
        "released_by": released_by,
        "revalidation": batch_summary(validation, source, batch_id) | {"data_docs": docs, "result": result_uri},
    }
    store.put_json(layout.quarantine_event_key(source_name, batch_id, "released"), event)
    manifest = publish_manifest(store, source_name, batch_id, validation.frame)
    return {**event, "batch_id": batch_id, "source": source_name, "manifest": manifest}
