"""Least-privilege S3 identities and a versioned data bucket, against the session's real SeaweedFS."""

from __future__ import annotations

from datetime import date

import boto3
import pytest

from pipelines.devstack.seaweedfs import HEALTH_BUCKET, SeaweedFS
from pipelines.io import layout
from pipelines.io.storage import ObjectMissingError, ObjectStore, StorageAccessDenied, sha256_hex


def _admin_s3(settings):
    """A boto3 client of the admin pair: version listings are an operator's recovery tool, not leukops'."""
    return boto3.client(
        "s3",
        endpoint_url=settings.s3_endpoint,
        aws_access_key_id=settings.secret("s3_access_key"),
        aws_secret_access_key=settings.secret("s3_secret_key"),
        region_name=settings.s3_region,
    )


def _versions(settings, key: str) -> list[dict]:
    listing = _admin_s3(settings).list_object_versions(Bucket=settings.data_bucket, Prefix=key)
    return [v for v in listing.get("Versions", []) if v["Key"] == key]


def test_serving_key_cannot_write_raw(stack, settings, store) -> None:
    serving = ObjectStore.for_role(settings, "serving")
    key = layout.raw_key(sha256_hex(b"planted by serving"), "jpg")
    with pytest.raises(StorageAccessDenied, match="'serving' S3 identity.*LEUKOPS_S3_ROLES__SERVING__ACCESS_KEY"):
        serving.put_bytes(key, b"planted by serving")
    assert not store.exists(key)
    with pytest.raises(StorageAccessDenied):
        serving.get_bytes(layout.latest_dataset_pointer_key("any"))  # nor read the training data
    part = layout.request_log_part_key("2001-01-01", "roles-test")  # a day no drift window of the session reads
    serving.put_bytes(part, b"parquet bytes")  # its own request log: allowed
    assert store.get_bytes(part) == b"parquet bytes"


def test_ingest_key_writes_raw_but_not_drift_reports(stack, settings, store) -> None:
    ingest = ObjectStore.for_role(settings, "ingest")
    key = layout.raw_key(sha256_hex(b"ingested"), "png")
    ingest.put_bytes(key, b"ingested")
    assert store.get_bytes(key) == b"ingested"
    html, _ = layout.drift_report_keys(date(2026, 12, 1), "forged")
    with pytest.raises(StorageAccessDenied, match="'ingest'"):
        ingest.put_text(html, "<p>no drift</p>")
    assert not store.exists(html)


@pytest.mark.parametrize("role", ["training", "drift"])
def test_training_and_drift_keys_read_raw_but_cannot_overwrite_it(stack, settings, store, role) -> None:
    key = layout.raw_key(sha256_hex(b"original bytes"), "jpg")
    store.put_bytes(key, b"original bytes")
    other = ObjectStore.for_role(settings, role)
    assert other.get_bytes(key) == b"original bytes"
    with pytest.raises(StorageAccessDenied):
        other.put_bytes(key, b"tampered")
    assert store.get_bytes(key) == b"original bytes"


def test_drift_key_writes_its_reports(stack, settings, store) -> None:
    drift = ObjectStore.for_role(settings, "drift")
    drift.put_json(layout.drift_checked_batches_key("roles-test"), {"ids": []})
    assert store.get_json(layout.drift_checked_batches_key("roles-test")) == {"ids": []}


def test_deleted_and_overwritten_raw_objects_are_recoverable(stack, settings, store) -> None:
    assert store.versioning_enabled()
    key = layout.raw_key(sha256_hex(b"precious smear"), "jpg")
    store.put_bytes(key, b"precious smear")
    store.put_bytes(key, b"overwritten by mistake")
    store.client.remove_object(settings.data_bucket, key)  # past the adapter's refusal: the store must hold
    with pytest.raises(ObjectMissingError):
        store.get_bytes(key)
    versions = _versions(settings, key)
    assert len(versions) == 2, versions
    s3 = _admin_s3(settings)
    contents = [
        s3.get_object(Bucket=settings.data_bucket, Key=key, VersionId=v["VersionId"])["Body"].read() for v in versions
    ]
    assert sorted(contents) == [b"overwritten by mistake", b"precious smear"]
    restored = next(c for c in contents if c == b"precious smear")
    store.put_bytes(key, restored)  # the recovery: the old version becomes the current one again
    assert store.get_bytes(key) == b"precious smear"


def test_health_checks_add_no_versions_to_the_data_bucket(stack, settings) -> None:
    seaweed = next(s for s in stack.services if isinstance(s, SeaweedFS))
    assert all(seaweed.healthy() for _ in range(3))
    assert _versions(settings, layout.HEALTH_PROBE_KEY) == []
    probe = ObjectStore.from_settings(settings, bucket=HEALTH_BUCKET)
    assert probe.get_bytes(layout.HEALTH_PROBE_KEY).startswith(b"ok ")
    assert seaweed.status()["data_versioning"] is True
