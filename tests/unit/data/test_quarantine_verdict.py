"""An ingest verdict is trusted on a retry only once the manifest it names has landed."""

from __future__ import annotations

import pandas as pd

from pipelines.data.quarantine import verdict_landed, verdict_manifest_key
from pipelines.io import layout
from tests.unit.io.memory_bucket import MemoryBucket


def verdict(status: str) -> dict:
    return {"status": status, "source": "lab", "batch_id": "b1"}


def test_each_verdict_names_the_manifest_its_batch_is_published_or_held_under() -> None:
    assert verdict_manifest_key(verdict("quarantined")) == layout.quarantined_manifest_key("lab", "b1")
    assert verdict_manifest_key(verdict("accepted")) == layout.batch_manifest_key("lab", "b1")
    assert verdict_manifest_key(verdict("nothing_new")) is None


def test_a_verdict_counts_only_when_its_manifest_exists() -> None:
    bucket = MemoryBucket()
    assert not verdict_landed(bucket, verdict("quarantined"))  # recorded, then S3 failed before the hold
    bucket.put_parquet(layout.quarantined_manifest_key("lab", "b1"), pd.DataFrame({"row": [0]}))
    assert verdict_landed(bucket, verdict("quarantined"))
    assert verdict_landed(bucket, verdict("nothing_new"))
