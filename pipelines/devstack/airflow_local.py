"""Airflow on the embedded stack: its own AIRFLOW_HOME under the state dir, metadata in the stack's
Postgres, Celery broker in its Redis, the `gpu` pool, the S3 and MLflow connections built from the
settings, and ``dags test`` runs (the long-running components are ``airflow_services``).

Airflow always runs as a subprocess with this environment, so the same DAG files run here, in the
tests and in compose (where the connections come from the init container instead). Outcomes are read
back through Airflow's public interfaces, never its tables: the CLI's JSON output for runs and task
states, and the REST API (``airflow_rest``) for XComs and asset events, which the CLI does not print.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipelines.core.errors import LeukopsError
from pipelines.core.settings import Settings
from pipelines.devstack import airflow_rest
from pipelines.devstack.postgres import Postgres
from pipelines.devstack.processes import executable, port_of, venv_bin_dir
from pipelines.devstack.redis_server import RedisServer
from pipelines.io.storage import role_key_settings

S3_CONN_ID = "leukops_s3"  # + "_<role>": one connection per S3 identity (orchestration.airflow_tasks)
S3_TASK_ROLES = ("ingest", "training", "drift")  # the S3 identities DAG tasks sign as
MLFLOW_CONN_ID = "leukops_mlflow"
MLFLOW_TASK_ROLES = ("training", "drift", "promotion")  # the MLflow users DAG tasks log in as (one conn each)
GPU_POOL = "gpu"
RUN_TIMEOUT_S = 1800
QUERY_TIMEOUT_S = 300
SIMPLE_AUTH_MANAGER = "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"


class AirflowRunError(LeukopsError):
    pass


@dataclass(frozen=True)
class DagRunResult:
    dag_id: str
    run_id: str
    state: str
    task_states: dict[str, list[str]]
    log_path: Path


def airflow_home(settings: Settings) -> Path:
    return (settings.state_dir / "airflow").resolve()


def stack_root(settings: Settings) -> Path:
    return (settings.state_dir / "stack").resolve()


def shared_secrets(settings: Settings) -> dict[str, str]:
    """JWT secret, API secret key and Fernet key shared by every component of this AIRFLOW_HOME.

    Generated once into a 0600 file: a component with another JWT secret rejects the others' tokens.
    """
    path = airflow_home(settings) / "leukops-secrets.json"
    if not path.exists():
        import secrets

        from cryptography.fernet import Fernet

        path.parent.mkdir(parents=True, exist_ok=True)
        values = {
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
            "AIRFLOW__API__SECRET_KEY": secrets.token_urlsafe(32),
            "AIRFLOW__CORE__FERNET_KEY": Fernet.generate_key().decode(),
        }
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(values))
        tmp.chmod(0o600)
        tmp.replace(path)
    return json.loads(path.read_text())


def admin_passwords_file(settings: Settings) -> Path:
    """The simple auth manager's passwords file, pre-written so the local admin's password is the setting."""
    path = airflow_home(settings) / "simple_auth_manager_passwords.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({settings.airflow_admin_user: settings.secret("airflow_admin_password")}))
    path.chmod(0o600)
    return path


def metadata_env(settings: Settings) -> dict[str, str]:
    """Where Airflow keeps its state and queues its tasks: the stack's Postgres and Redis (as in compose)."""
    root = stack_root(settings)
    postgres, redis = Postgres(settings, root), RedisServer(settings, root)
    url = settings.airflow_url.rstrip("/")
    return shared_secrets(settings) | {
        "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": postgres.sqlalchemy_url("airflow"),
        # Airflow derives asyncpg (not installed) for its async engine unless told: psycopg 3 does both
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC": postgres.sqlalchemy_url("airflow", "postgresql+psycopg_async"),
        "AIRFLOW__CELERY__RESULT_BACKEND": postgres.sqlalchemy_url("airflow", "db+postgresql+psycopg"),
        "AIRFLOW__CELERY__BROKER_URL": redis.url(),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{url}/execution/",
        "AIRFLOW__API__BASE_URL": url,
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(port_of(url)),
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__CELERY__WORKER_CONCURRENCY": "2",  # Celery's default (one child per core) is 16 on a server
        # the execution API's 5 s default fails tasks whenever a shared laptop or CI runner is busy
        "AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT": "30",
        "AIRFLOW__CORE__AUTH_MANAGER": SIMPLE_AUTH_MANAGER,
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{settings.airflow_admin_user}:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(admin_passwords_file(settings)),
        "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",  # its fixed port 8974 would clash between stacks
        "LEUKOPS_AIRFLOW_URL": url,
    }


def connection_env(settings: Settings) -> dict[str, str]:
    """AIRFLOW_CONN_* for the S3 store (one least-privilege identity per task role; no admin pair) and the
    MLflow server, from the settings (JSON connection form)."""
    s3_extra = {"endpoint_url": settings.s3_endpoint, "region_name": settings.s3_region}
    s3_roles = {
        f"AIRFLOW_CONN_{S3_CONN_ID.upper()}_{role.upper()}": json.dumps(
            {
                "conn_type": "aws",
                "login": settings.secret(role_key_settings(role)[0]),
                "password": settings.secret(role_key_settings(role)[1]),
                "extra": s3_extra,
            }
        )
        for role in S3_TASK_ROLES
    }
    mlflow = {"conn_type": "http", "host": settings.mlflow_tracking_uri}
    mlflow_users = {
        f"AIRFLOW_CONN_{MLFLOW_CONN_ID.upper()}_{role.upper()}": json.dumps(
            mlflow | {"login": role, "password": settings.secret(f"mlflow_users.{role}")}
        )
        for role in MLFLOW_TASK_ROLES
    }
    return {
        **s3_roles,
        f"AIRFLOW_CONN_{MLFLOW_CONN_ID.upper()}": json.dumps(mlflow),
        **mlflow_users,
    }


def airflow_env(settings: Settings, dags_dir: Path | None = None) -> dict[str, str]:
    """The environment of every Airflow subprocess: this AIRFLOW_HOME, the connections, the settings.

    The venv's bin directory leads PATH because Airflow starts its own sub-commands (scheduler, task
    runners) by the bare name ``airflow``, which must resolve without an activated venv.
    """
    home = airflow_home(settings)
    env = os.environ.copy()
    env.update(connection_env(settings))
    env.update(metadata_env(settings))
    env.update(
        {
            "PATH": os.pathsep.join(filter(None, [str(venv_bin_dir()), env.get("PATH")])),
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",  # as in compose: the init step unpauses ours
            "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
            "LEUKOPS_STATE_DIR": str(settings.state_dir.resolve()),
            "LEUKOPS_PROFILE": settings.profile,
            "LEUKOPS_S3_ENDPOINT": settings.s3_endpoint,
            "LEUKOPS_MLFLOW_TRACKING_URI": settings.mlflow_tracking_uri,
            "LEUKOPS_SOURCES_DIR": str(settings.sources_dir.resolve()),
            "LEUKOPS_SUITE_DIR": str(settings.suite_dir.resolve()),  # the components run in the stack dir
            "LEUKOPS_CONFIG_FILE": str(settings.config_file.resolve()),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(Path.cwd()), env.get("PYTHONPATH")])),
        }
    )
    if dags_dir is not None:
        env["AIRFLOW__CORE__DAGS_FOLDER"] = str(dags_dir.resolve())
    return env


def _run(command: list[str], env: dict[str, str], what: str, timeout_s: float) -> str:
    """Run a command to completion; its stdout, or AirflowRunError with the tail of its stderr."""
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout_s)
    if result.returncode != 0:
        raise AirflowRunError(f"`{what}` failed:\n{result.stderr[-3000:]}")
    return result.stdout


def _airflow(settings: Settings, dags_dir: Path | None, *args: str, timeout_s: float = RUN_TIMEOUT_S) -> str:
    command = [executable("airflow"), *args]
    return _run(command, airflow_env(settings, dags_dir), f"airflow {' '.join(args)}", timeout_s)


def last_json_line(stdout: str) -> Any:
    """The JSON document a command printed last: Airflow's logging shares stdout with it."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    if not lines:
        raise AirflowRunError("expected JSON output, got nothing")
    try:
        return json.loads(lines[-1])
    except json.JSONDecodeError as err:
        raise AirflowRunError(f"expected JSON as the last output line, got {lines[-1][:300]!r}") from err


def _airflow_json(settings: Settings, *args: str) -> Any:
    return last_json_line(_airflow(settings, None, *args, "--output", "json", timeout_s=QUERY_TIMEOUT_S))


def init(settings: Settings, dags_dir: Path) -> Path:
    """Migrate the metadata DB (idempotent) and create the `gpu` pool: a task on a missing pool never runs."""
    home = airflow_home(settings)
    home.mkdir(parents=True, exist_ok=True)
    _airflow(settings, dags_dir, "db", "migrate")
    slots = str(settings.retrain.gpu_pool_slots)
    _airflow(settings, dags_dir, "pools", "set", GPU_POOL, slots, "GPU training jobs (leukops)")
    return home


def dags_test(settings: Settings, dags_dir: Path, dag_id: str, conf: dict | None = None) -> DagRunResult:
    """Run one DAG run in-process with `airflow dags test`; return its final state and task states.

    The run gets a logical date of our choosing (now, as `dags test` would pick), which is how we find
    it afterwards among the DAG's runs.
    """
    logical_date = datetime.now(UTC)
    logs = airflow_home(settings) / "dags-test-logs"
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{dag_id}-{logical_date:%Y%m%dT%H%M%S%f}.log"
    args = ["dags", "test", dag_id, logical_date.isoformat()] + (["--conf", json.dumps(conf)] if conf else [])
    with log.open("w") as out:  # a failed DAG run exits non-zero: its state is read back, not raised
        command, env = [executable("airflow"), *args], airflow_env(settings, dags_dir)
        subprocess.run(command, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=RUN_TIMEOUT_S)
    run = _run_at(settings, dag_id, logical_date, log)
    return DagRunResult(dag_id, run["run_id"], run["state"], task_states(settings, dag_id, run["run_id"]), log)


def _run_at(settings: Settings, dag_id: str, logical_date: datetime, log: Path) -> dict[str, str]:
    """The DAG's run with this logical date, from `airflow dags list-runs`."""
    try:
        runs = _airflow_json(settings, "dags", "list-runs", dag_id)
    except AirflowRunError as err:  # e.g. the DAG failed to parse, so it never reached the metadata DB
        raise _no_run_error(dag_id, log) from err
    for run in runs:
        if run["logical_date"] and datetime.fromisoformat(run["logical_date"]) == logical_date:
            return run
    raise _no_run_error(dag_id, log)


def _no_run_error(dag_id: str, log: Path) -> AirflowRunError:
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
    return AirflowRunError(f"`airflow dags test {dag_id}` created no DAG run; log {log}:\n{tail}")


def task_states(settings: Settings, dag_id: str, run_id: str) -> dict[str, list[str]]:
    """task_id -> states of its instances (one per map index, in map-index order)."""
    rows = _airflow_json(settings, "tasks", "states-for-dag-run", dag_id, run_id)
    rows.sort(key=lambda r: (r["task_id"], _map_index(r.get("map_index"))))
    states: dict[str, list[str]] = {}
    for row in rows:
        states.setdefault(row["task_id"], []).append(row["state"])
    return states


def _map_index(value: Any) -> int:
    """The CLI prints an unmapped task's map index as "" (or None); 0 is a real index."""
    return -1 if value in (None, "") else int(value)


def _rest(settings: Settings, queries: list[dict[str, Any]]) -> list[Any]:
    """Answers to ``airflow_rest`` queries, all from one API process."""
    command = [sys.executable, "-m", airflow_rest.__name__, json.dumps(queries)]
    env = airflow_env(settings) | airflow_rest.API_ENV
    return last_json_line(_run(command, env, f"Airflow REST API {queries}", QUERY_TIMEOUT_S))


def task_returns(settings: Settings, instances: list[tuple[str, str, str]]) -> list[list]:
    """For each (dag_id, run_id, task_id): the return values (XCom) of its instances, in map-index order."""
    queries = [{"query": "xcom-returns", "dag_id": d, "run_id": r, "task_id": t} for d, r, t in instances]
    return _rest(settings, queries)


def task_return(settings: Settings, dag_id: str, run_id: str, task_id: str) -> list:
    """The return values (XCom) of a task's instances in one run, in map-index order."""
    return task_returns(settings, [(dag_id, run_id, task_id)])[0]


def asset_events(settings: Settings, asset_name: str, dag_id: str | None = None) -> list[dict]:
    """Events emitted for an asset (optionally by one DAG), oldest first, with their extra."""
    return _rest(settings, [{"query": "asset-events", "asset_name": asset_name, "dag_id": dag_id}])[0]
