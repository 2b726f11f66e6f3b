"""The MLflow tracking server of the embedded stack: backend store in the stack's PostgreSQL (database
``mlflow``, as in compose), artifacts proxied into S3, MLflow's basic-auth app in front.

The store persists across down/up with the Postgres cluster. The server alone holds the S3 keys:
clients upload and download artifacts through it (proxied artifact access). Every request but
``/health`` needs a user (``pipelines.io.mlflow_access``): the auth DB is a sqlite file in the stack dir,
named by the INI at ``MLFLOW_AUTH_CONFIG_PATH``; the first start creates the admin with the configured
password, and every start then provisions the role users (``ready``).
"""

from __future__ import annotations

import configparser
import io
import os
import urllib.request
from pathlib import Path
from typing import Any

from pipelines.core.settings import Settings
from pipelines.devstack.postgres import Postgres
from pipelines.devstack.processes import executable, port_of
from pipelines.io.mlflow_access import DEFAULT_PERMISSION, provision

READY_TIMEOUT_S = 120.0
HEALTH_TIMEOUT_S = 3
AUTH_APP = "basic-auth"
AUTH_FUNCTION = "mlflow.server.auth:authenticate_request_basic_auth"
# A verified credential is trusted this long per worker: each check is a deliberately slow scrypt hash
# (~0.2 s on 2 cores, in front of every request); a rotation through the API takes effect at once on the
# worker that handled it, on the others within this TTL.
AUTH_CACHE_TTL_S = 60


def auth_config(database_uri: str, admin_user: str) -> str:
    """The basic-auth app's INI (no secret in it: the admin password travels in MLFLOW_AUTH_ADMIN_PASSWORD)."""
    config = configparser.ConfigParser()
    config["mlflow"] = {
        "default_permission": DEFAULT_PERMISSION,
        "database_uri": database_uri,
        "admin_username": admin_user,
        "authorization_function": AUTH_FUNCTION,
        "auth_cache_ttl_seconds": str(AUTH_CACHE_TTL_S),
    }
    text = io.StringIO()
    config.write(text)
    return text.getvalue()


class MlflowServer:
    name = "mlflow"
    what = "MLflow"
    moved_by = "LEUKOPS_MLFLOW_TRACKING_URI"
    ready_timeout_s = READY_TIMEOUT_S

    def __init__(self, settings: Settings, stack_root: Path, postgres: Postgres) -> None:
        self.settings = settings
        self.postgres = postgres
        self.port = port_of(settings.mlflow_tracking_uri)
        self.home = stack_root / "mlflow"
        self.auth_config_path = self.home / "basic_auth.ini"
        self.provisioned = False

    def ports(self) -> dict[str, int]:
        return {"http": self.port}

    def prepare(self) -> None:
        """The auth INI (the run store is Postgres's `mlflow` database, created when Postgres is ready)."""
        self.home.mkdir(parents=True, exist_ok=True)
        database_uri = f"sqlite:///{(self.home / 'basic_auth.db').resolve()}"
        self.auth_config_path.write_text(auth_config(database_uri, self.settings.mlflow_admin_user))

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
            "--app-name",
            AUTH_APP,
        ]

    def env(self) -> dict[str, str]:
        return os.environ | {
            "MLFLOW_S3_ENDPOINT_URL": self.settings.s3_endpoint,
            "AWS_ACCESS_KEY_ID": self.settings.secret("s3_access_key"),
            "AWS_SECRET_ACCESS_KEY": self.settings.secret("s3_secret_key"),
            "AWS_DEFAULT_REGION": self.settings.s3_region,
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            "MLFLOW_AUTH_CONFIG_PATH": str(self.auth_config_path.resolve()),
            "MLFLOW_AUTH_ADMIN_PASSWORD": self.settings.secret("mlflow_users.admin"),  # first start only
            "MLFLOW_FLASK_SERVER_SECRET_KEY": self.settings.secret("mlflow_server_secret_key"),
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
        """Healthy, and the role users provisioned (once per start; a user already there is updated)."""
        if not self.healthy():
            return False
        if not self.provisioned:
            provision(self.settings)
            self.provisioned = True
        return True

    def status(self) -> dict[str, Any]:
        return {"uri": self.settings.mlflow_tracking_uri, "healthy": self.healthy()}
