"""The embedded local stack: a real S3 server (SeaweedFS) and a real MLflow tracking server.

Both run as background processes owned by this state dir (``<state_dir>/stack``): pid files record
what we started, so ``down`` stops only our processes, and data (SeaweedFS volumes, the MLflow sqlite
store) persists across down/up. Ports come from the settings' endpoints; SeaweedFS's internal services
(master, volume, filer and their gRPC ports) sit just above the S3 port, never on their defaults
(the volume server's 8080 is Airflow's api-server port).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from pipelines.core.errors import LeukopsError
from pipelines.core.settings import Settings
from pipelines.io.storage import ObjectStore, StorageError

S3_READY_TIMEOUT_S = 60.0
MLFLOW_READY_TIMEOUT_S = 120.0
VOLUME_SIZE_LIMIT_MB = 256


class StackError(LeukopsError):
    pass


@dataclass(frozen=True)
class Service:
    name: str
    ports: dict[str, int]


def _port(url: str) -> int:
    parsed = urlparse(url)
    if parsed.port is None:
        raise StackError(f"{url!r} has no explicit port; the embedded stack needs one")
    return parsed.port


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


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _bin(name: str) -> str:
    """An executable from this interpreter's environment (the venv), else from PATH."""
    candidate = Path(sys.executable).parent / name
    found = str(candidate) if candidate.exists() else shutil.which(name)
    if not found:
        raise StackError(f"{name!r} not found; install the project (`make install`)")
    return found


class LocalStack:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.root = (settings.state_dir / "stack").resolve()
        self.s3_port = _port(settings.s3_endpoint)
        self.mlflow_port = _port(settings.mlflow_tracking_uri)
        self._started: dict[str, subprocess.Popen] = {}

    # -- paths and pids ----------------------------------------------------------------------------

    def _pidfile(self, name: str) -> Path:
        return self.root / "pids" / f"{name}.pid"

    def _logfile(self, name: str) -> Path:
        return self.root / "logs" / f"{name}.log"

    def _pid(self, name: str) -> int | None:
        """The pid we recorded for ``name`` if that process is still ours (guards against pid reuse)."""
        pidfile = self._pidfile(name)
        if not pidfile.exists():
            return None
        pid = int(pidfile.read_text().strip())
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            return None
        return pid if str(self.root) in cmdline else None

    def pids(self) -> dict[str, int]:
        return {name: pid for name in ("s3", "mlflow") if (pid := self._pid(name)) is not None}

    # -- health -------------------------------------------------------------------------------------

    def store(self, bucket: str | None = None) -> ObjectStore:
        return ObjectStore.from_settings(self.settings, bucket)

    def s3_healthy(self) -> bool:
        """Healthy = the data bucket takes a real PUT and gives the same bytes back."""
        try:
            store = ObjectStore(
                self.settings.s3_host,
                self.settings.secret("s3_access_key"),
                self.settings.secret("s3_secret_key"),
                self.settings.data_bucket,
                region=self.settings.s3_region,
                secure=self.settings.s3_secure,
                retries=0,
            )
            payload = f"ok {time.time_ns()}".encode()
            store.put_bytes("_health/ping", payload)
            return store.get_bytes("_health/ping") == payload
        except StorageError:
            return False

    def mlflow_healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.settings.mlflow_tracking_uri}/health", timeout=3) as response:
                return response.status == 200
        except OSError:
            return False

    def status(self) -> dict:
        return {
            "s3": {"endpoint": self.settings.s3_endpoint, "healthy": self.s3_healthy(), "pid": self._pid("s3")},
            "mlflow": {
                "uri": self.settings.mlflow_tracking_uri,
                "healthy": self.mlflow_healthy(),
                "pid": self._pid("mlflow"),
            },
            "state_dir": str(self.root),
        }

    # -- start --------------------------------------------------------------------------------------

    def up(self) -> dict:
        for sub in ("pids", "logs", "seaweed", "mlflow"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        if self._pid("s3") is None:
            self._check_ports("SeaweedFS", seaweed_ports(self.s3_port))
            self._spawn("s3", self._seaweed_command(), env=os.environ.copy())
        self._wait("s3", self._s3_ready, S3_READY_TIMEOUT_S)
        if self._pid("mlflow") is None:
            self._check_ports("MLflow", {"http": self.mlflow_port})
            self._spawn("mlflow", self._mlflow_command(), env=self._mlflow_env())
        self._wait("mlflow", self.mlflow_healthy, MLFLOW_READY_TIMEOUT_S)
        return self.status()

    def _check_ports(self, what: str, ports: dict[str, int]) -> None:
        busy = {name: port for name, port in ports.items() if not port_is_free(port)}
        if busy:
            listing = ", ".join(f"{name}={port}" for name, port in busy.items())
            raise StackError(
                f"cannot start {what}: port(s) already in use ({listing}). Stop what holds them, or move the "
                "stack with LEUKOPS_S3_ENDPOINT / LEUKOPS_MLFLOW_TRACKING_URI"
            )

    def _identities_file(self) -> Path:
        path = self.root / "s3-identities.json"
        identities = {
            "identities": [
                {
                    "name": "leukops",
                    "credentials": [
                        {
                            "accessKey": self.settings.secret("s3_access_key"),
                            "secretKey": self.settings.secret("s3_secret_key"),
                        }
                    ],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(identities))
        tmp.chmod(0o600)
        tmp.replace(path)
        return path

    def _seaweed_command(self) -> list[str]:
        p = seaweed_ports(self.s3_port)
        return [
            _bin("weed"),
            "server",
            f"-dir={self.root / 'seaweed'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master.grpc']}",
            f"-master.volumeSizeLimitMB={VOLUME_SIZE_LIMIT_MB}",
            "-master.telemetry=false",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume.grpc']}",
            "-volume.max=0",
            "-volume.preStopSeconds=0",  # the 10 s default only drains a load balancer we don't have
            "-filer",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer.grpc']}",
            "-s3",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3.grpc']}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={self._identities_file()}",
        ]

    def _mlflow_command(self) -> list[str]:
        db = self.root / "mlflow" / "mlflow.db"
        return [
            _bin("mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.mlflow_port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{db}",
            "--artifacts-destination",
            f"s3://{self.settings.artifacts_bucket}/",
        ]

    def _mlflow_env(self) -> dict[str, str]:
        env = os.environ.copy()
        env.update(
            {
                # S3 keys live in the server's environment only: clients use proxied artifact access.
                "MLFLOW_S3_ENDPOINT_URL": self.settings.s3_endpoint,
                "AWS_ACCESS_KEY_ID": self.settings.secret("s3_access_key"),
                "AWS_SECRET_ACCESS_KEY": self.settings.secret("s3_secret_key"),
                "AWS_DEFAULT_REGION": self.settings.s3_region,
                "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
                "MLFLOW_DISABLE_TELEMETRY": "true",
                "DO_NOT_TRACK": "true",
            }
        )
        return env

    def _spawn(self, name: str, command: list[str], env: dict[str, str]) -> None:
        log = self._logfile(name).open("ab")
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            cwd=self.root, start_new_session=True,
        )
        self._pidfile(name).write_text(str(process.pid))
        self._started[name] = process

    def _s3_ready(self) -> bool:
        try:
            for bucket in (self.settings.data_bucket, self.settings.artifacts_bucket):
                store = self.store(bucket)
                store.retries = 0
                store.ensure_bucket()
        except StorageError:
            return False
        return self.s3_healthy()

    def _wait(self, name: str, ready, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if ready():
                return
            started = self._started.get(name)
            exited = started.poll() is not None if started else self._pid(name) is None
            if exited:
                raise StackError(f"{name} exited during start-up; last log lines:\n{self._log_tail(name)}")
            time.sleep(0.5)
        raise StackError(f"{name} not ready after {timeout_s:.0f}s; last log lines:\n{self._log_tail(name)}")

    def _log_tail(self, name: str, lines: int = 20) -> str:
        path = self._logfile(name)
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else "(no log)"

    # -- stop ---------------------------------------------------------------------------------------

    def down(self, timeout_s: float = 5.0) -> dict[str, int]:
        """Stop the processes this state dir started (their whole process groups); return what was stopped.

        SeaweedFS's filer waits 15 s for its streaming gRPC clients before it stops; writes already sit in
        the page cache, so after a short grace the group is killed without losing acknowledged objects.
        """
        stopped = {}
        for name in ("mlflow", "s3"):
            pid = self._pid(name)
            if pid is not None:
                _terminate_group(pid, timeout_s)
                stopped[name] = pid
            if name in self._started:
                self._started.pop(name).wait(timeout=5)  # reap our own child so no zombie is left
            self._pidfile(name).unlink(missing_ok=True)
        return stopped


def _terminate_group(pid: int, timeout_s: float) -> None:
    try:
        pgid = os.getpgid(pid)
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _group_alive(pgid):
            return
        time.sleep(0.2)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    # zombies of our own children still count as members until reaped
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[2]) == pgid and stat[0] != "Z":
                return True
    return False
