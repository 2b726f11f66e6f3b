"""Airflow 3 on the embedded stack, CeleryExecutor as in compose: api-server, scheduler, dag-processor,
triggerer, one Celery worker on the default queue and one on queue ``gpu``.

Every component runs with ``airflow_local.airflow_env`` (one environment builder: metadata DB in the
stack's Postgres, broker in its Redis, shared JWT secret and execution API URL, the venv's bin on PATH),
bound to 127.0.0.1, its pid recorded in the stack's ``pids/`` so ``stack down`` stops only these. The
init step is compose's own ``infra/airflow/init.sh`` (migrate, `gpu` pool, connections, unpause).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

from pipelines.core.settings import Settings
from pipelines.devstack.airflow_local import airflow_env, airflow_home
from pipelines.devstack.airflow_rest import AirflowApiError, AirflowClient, fetch_token
from pipelines.devstack.postgres import Postgres
from pipelines.devstack.processes import ProcessDir, StackError, executable, port_of
from pipelines.devstack.redis_server import RedisServer

INIT_SCRIPT = Path(__file__).resolve().parents[2] / "infra" / "airflow" / "init.sh"
INIT_TIMEOUT_S = 600
READY_TIMEOUT_S = 240.0
STOP_TIMEOUT_S = 15.0
HTTP_TIMEOUT_S = 5
WORKER_NAME_ENV = "CELERY_WORKER_NAME"
HOSTNAME_CALLABLE = f"{__name__}.worker_hostname"


def worker_hostname() -> str:
    """Airflow's ``hostname_callable`` on our Celery workers: the worker's own name, so a task instance's
    ``hostname`` tells which of the two workers on this one machine ran it."""
    return os.environ.get(WORKER_NAME_ENV) or socket.getfqdn()


def worker_names() -> dict[str, str]:
    host = socket.gethostname()
    return {"default": f"default@{host}", "gpu": f"gpu@{host}"}


class AirflowServices:
    def __init__(self, settings: Settings, processes: ProcessDir, postgres: Postgres, redis: RedisServer) -> None:
        self.settings = settings
        self.processes = processes
        self.postgres = postgres
        self.redis = redis
        self.url = settings.airflow_url.rstrip("/")

    # --- what runs ---------------------------------------------------------------------------------------

    def commands(self) -> dict[str, list[str]]:
        airflow, names = executable("airflow"), worker_names()
        slots = str(self.settings.retrain.gpu_pool_slots)
        worker = [airflow, "celery", "worker", "--skip-serve-logs", "--without-gossip", "--without-mingle"]
        return {
            "airflow-api-server": [airflow, "api-server", "-H", "127.0.0.1", "-p", str(port_of(self.url)), "-w", "1"],
            "airflow-scheduler": [airflow, "scheduler"],
            "airflow-dag-processor": [airflow, "dag-processor"],
            "airflow-triggerer": [airflow, "triggerer", "--skip-serve-logs"],
            "airflow-worker": [*worker, "-q", "default", "-H", names["default"]],  # -c: the env, as in compose
            "airflow-worker-gpu": [*worker, "-q", "gpu", "-c", slots, "-H", names["gpu"]],
        }

    def env(self, name: str, dags_dir: Path) -> dict[str, str]:
        env = airflow_env(self.settings, dags_dir)
        queue = {"airflow-worker": "default", "airflow-worker-gpu": "gpu"}.get(name)
        if queue:
            env |= {WORKER_NAME_ENV: worker_names()[queue], "AIRFLOW__CORE__HOSTNAME_CALLABLE": HOSTNAME_CALLABLE}
        if queue == "gpu":  # prefork children are daemonic, and a daemonic process cannot start DataLoader workers
            env["AIRFLOW__CELERY__POOL"] = "solo"
        return env

    def pids(self) -> dict[str, int]:
        return {name: pid for name in self.commands() if (pid := self.processes.pid(name)) is not None}

    # --- start / stop ------------------------------------------------------------------------------------

    def init(self, dags_dir: Path) -> None:
        """compose's init step, run here: migrate, `gpu` pool, connections, parse + unpause the DAGs."""
        settings = self.settings
        env = airflow_env(settings, dags_dir) | {"LEUKOPS_GPU_POOL_SLOTS": str(settings.retrain.gpu_pool_slots)}
        log = self.processes.logfile("airflow-init")
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            code = subprocess.call(
                ["bash", str(INIT_SCRIPT)], env=env, stdout=out, stderr=subprocess.STDOUT, timeout=INIT_TIMEOUT_S
            )
        if code != 0:
            raise StackError(
                f"Airflow init ({INIT_SCRIPT}) failed; last log lines:\n{self.processes.log_tail(log.stem)}"
            )

    def up(self, dags_dir: Path) -> dict[str, Any]:
        """Init, then start the components that are not running; wait until all report healthy."""
        if not (self.postgres.healthy() and self.redis.healthy()):
            raise StackError("Postgres and Redis are not running: start them first with `leukops stack up`")
        if not self.pids():
            self._check_port()
            self.init(dags_dir)
        # The api-server first: the workers run every task through its execution API, and a task that
        # reaches it while it is still booting fails on a read timeout (the scheduler starts at once).
        commands = self.commands()
        self._spawn("airflow-api-server", commands.pop("airflow-api-server"), dags_dir)
        self.processes.wait_ready("airflow-api-server", self.api_answers, READY_TIMEOUT_S)
        for name, command in commands.items():
            self._spawn(name, command, dags_dir)
        self.processes.wait_ready("airflow-api-server", self.components_healthy, READY_TIMEOUT_S)
        self.processes.wait_ready("airflow-worker-gpu", self.workers_answer, READY_TIMEOUT_S)
        return self.status()

    def _spawn(self, name: str, command: list[str], dags_dir: Path) -> None:
        if self.processes.pid(name) is None:
            self.processes.spawn(name, command, self.env(name, dags_dir))

    def _check_port(self) -> None:
        port = port_of(self.url)
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                raise StackError(f"cannot start Airflow: port {port} already in use; move it with LEUKOPS_AIRFLOW_URL")

    def down(self, timeout_s: float = STOP_TIMEOUT_S) -> dict[str, int]:
        stopped = {}
        for name in reversed(list(self.commands())):  # workers first: they hold running tasks
            pid = self.processes.stop(name, timeout_s)
            if pid is not None:
                stopped[name] = pid
        return stopped

    # --- health ------------------------------------------------------------------------------------------

    def health(self) -> dict[str, Any] | None:
        """The api-server's /api/v2/monitor/health (metadatabase, scheduler, triggerer, dag_processor)."""
        try:
            with urllib.request.urlopen(f"{self.url}/api/v2/monitor/health", timeout=HTTP_TIMEOUT_S) as response:
                return json.loads(response.read())
        except (OSError, ValueError):
            return None

    def api_answers(self) -> bool:
        """The api-server answers and reaches its metadata DB."""
        health = self.health()
        return bool(health) and (health.get("metadatabase") or {}).get("status") == "healthy"

    def components_healthy(self) -> bool:
        health = self.health()
        parts = ("metadatabase", "scheduler", "triggerer", "dag_processor")
        return bool(health) and all((health.get(p) or {}).get("status") == "healthy" for p in parts)

    def workers_answer(self) -> bool:
        """Both Celery workers answer a broker ping (compose's worker healthcheck)."""
        app = "airflow.providers.celery.executors.celery_executor.app"
        command = [executable("celery"), "--app", app, "inspect", "ping", "--json", "--timeout", "3"]
        env = airflow_env(self.settings)
        try:
            result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired:
            return False
        answered = result.stdout.strip().splitlines()[-1:] if result.returncode == 0 else []
        names = set().union(*(json.loads(line) for line in answered)) if answered else set()
        return set(worker_names().values()) <= {n.removeprefix("celery@") for n in names}

    def status(self) -> dict[str, Any]:
        health = self.health()
        return {
            "url": self.url,
            "healthy": bool(health) and self.components_healthy(),
            "components": {name: self.processes.pid(name) for name in self.commands()},
            "home": str(airflow_home(self.settings)),
            "workers": worker_names(),
        }

    def token(self) -> str:
        """A JWT for the REST API: the local admin user's login at POST <airflow_url>/auth/token."""
        password = self.settings.secret("airflow_admin_password")
        try:
            return fetch_token(self.url, self.settings.airflow_admin_user, password)
        except AirflowApiError as err:
            raise StackError(str(err)) from err

    def client(self) -> AirflowClient:
        return AirflowClient(self.url, self.token())


def wait_forever(services: AirflowServices) -> None:
    """Foreground mode: keep the components up until Ctrl-C, then stop them."""
    try:
        while services.pids():
            time.sleep(2)
    except KeyboardInterrupt:
        pass
    finally:
        services.down()
