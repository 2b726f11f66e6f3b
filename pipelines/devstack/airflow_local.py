"""Airflow on the embedded stack: its own AIRFLOW_HOME (sqlite) under the state dir, the `gpu` pool,
the S3 and MLflow connections built from the settings, ``dags test`` runs and ``airflow standalone``.

Airflow always runs as a subprocess with this environment, so the same DAG files run here, in the
tests and in compose (where the connections come from the init container instead).
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from pipelines.core.errors import LeukopsError
from pipelines.core.settings import Settings

S3_CONN_ID = "leukops_s3"
MLFLOW_CONN_ID = "leukops_mlflow"
GPU_POOL = "gpu"


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


def connection_env(settings: Settings) -> dict[str, str]:
    """AIRFLOW_CONN_* for the S3 store and the MLflow server, from the settings (JSON connection form)."""
    s3 = {
        "conn_type": "aws",
        "login": settings.secret("s3_access_key"),
        "password": settings.secret("s3_secret_key"),
        "extra": {"endpoint_url": settings.s3_endpoint, "region_name": settings.s3_region},
    }
    mlflow = {"conn_type": "http", "host": settings.mlflow_tracking_uri}
    return {
        f"AIRFLOW_CONN_{S3_CONN_ID.upper()}": json.dumps(s3),
        f"AIRFLOW_CONN_{MLFLOW_CONN_ID.upper()}": json.dumps(mlflow),
    }


def airflow_env(settings: Settings, dags_dir: Path) -> dict[str, str]:
    home = airflow_home(settings)
    env = os.environ.copy()
    env.update(connection_env(settings))
    env.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(dags_dir.resolve()),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
            "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
            "LEUKOPS_STATE_DIR": str(settings.state_dir.resolve()),
            "LEUKOPS_PROFILE": settings.profile,
            "LEUKOPS_S3_ENDPOINT": settings.s3_endpoint,
            "LEUKOPS_MLFLOW_TRACKING_URI": settings.mlflow_tracking_uri,
            "LEUKOPS_SOURCES_DIR": str(settings.sources_dir.resolve()),
            "LEUKOPS_CONFIG_FILE": str(settings.config_file.resolve()),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(Path.cwd()), env.get("PYTHONPATH")])),
        }
    )
    return env


def _airflow(settings: Settings, dags_dir: Path, *args: str, log: Path | None = None, timeout_s: float = 1800):
    command = [str(Path(sys.executable).parent / "airflow"), *args]
    env = airflow_env(settings, dags_dir)
    if log is None:
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout_s)
        if result.returncode != 0:
            raise AirflowRunError(f"`airflow {' '.join(args)}` failed:\n{result.stderr[-3000:]}")
        return result
    with log.open("w") as out:
        return subprocess.run(command, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout_s)


def init(settings: Settings, dags_dir: Path) -> Path:
    """Migrate the metadata DB (idempotent) and create the `gpu` pool: a task on a missing pool never runs."""
    home = airflow_home(settings)
    home.mkdir(parents=True, exist_ok=True)
    _airflow(settings, dags_dir, "db", "migrate")
    slots = str(settings.retrain.gpu_pool_slots)
    _airflow(settings, dags_dir, "pools", "set", GPU_POOL, slots, "GPU training jobs (leukops)")
    return home


def dags_test(settings: Settings, dags_dir: Path, dag_id: str, conf: dict | None = None) -> DagRunResult:
    """Run one DAG run in-process with `airflow dags test`; return its final state and task states."""
    logs = airflow_home(settings) / "dags-test-logs"
    logs.mkdir(parents=True, exist_ok=True)
    before = _run_ids(settings, dag_id)
    log = logs / f"{dag_id}-{len(before) + 1}.log"
    args = ["dags", "test", dag_id] + (["--conf", json.dumps(conf)] if conf else [])
    _airflow(settings, dags_dir, *args, log=log)
    new = [run for run in _run_ids(settings, dag_id) if run not in before]
    if not new:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        raise AirflowRunError(f"`airflow dags test {dag_id}` created no DAG run; log {log}:\n{tail}")
    run_id = new[-1]
    state = _run_state(settings, dag_id, run_id)
    return DagRunResult(dag_id, run_id, state, task_states(settings, dag_id, run_id), log)


def _db(settings: Settings) -> sqlite3.Connection:
    return sqlite3.connect(airflow_home(settings) / "airflow.db")


def _run_ids(settings: Settings, dag_id: str) -> list[str]:
    with _db(settings) as db:
        rows = db.execute("SELECT run_id FROM dag_run WHERE dag_id = ? ORDER BY id", (dag_id,)).fetchall()
    return [r[0] for r in rows]


def _run_state(settings: Settings, dag_id: str, run_id: str) -> str:
    with _db(settings) as db:
        row = db.execute("SELECT state FROM dag_run WHERE dag_id = ? AND run_id = ?", (dag_id, run_id)).fetchone()
    return row[0]


def task_states(settings: Settings, dag_id: str, run_id: str) -> dict[str, list[str]]:
    """task_id -> states of its instances (one per map index)."""
    with _db(settings) as db:
        rows = db.execute(
            "SELECT task_id, state FROM task_instance WHERE dag_id = ? AND run_id = ? ORDER BY task_id, map_index",
            (dag_id, run_id),
        ).fetchall()
    states: dict[str, list[str]] = {}
    for task_id, state in rows:
        states.setdefault(task_id, []).append(state)
    return states


def task_return(settings: Settings, dag_id: str, run_id: str, task_id: str) -> list:
    """The return values (XCom) of a task's instances in one run, in map-index order."""
    with _db(settings) as db:
        rows = db.execute(
            "SELECT value FROM xcom WHERE dag_id = ? AND run_id = ? AND task_id = ? AND key = 'return_value' "
            "ORDER BY map_index",
            (dag_id, run_id, task_id),
        ).fetchall()
    return [json.loads(value) for (value,) in rows]


def asset_events(settings: Settings, asset_name: str, dag_id: str | None = None) -> list[dict]:
    """Events emitted for an asset (optionally by one DAG), oldest first, with their extra."""
    query = (
        "SELECT e.source_dag_id, e.source_run_id, e.extra, e.timestamp FROM asset_event e "
        "JOIN asset a ON a.id = e.asset_id WHERE a.name = ?"
    )
    params: tuple = (asset_name,)
    if dag_id:
        query += " AND e.source_dag_id = ?"
        params += (dag_id,)
    with _db(settings) as db:
        rows = db.execute(query + " ORDER BY e.id", params).fetchall()
    return [{"dag_id": d, "run_id": r, "extra": json.loads(x or "{}"), "timestamp": t} for d, r, x, t in rows]


def standalone(settings: Settings, dags_dir: Path) -> int:
    """`airflow standalone` (api-server on :8080, scheduler, dag-processor, triggerer) on these settings."""
    init(settings, dags_dir)
    command = [str(Path(sys.executable).parent / "airflow"), "standalone"]
    return subprocess.call(command, env=airflow_env(settings, dags_dir))
