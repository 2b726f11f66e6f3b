"""Which MLflow user a process logs in as: settings-driven, one role per process, and only that role's
password resolved (serving never holds the admin's or promotion's); Airflow tasks through one connection
per role."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from pipelines.core.settings import DEV_SECRETS, Settings, SettingsError
from pipelines.devstack.airflow_local import connection_env
from pipelines.io import mlflow_access
from pipelines.io.mlflow_access import login, process_role
from pipelines.orchestration import airflow_tasks

STRONG = "a-real-secret-of-enough-length"


@pytest.fixture(autouse=True)
def clean_mlflow_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(mlflow_access.USERNAME_ENV, raising=False)
    monkeypatch.delenv(mlflow_access.PASSWORD_ENV, raising=False)


def test_dev_logs_in_as_promotion_unless_a_role_is_set() -> None:
    assert process_role(Settings(profile="dev", _env_file=None)) == "promotion"
    assert process_role(Settings(profile="dev", mlflow_role="qa", _env_file=None)) == "qa"
    assert process_role(Settings(profile="prod", _env_file=None)) is None


def test_serving_resolves_only_its_own_password() -> None:
    # prod with nothing but serving's password set: any read of another role's password would raise
    settings = Settings(profile="prod", mlflow_role="serving", mlflow_users={"serving": STRONG}, _env_file=None)
    login(settings)
    assert os.environ[mlflow_access.USERNAME_ENV] == "serving"
    assert os.environ[mlflow_access.PASSWORD_ENV] == STRONG


def test_a_role_without_its_password_names_the_variable() -> None:
    with pytest.raises(SettingsError, match="LEUKOPS_MLFLOW_USERS__TRAINING"):
        login(Settings(profile="prod", mlflow_role="training", _env_file=None))


def test_without_a_role_outside_dev_mlflow_s_own_variables_are_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(mlflow_access.USERNAME_ENV, "someone")
    login(Settings(profile="prod", _env_file=None))
    assert os.environ[mlflow_access.USERNAME_ENV] == "someone"
    assert mlflow_access.PASSWORD_ENV not in os.environ


def test_the_airflow_workers_get_one_mlflow_connection_per_task_role(tmp_path: Path) -> None:
    env = connection_env(Settings(profile="dev", state_dir=tmp_path, _env_file=None))
    for role in ("training", "drift", "promotion"):
        conn = json.loads(env[f"AIRFLOW_CONN_LEUKOPS_MLFLOW_{role.upper()}"])
        assert (conn["login"], conn["password"]) == (role, DEV_SECRETS[f"mlflow_users.{role}"])
    everything = "".join(env.values())
    for never in ("mlflow_users.admin", "mlflow_users.serving", "mlflow_users.qa"):
        assert DEV_SECRETS[never] not in everything


def test_a_task_logs_in_with_its_role_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    conns = {"leukops_mlflow_drift": SimpleNamespace(login="drift", password=STRONG)}
    monkeypatch.setattr(airflow_tasks, "_airflow_connection", conns.get)
    settings = airflow_tasks.task_settings(mlflow_role="drift")
    assert settings.mlflow_role == "drift"
    assert settings.secret("mlflow_users.drift") == STRONG


def test_a_role_connection_with_another_login_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    conns = {"leukops_mlflow_training": SimpleNamespace(login="promotion", password=STRONG)}
    monkeypatch.setattr(airflow_tasks, "_airflow_connection", conns.get)
    with pytest.raises(airflow_tasks.FlowError, match="leukops_mlflow_training"):
        airflow_tasks.task_settings(mlflow_role="training")
