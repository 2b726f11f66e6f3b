"""fsck's checks: orphans of each kind are found, in-flight uploads and healthy rows are not."""

from __future__ import annotations

import pandas as pd

from pipelines.data.fsck import (
    LEDGER_ROW_WITHOUT_SNAPSHOT,
    RAW_WITHOUT_MANIFEST,
    ROW_WITHOUT_OBJECT,
    fsck,
    ledger_rows_without_snapshot,
    raw_without_manifest,
    rows_without_object,
)
from pipelines.data.ledger_store import append_rows
from pipelines.data.manifests import manifest_frame
from pipelines.io import layout
from tests.unit.io.memory_bucket import MemoryBucket

A, B, C = "a" * 64, "b" * 64, "c" * 64


def manifest(*shas: str) -> pd.DataFrame:
    return manifest_frame(
        [
            {
                "row": i,
                "source": "lab",
                "batch_id": "b1",
                "path": f"x/{i}.png",
                "sha256": s,
                "key": layout.raw_key(s, "png"),
            }
            for i, s in enumerate(shas)
        ]
    )


def test_a_raw_object_no_row_names_is_an_orphan_unless_its_batch_is_in_flight() -> None:
    keys = [layout.raw_key(s, "png") for s in (A, B, C)]
    found = raw_without_manifest(keys, {keys[0]}, in_flight={C})
    assert [(p["kind"], p["key"]) for p in found] == [(RAW_WITHOUT_MANIFEST, keys[1])]


def test_a_row_whose_object_is_missing_names_its_batch_and_path() -> None:
    rows = manifest(A, B)
    found = rows_without_object(rows, {layout.raw_key(A, "png")})
    assert [p["kind"] for p in found] == [ROW_WITHOUT_OBJECT]
    assert "batch b1 of lab ('x/1.png')" in found[0]["detail"]


def test_ledger_rows_outside_every_snapshot_are_reported_per_sha() -> None:
    ledger = pd.DataFrame({"sha256": [A, B]})
    found = ledger_rows_without_snapshot("wbc", ledger, {A})
    assert [(p["kind"], p["sha256"], p["task"]) for p in found] == [(LEDGER_ROW_WITHOUT_SNAPSHOT, B, "wbc")]


def test_fsck_of_a_consistent_bucket_finds_nothing_and_counts_what_it_checked() -> None:
    bucket = MemoryBucket()
    for sha in (A, B):
        bucket.put_bytes(layout.raw_key(sha, "png"), b"png")
    bucket.put_parquet(layout.batch_manifest_key("lab", "b1"), manifest(A, B))
    append_rows(bucket, "wbc", pd.DataFrame({"sha256": [A, B], "split": ["train", "test"]}))
    bucket.put_parquet(layout.dataset_key("wbc", "v1"), pd.DataFrame({"sha256": [A, B]}))
    report = fsck(bucket)
    assert report["problems"] == []
    assert report["checked"] == {
        "raw_objects": 2,
        "manifest_rows": 2,
        "batches": 1,
        "in_flight_images": 0,
        "ledger_rows": {"wbc": 2},
    }
    bucket.put_bytes(layout.raw_key(C, "png"), b"planted")
    assert [p["key"] for p in fsck(bucket)["problems"]] == [layout.raw_key(C, "png")]
