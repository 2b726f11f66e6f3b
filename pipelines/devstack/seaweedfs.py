"""SeaweedFS as the embedded S3 server: one ``weed server`` (master, volume, filer, S3 gateway).

Its internal services (master, volume, filer and their gRPC ports) sit just above the S3 port, never on
their defaults (the volume server's 8080 is Airflow's api-server port). Volumes live under
``<stack root>/seaweed`` and persist across down/up. The identities file holds the admin pair (the stack
itself) and one least-privilege identity per role (``devstack/s3_roles``). The data bucket is versioned
(an overwritten or deleted object stays recoverable by version id; SeaweedFS has no object lock here), and
health checks round-trip an object in a bucket of their own, never adding versions to the data bucket.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from pipelines.core.settings import Settings
from pipelines.devstack.processes import executable, port_of
from pipelines.devstack.s3_roles import seaweed_identities
from pipelines.io.layout import HEALTH_PROBE_KEY
from pipelines.io.storage import ObjectStore, StorageError

READY_TIMEOUT_S = 60.0
VOLUME_SIZE_LIMIT_MB = 256
# A fixed volume count: weed's default (0) sizes it as free disk / volume size, so a fuller disk leaves
# too few slots and PUTs to a new bucket fail with 500s. One volume per new bucket, not weed's seven.
MAX_VOLUMES = 400
VOLUMES_PER_NEW_BUCKET = "1"
HEALTH_BUCKET = "leukops-health"  # the health probe's own bucket (unversioned, no data)


def seaweed_ports(s3_port: int) -> dict[str, int]:
    return {
        "s3": s3_port,
        "master": s3_port + 1,
        "volume": s3_port + 2,
        "filer": s3_port + 3,
        "s3.grpc": s3_port + 10,
        "master.grpc": s3_port + 11,
        "volume.grpc": s3_port + 12,
        "filer.grpc": s3_port + 13,
    }


class SeaweedFS:
    name = "s3"
    what = "SeaweedFS"
    moved_by = "LEUKOPS_S3_ENDPOINT"
    ready_timeout_s = READY_TIMEOUT_S

    def __init__(self, settings: Settings, stack_root: Path) -> None:
        self.settings = settings
        self.data_dir = stack_root / "seaweed"
        self.identities_file = stack_root / "s3-identities.json"
        self.s3_port = port_of(settings.s3_endpoint)

    def ports(self) -> dict[str, int]:
        return seaweed_ports(self.s3_port)

    def prepare(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._write_identities()

    def _write_identities(self) -> None:
        tmp = self.identities_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(seaweed_identities(self.settings)))
        tmp.chmod(0o600)  # holds the secret keys
        tmp.replace(self.identities_file)

    def command(self) -> list[str]:
        p = self.ports()
        return [
            executable("weed"),
            "server",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master.grpc']}",
            f"-master.volumeSizeLimitMB={VOLUME_SIZE_LIMIT_MB}",
            "-master.telemetry=false",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume.grpc']}",
            f"-volume.max={MAX_VOLUMES}",
            "-volume.preStopSeconds=0",  # the 10 s default only drains a load balancer we don't have
            "-filer",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer.grpc']}",
            "-s3",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3.grpc']}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={self.identities_file}",
        ]

    def env(self) -> dict[str, str]:
        return os.environ | {"WEED_MASTER_VOLUME_GROWTH_COPY_1": VOLUMES_PER_NEW_BUCKET}

    def _store(self, bucket: str) -> ObjectStore:
        """A client that fails at once (no retries): readiness polling does the retrying."""
        store = ObjectStore.from_settings(self.settings, bucket)
        store.retries = 0
        return store

    def healthy(self) -> bool:
        """Healthy = the health bucket takes a real PUT and gives the same bytes back (the gateway answers
        bucket calls before the volumes take writes), and the data bucket is there (a HEAD, no write)."""
        try:
            probe = self._store(HEALTH_BUCKET)
            payload = f"ok {time.time_ns()}".encode()
            probe.put_bytes(HEALTH_PROBE_KEY, payload)
            if probe.get_bytes(HEALTH_PROBE_KEY) != payload:
                return False
            self._store(self.settings.data_bucket).check()
        except StorageError:
            return False
        return True

    def ready(self) -> bool:
        """The buckets exist (created on first start), the data bucket is versioned, and the store is healthy."""
        try:
            for bucket in (self.settings.data_bucket, self.settings.artifacts_bucket, HEALTH_BUCKET):
                self._store(bucket).ensure_bucket()
            self._store(self.settings.data_bucket).enable_versioning()
        except StorageError:
            return False
        return self.healthy()

    def status(self) -> dict[str, Any]:
        try:
            versioned = self._store(self.settings.data_bucket).versioning_enabled()
        except StorageError:
            versioned = None
        return {"endpoint": self.settings.s3_endpoint, "healthy": self.healthy(), "data_versioning": versioned}
