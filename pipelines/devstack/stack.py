"""The embedded local stack: its services started, checked and stopped together.

Every service runs as a background process owned by this state dir (``<state_dir>/stack``): pid files
record what we started, so ``down`` stops only our processes, and each service's data persists across
down/up. Ports come from the settings' endpoints. Services start in order (MLflow stores its artifacts
in S3 and its runs in Postgres, so those first) and stop in reverse order; a new service is one more
module with the same shape. Airflow's components (``airflow_services``) start on top with
``leukops airflow up``; ``down`` stops them first, with the rest. In the dev profile ``up`` also makes
the dev promotion key pair (``<state_dir>/keys``, once): promotion signs with it and serving verifies
with it (``pipelines.trust.attestation``).
"""

from __future__ import annotations

from typing import Any, Protocol

from pipelines.core.settings import Settings
from pipelines.devstack.airflow_services import AirflowServices
from pipelines.devstack.mlflow_server import MlflowServer
from pipelines.devstack.postgres import Postgres
from pipelines.devstack.processes import ProcessDir, StackError, busy_ports
from pipelines.devstack.redis_server import RedisServer
from pipelines.devstack.seaweedfs import SeaweedFS
from pipelines.trust.attestation import ensure_dev_key_pair

STOP_TIMEOUT_S = 5.0


class Service(Protocol):
    name: str  # pid/log file name and key in ``status``
    what: str  # the product, for messages
    moved_by: str  # the setting that moves its ports
    ready_timeout_s: float

    def ports(self) -> dict[str, int]: ...
    def prepare(self) -> None: ...  # data dirs and config files, before a start
    def command(self) -> list[str]: ...
    def env(self) -> dict[str, str]: ...
    def ready(self) -> bool: ...  # start-up check (may create what the service must hold)
    def status(self) -> dict[str, Any]: ...  # endpoint and health


class LocalStack:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.root = (settings.state_dir / "stack").resolve()
        self.processes = ProcessDir(self.root)
        self.postgres = Postgres(settings, self.root)
        self.redis = RedisServer(settings, self.root)
        self.services: tuple[Service, ...] = (
            SeaweedFS(settings, self.root),
            self.postgres,
            self.redis,
            MlflowServer(settings, self.root, self.postgres),
        )
        self.airflow = AirflowServices(settings, self.processes, self.postgres, self.redis)

    def pids(self) -> dict[str, int]:
        """Every process of this state dir that is running: the services, then Airflow's components."""
        services = {s.name: pid for s in self.services if (pid := self.processes.pid(s.name)) is not None}
        return services | self.airflow.pids()

    def status(self) -> dict[str, Any]:
        services = {s.name: {**s.status(), "pid": self.processes.pid(s.name)} for s in self.services}
        return {**services, "airflow": self.airflow.status(), "state_dir": str(self.root)}

    def up(self) -> dict[str, Any]:
        """Start what is not running yet, in order, each waited for before the next."""
        if self.settings.profile == "dev":
            ensure_dev_key_pair(self.settings)
        for service in self.services:
            if self.processes.pid(service.name) is None:
                self._check_ports(service)
                service.prepare()
                self.processes.spawn(service.name, service.command(), service.env())
            self.processes.wait_ready(service.name, service.ready, service.ready_timeout_s)
        return self.status()

    def _check_ports(self, service: Service) -> None:
        busy = busy_ports(service.ports())
        if busy:
            listing = ", ".join(f"{name}={port}" for name, port in busy.items())
            settings = " / ".join(s.moved_by for s in self.services)
            raise StackError(
                f"cannot start {service.what}: port(s) already in use ({listing}). Stop what holds them, or "
                f"move the stack with {settings}"
            )

    def down(self, timeout_s: float = STOP_TIMEOUT_S) -> dict[str, int]:
        """Stop the processes this state dir started (their whole process groups); return what was stopped.

        SeaweedFS's filer waits 15 s for its streaming gRPC clients before it stops; writes already sit in
        the page cache, so after a short grace the group is killed without losing acknowledged objects.
        """
        stopped = self.airflow.down(timeout_s)
        for service in reversed(self.services):
            pid = self.processes.stop(service.name, timeout_s)
            if pid is not None:
                stopped[service.name] = pid
        return stopped
