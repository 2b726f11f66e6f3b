"""The stack's MLflow server behind its basic-auth app: anonymous requests refused, each role's user
able to do its job and nothing more, provisioning idempotent across restarts."""

from __future__ import annotations

import pytest
import requests

from pipelines.core.settings import Settings
from pipelines.devstack.mlflow_server import MlflowServer
from pipelines.devstack.stack import LocalStack
from pipelines.io.mlflow_access import credentials, drift_experiment, provision

TIMEOUT_S = 10


def _api(settings: Settings, path: str) -> str:
    return f"{settings.mlflow_tracking_uri}/api/2.0/mlflow/{path}"


def _as(settings: Settings, role: str) -> tuple[str, str]:
    return credentials(settings, role)


def _experiment_id(settings: Settings, name: str) -> str:
    response = requests.get(
        _api(settings, "experiments/get-by-name"),
        params={"experiment_name": name},
        auth=_as(settings, "promotion"),
        timeout=TIMEOUT_S,
    )
    response.raise_for_status()
    return response.json()["experiment"]["experiment_id"]


def _create_run(settings: Settings, experiment_id: str, auth: tuple[str, str] | None) -> requests.Response:
    return requests.post(
        _api(settings, "runs/create"), json={"experiment_id": experiment_id}, auth=auth, timeout=TIMEOUT_S
    )


def test_anonymous_rest_calls_get_401_and_health_stays_open(stack: LocalStack, settings: Settings) -> None:
    search = requests.post(_api(settings, "experiments/search"), json={"max_results": 1}, timeout=TIMEOUT_S)
    assert search.status_code == 401
    alias = requests.post(
        _api(settings, "registered-models/alias"),
        json={"name": "leukops-all_subtypes", "alias": "champion", "version": "1"},
        timeout=TIMEOUT_S,
    )
    assert alias.status_code == 401  # the hand-moved alias of issue 15 needs a user now
    wrong = requests.post(
        _api(settings, "experiments/search"),
        json={"max_results": 1},
        auth=("serving", "not-the-password"),
        timeout=TIMEOUT_S,
    )
    assert wrong.status_code == 401
    assert requests.get(f"{settings.mlflow_tracking_uri}/health", timeout=TIMEOUT_S).status_code == 200


@pytest.mark.parametrize("role", ["serving", "qa"])
def test_read_only_users_read_but_cannot_write(stack: LocalStack, settings: Settings, role: str) -> None:
    experiment_id = _experiment_id(settings, settings.mlflow_experiment)
    read = requests.get(
        _api(settings, "experiments/get"),
        params={"experiment_id": experiment_id},
        auth=_as(settings, role),
        timeout=TIMEOUT_S,
    )
    assert read.status_code == 200
    assert _create_run(settings, experiment_id, _as(settings, role)).status_code == 403


def test_training_logs_runs_in_its_experiment_only_and_drift_in_its_own(stack: LocalStack, settings: Settings) -> None:
    training_id = _experiment_id(settings, settings.mlflow_experiment)
    drift_id = _experiment_id(settings, drift_experiment(settings))
    created = _create_run(settings, training_id, _as(settings, "training"))
    assert created.status_code == 200, created.text
    run_id = created.json()["run"]["info"]["run_id"]
    logged = requests.post(
        _api(settings, "runs/log-metric"),
        json={"run_id": run_id, "key": "macro_f1", "value": 0.9, "timestamp": 0},
        auth=_as(settings, "training"),
        timeout=TIMEOUT_S,
    )
    assert logged.status_code == 200
    assert _create_run(settings, drift_id, _as(settings, "training")).status_code == 403
    assert _create_run(settings, drift_id, _as(settings, "drift")).status_code == 200
    assert _create_run(settings, training_id, _as(settings, "drift")).status_code == 403


def test_the_ui_answers_a_person_with_credentials(stack: LocalStack, settings: Settings) -> None:
    admin = (settings.mlflow_admin_user, settings.secret("mlflow_users.admin"))
    assert requests.get(settings.mlflow_tracking_uri, timeout=TIMEOUT_S).status_code == 401
    page = requests.get(settings.mlflow_tracking_uri, auth=admin, timeout=TIMEOUT_S)
    assert page.status_code == 200
    assert "<html" in page.text.lower()


def test_the_admin_default_password_is_not_accepted(stack: LocalStack, settings: Settings) -> None:
    legacy = requests.post(
        _api(settings, "experiments/search"),
        json={"max_results": 1},
        auth=(settings.mlflow_admin_user, "password1234"),
        timeout=TIMEOUT_S,
    )
    assert legacy.status_code == 401


def test_provisioning_again_changes_nothing_and_a_restart_keeps_the_users(
    stack: LocalStack, settings: Settings
) -> None:
    assert provision(settings) == ["promotion", "training", "drift", "serving", "qa"]
    server = next(s for s in stack.services if isinstance(s, MlflowServer))
    stack.processes.stop(server.name, 5.0)
    stack.up()  # the auth DB persists; the admin exists, so the bootstrap password is not needed again
    experiment_id = _experiment_id(settings, settings.mlflow_experiment)
    assert _create_run(settings, experiment_id, _as(settings, "training")).status_code == 200
    assert _create_run(settings, experiment_id, _as(settings, "serving")).status_code == 403
