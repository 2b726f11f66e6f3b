"""The least-privilege S3 identities, rendered for the two S3 servers leukops runs on.

``layout.ROLE_WRITES`` / ``ROLE_READS`` / ``ROLE_DELETES`` say which prefixes of the data bucket each role
writes, reads and deletes; this module turns them into SeaweedFS identity actions (the local stack's
identities file) and MinIO IAM policies (compose: ``infra/minio/policies/<role>.json``, regenerated with
``python -m pipelines.devstack.s3_roles infra/minio/policies``; a unit test fails when they drift).

SeaweedFS's actions are coarser than IAM: ``Write`` also allows DELETE (of versions too), ``List`` is
bucket-wide. MinIO's policies grant PUT only (and DELETE only under ``ROLE_DELETES``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from pipelines.core.settings import S3_ROLES, S3Role, Settings
from pipelines.io import layout
from pipelines.io.storage import role_key_settings

ADMIN_ACTIONS = ["Admin", "Read", "Write", "List", "Tagging"]
LANDING_READERS = frozenset({"ingest"})  # read any bucket: an S3 source names its landing bucket in its spec
MINIO_WRITE = ["s3:PutObject", "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"]
DEFAULT_DATA_BUCKET = "leukops-data"  # the bucket the committed MinIO policies name (compose's default)


def _object_pattern(bucket: str, prefix: str) -> str:
    return f"{bucket}/{prefix}/*" if prefix else bucket


def seaweed_actions(role: S3Role, data_bucket: str) -> list[str]:
    """The SeaweedFS identity actions of ``role``: reads, then one ``Write:<bucket>/<prefix>/*`` per prefix."""
    if role in LANDING_READERS:
        reads = ["Read", "List"]
    elif layout.ROLE_READS[role] == ("",):
        reads = [f"Read:{data_bucket}", f"List:{data_bucket}"]
    else:  # no List: a HEAD of a missing key still answers 404 on SeaweedFS
        reads = [f"Read:{_object_pattern(data_bucket, p)}" for p in layout.ROLE_READS[role]]
    return reads + [f"Write:{_object_pattern(data_bucket, p)}" for p in layout.ROLE_WRITES[role]]


def _identity(name: str, access_key: str, secret_key: str, actions: list[str]) -> dict[str, Any]:
    return {"name": name, "credentials": [{"accessKey": access_key, "secretKey": secret_key}], "actions": actions}


def seaweed_identities(settings: Settings) -> dict[str, Any]:
    """The identities file: the admin pair (the stack itself: buckets, versioning, the MLflow server) and
    one identity per role, each with its own key pair from ``settings.s3_roles``."""
    admin = _identity("admin", settings.secret("s3_access_key"), settings.secret("s3_secret_key"), ADMIN_ACTIONS)
    roles = [
        _identity(
            role,
            *(settings.secret(path) for path in role_key_settings(role)),
            seaweed_actions(role, settings.data_bucket),
        )
        for role in S3_ROLES
    ]
    return {"identities": [admin, *roles]}


def _allow(actions: list[str], resources: list[str]) -> dict[str, Any]:
    return {"Effect": "Allow", "Action": actions, "Resource": [f"arn:aws:s3:::{r}" for r in resources]}


def minio_policy(role: S3Role, data_bucket: str = DEFAULT_DATA_BUCKET) -> dict[str, Any]:
    """The MinIO (IAM) policy of ``role``. Every role may list the data bucket: without ListBucket a HEAD of
    a missing key answers 403 instead of 404 on MinIO (serving's request log asks whether an image is kept)."""
    read_prefixes = layout.ROLE_READS[role]
    read_buckets = ["*"] if role in LANDING_READERS else [data_bucket]
    if read_prefixes == ("",):
        reads = [f"{bucket}/*" for bucket in read_buckets]
    else:
        reads = [_object_pattern(data_bucket, p) for p in read_prefixes]
    statements = [
        _allow(["s3:GetBucketLocation", "s3:ListBucket"], read_buckets),
        _allow(["s3:GetObject"], reads),
        _allow(MINIO_WRITE, [_object_pattern(data_bucket, p) for p in layout.ROLE_WRITES[role]]),
    ]
    if deletes := layout.ROLE_DELETES.get(role):
        statements.append(_allow(["s3:DeleteObject"], [_object_pattern(data_bucket, p) for p in deletes]))
    return {"Version": "2012-10-17", "Statement": statements}


def policy_file_text(role: S3Role, data_bucket: str = DEFAULT_DATA_BUCKET) -> str:
    return json.dumps(minio_policy(role, data_bucket), indent=2) + "\n"


def write_minio_policies(folder: Path, data_bucket: str = DEFAULT_DATA_BUCKET) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for role in S3_ROLES:
        path = folder / f"{role}.json"
        path.write_text(policy_file_text(role, data_bucket))
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the MinIO policy of every leukops S3 role.")
    parser.add_argument("folder", type=Path, help="e.g. infra/minio/policies")
    parser.add_argument("--data-bucket", default=DEFAULT_DATA_BUCKET)
    args = parser.parse_args(argv)
    for path in write_minio_policies(args.folder, args.data_bucket):
        print(path)


if __name__ == "__main__":
    main()
