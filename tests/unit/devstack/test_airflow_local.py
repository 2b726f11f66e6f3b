"""Airflow subprocesses: the environment they run in, and reading the CLI's JSON output."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from pipelines.core.settings import Settings
from pipelines.devstack import airflow_local
from pipelines.devstack.airflow_local import AirflowRunError, airflow_env, last_json_line


@pytest.fixture
def local_settings(tmp_path: Path) -> Settings:
    return Settings(profile="dev", state_dir=tmp_path / "state", _env_file=None)


def test_the_venv_bin_dir_leads_path_without_an_activated_venv(local_settings, monkeypatch) -> None:
    # `airflow standalone` starts `airflow scheduler` & co. by bare name: they must resolve to this venv
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    env = airflow_env(local_settings, Path("dags"))
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    assert env["PATH"].endswith("/usr/bin:/bin")
    assert env["AIRFLOW_HOME"] == str(airflow_local.airflow_home(local_settings))
    assert env["AIRFLOW__CORE__DAGS_FOLDER"] == str(Path("dags").resolve())
    assert "AIRFLOW__CORE__DAGS_FOLDER" not in airflow_env(local_settings)  # queries need no DAG folder


def test_the_connections_carry_the_stack_endpoints(local_settings) -> None:
    env = airflow_env(local_settings)
    for role in ("ingest", "training", "drift"):  # one least-privilege S3 identity per task role
        assert local_settings.s3_endpoint in env[f"AIRFLOW_CONN_LEUKOPS_S3_{role.upper()}"]
    assert "AIRFLOW_CONN_LEUKOPS_S3" not in env  # the admin pair never reaches Airflow
    assert local_settings.mlflow_tracking_uri in env["AIRFLOW_CONN_LEUKOPS_MLFLOW"]


def test_the_json_document_is_the_last_line_after_airflow_log_lines() -> None:
    stdout = '2026-01-01T00:00:00Z [warning  ] Could not import graphviz.\n[{"run_id": "manual__1"}]\n\n'
    assert last_json_line(stdout) == [{"run_id": "manual__1"}]
    with pytest.raises(AirflowRunError, match="expected JSON"):
        last_json_line("DAG: x does not exist in 'dag' table\n")
    with pytest.raises(AirflowRunError, match="got nothing"):
        last_json_line("")


def test_task_states_are_grouped_per_task_in_map_index_order(local_settings, monkeypatch) -> None:
    rows = [
        {"task_id": "train", "state": "failed", "map_index": "1"},
        {"task_id": "plan", "state": "success", "map_index": ""},
        {"task_id": "train", "state": "success", "map_index": "0"},
    ]
    monkeypatch.setattr(airflow_local, "_airflow_json", lambda settings, *args: list(rows))
    states = airflow_local.task_states(local_settings, "leukops_nightly_retrain", "manual__1")
    assert states == {"plan": ["success"], "train": ["success", "failed"]}
