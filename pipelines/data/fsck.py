"""`leukops fsck`: does the bucket agree with its manifests and split ledgers?

Three checks, each a pure function of listings and frames (so unit tests need no server):

- **raw object without a manifest row**: a ``raw/`` original that no manifest (published or held)
  names and no in-flight batch is uploading: an ingest that crashed after its uploads and before its
  manifest. Rerunning that ingest publishes the batch and claims the object.
- **manifest row without an object**: a row whose ``key`` names an object that is not in the bucket.
- **ledger row without a snapshot**: a split-ledger row whose image is in no stored dataset snapshot
  of its task: a snapshot that committed the ledger and failed before writing its dataset (rerun
  ``leukops snapshot --task <task>``).

The report is ``{"problems": [{"kind", "key"/"sha256", "detail"}...], "checked": {counts}}``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pipelines.core.taxonomy import TASKS
from pipelines.data.ledger_store import read_ledger
from pipelines.data.manifests import all_manifests
from pipelines.io import layout

if TYPE_CHECKING:
    import pandas as pd

    from pipelines.io.storage import ObjectStore

RAW_WITHOUT_MANIFEST = "raw_without_manifest"
ROW_WITHOUT_OBJECT = "manifest_row_without_object"
LEDGER_ROW_WITHOUT_SNAPSHOT = "ledger_row_without_snapshot"


def raw_without_manifest(raw_keys: list[str], named_keys: set[str], in_flight: set[str]) -> list[dict[str, Any]]:
    """Raw objects no manifest row names (objects of in-flight batches are not orphans yet)."""
    return [
        {"kind": RAW_WITHOUT_MANIFEST, "key": key, "detail": "no manifest row names this original"}
        for key in raw_keys
        if key not in named_keys and layout.sha_of_raw_key(key) not in in_flight
    ]


def rows_without_object(manifests: pd.DataFrame, objects: set[str]) -> list[dict[str, Any]]:
    """Manifest rows whose ``key`` is not in the bucket."""
    named = manifests[manifests["key"].notna()]
    missing = named[~named["key"].isin(objects)]
    return [
        {
            "kind": ROW_WITHOUT_OBJECT,
            "key": row.key,
            "detail": f"row {row.row} of batch {row.batch_id} of {row.source} ({row.path!r}) names a missing object",
        }
        for row in missing.itertuples()
    ]


def ledger_rows_without_snapshot(task: str, ledger: pd.DataFrame, snapshot_shas: set[str]) -> list[dict[str, Any]]:
    """Ledger rows of ``task`` whose image is in none of the task's stored snapshots."""
    orphans = sorted(set(ledger["sha256"].dropna()) - snapshot_shas)
    return [
        {
            "kind": LEDGER_ROW_WITHOUT_SNAPSHOT,
            "sha256": sha,
            "task": task,
            "detail": f"in the {task} split ledger but in no stored {task} snapshot (rerun `leukops snapshot`)",
        }
        for sha in orphans
    ]


# -- S3 edge ------------------------------------------------------------------------------------------------


def in_flight_shas(store: ObjectStore) -> set[str]:
    """Shas of batches being ingested now (``layout.inflight_batch_key``: their uploads precede the manifest)."""
    shas: set[str] = set()
    for key in store.list(layout.inflight_dir()):
        shas.update(store.get_json(key).get("labels", {}))
    return shas


def snapshot_shas(store: ObjectStore, task: str) -> set[str]:
    shas: set[str] = set()
    for key in store.list(layout.dataset_dir(task)):
        if key.endswith(".parquet"):
            shas.update(store.get_parquet(key)["sha256"].dropna())
    return shas


def check_ledgers(store: ObjectStore) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Problems and rows checked per task that has a ledger."""
    problems: list[dict[str, Any]] = []
    rows: dict[str, int] = {}
    for task in sorted(TASKS):
        ledger = read_ledger(store, task).frame
        if len(ledger):
            rows[task] = len(ledger)
            problems += ledger_rows_without_snapshot(task, ledger, snapshot_shas(store, task))
    return problems, rows


def fsck(store: ObjectStore) -> dict[str, Any]:
    """Every problem found, and what was checked."""
    raw_keys = store.list(f"{layout.RAW_SHARDS}/")
    objects = set(raw_keys) | set(store.list(layout.quarantine_dir()))
    manifests = all_manifests(store)
    in_flight = in_flight_shas(store)
    ledger_problems, ledger_rows = check_ledgers(store)
    problems = (
        raw_without_manifest(raw_keys, set(manifests["key"].dropna()), in_flight)
        + rows_without_object(manifests, objects)
        + ledger_problems
    )
    checked = {
        "raw_objects": len(raw_keys),
        "manifest_rows": len(manifests),
        "batches": int(manifests["batch_id"].nunique()),
        "in_flight_images": len(in_flight),
        "ledger_rows": ledger_rows,
    }
    return {"problems": problems, "checked": checked}
