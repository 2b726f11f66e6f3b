"""The MLflow tracking server of the embedded stack: backend store in the stack's PostgreSQL (database
``mlflow``, as in compose), artifacts proxied into S3.

The store persists across down/up with the Postgres cluster. The server alone holds the S3 keys:
clients upload and download artifacts through it (proxied artifact access).
"""

from __future__ import annotations

import os
import urllib.request
from pathlib import Path
from typing import Any

from pipelines.core.settings import Settings
from pipelines.devstack.postgres import Postgres
from pipelines.devstack.processes import executable, port_of

READY_TIMEOUT_S = 120.0
HEALTH_TIMEOUT_S = 3


class MlflowServer:
    name = "mlflow"
    what = "MLflow"
    moved_by = "LEUKOPS_MLFLOW_TRACKING_URI"
    ready_timeout_s = READY_TIMEOUT_S

    def __init__(self, settings: Settings, stack_root: Path, postgres: Postgres) -> None:
        self.settings = settings
        self.postgres = postgres
        self.port = port_of(settings.mlflow_tracking_uri)

    def ports(self) -> dict[str, int]:
        return {"http": self.port}

    def prepare(self) -> None:
        pass  # the store is Postgres's `mlflow` database, created when Postgres is ready

    def command(self) -> list[str]:
        return [
            executable("mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
            "--backend-store-uri",
            self.postgres.sqlalchemy_url("mlflow"),
            "--artifacts-destination",
            f"s3://{self.settings.artifacts_bucket}/",
        ]

    def env(self) -> dict[str, str]:
        return os.environ | {
            "MLFLOW_S3_ENDPOINT_URL": self.settings.s3_endpoint,
            "AWS_ACCESS_KEY_ID": self.settings.secret("s3_access_key"),
            "AWS_SECRET_ACCESS_KEY": self.settings.secret("s3_secret_key"),
            "AWS_DEFAULT_REGION": self.settings.s3_region,
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "DO_NOT_TRACK": "true",
        }

    def healthy(self) -> bool:
        url = f"{self.settings.mlflow_tracking_uri}/health"
        try:
            with urllib.request.urlopen(url, timeout=HEALTH_TIMEOUT_S) as response:
                return response.status == 200
        except OSError:
            return False

    def ready(self) -> bool:
        return self.healthy()

    def status(self) -> dict[str, Any]:
        return {"uri": self.settings.mlflow_tracking_uri, "healthy": self.healthy()}
