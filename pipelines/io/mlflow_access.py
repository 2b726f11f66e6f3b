"""Who may do what on the MLflow server: the users of its basic-auth app, the one each process logs in
as, and their provisioning (idempotent: every stack start and compose's init run it).

MLflow's clients read ``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD`` from the environment at
each request, so ``login`` puts the process's role there; a process resolves only its own role's password
(serving never holds the admin's or promotion's). The users, named after their roles:

- ``promotion``: an MLflow admin: registers versions, moves aliases, tags and attests runs;
- ``training``, ``drift``: EDIT on their own experiment (training runs + explanations; drift reports);
- ``serving``, ``qa``: the server's default permission, READ.

Anonymous requests get 401 (only ``/health`` and static files are open). MLflow's basic auth (without
workspaces) lets any authenticated user create a *new* experiment or registered model, of which it
becomes the manager; it cannot write to ours.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any, get_args

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException, RestException
from mlflow.utils.credentials import get_default_host_creds
from mlflow.utils.rest_utils import http_request, verify_rest_response

from pipelines.core.errors import LeukopsError
from pipelines.core.settings import MlflowRole, Settings

ROLES: tuple[MlflowRole, ...] = get_args(MlflowRole)
ADMIN_ROLES = frozenset({"promotion"})
DEFAULT_PERMISSION = "READ"  # the server's floor for every authenticated user (serving, qa)
EXPERIMENT_PERMISSION = "EDIT"  # what training and drift get on their own experiment
DEV_DEFAULT_ROLE: MlflowRole = "promotion"  # the dev profile's CLI is the one operator of the whole stack
USERNAME_ENV = "MLFLOW_TRACKING_USERNAME"
PASSWORD_ENV = "MLFLOW_TRACKING_PASSWORD"  # noqa: S105 - the name of MLflow's variable, not a secret
# The basic-auth app's REST API (mlflow.server.auth.routes; its AuthServiceClient is not used because
# importing mlflow.server loads the whole server app into every client process)
USERS_API = "/api/2.0/mlflow/users"
GRANT_API = "/api/3.0/mlflow/users/permissions/grant"


class MlflowAccessError(LeukopsError):
    """The MLflow server's users could not be set up; the message names the server and the user."""


def drift_experiment(settings: Settings) -> str:
    """The experiment of drift runs, kept apart from training candidates."""
    return f"{settings.mlflow_experiment}-drift"


def edited_experiments(settings: Settings) -> dict[MlflowRole, str]:
    """role -> the experiment it may edit (the others read everything and edit nothing, admins aside)."""
    return {"training": settings.mlflow_experiment, "drift": drift_experiment(settings)}


def process_role(settings: Settings) -> MlflowRole | None:
    """The role this process logs in as: ``mlflow_role``, else (dev profile only) promotion."""
    if settings.mlflow_role is not None:
        return settings.mlflow_role
    return DEV_DEFAULT_ROLE if settings.profile == "dev" else None


def credentials(settings: Settings, role: MlflowRole) -> tuple[str, str]:
    """(username, password) of ``role``'s MLflow user; a missing password names its variable."""
    return role, settings.secret(f"mlflow_users.{role}")


def login(settings: Settings) -> None:
    """Make this process's MLflow requests authenticate as its role.

    Without a role (outside dev, ``mlflow_role`` unset) nothing is set: MLflow's own
    ``MLFLOW_TRACKING_USERNAME``/``PASSWORD`` (or ``~/.mlflow/credentials``) apply, else requests are
    anonymous and the server answers 401.
    """
    role = process_role(settings)
    if role is not None:
        os.environ[USERNAME_ENV], os.environ[PASSWORD_ENV] = credentials(settings, role)


@contextlib.contextmanager
def _logged_in_as(username: str, password: str) -> Iterator[None]:
    """MLflow's clients take credentials from the environment only: set them for the block, then restore."""
    saved = {name: os.environ.get(name) for name in (USERNAME_ENV, PASSWORD_ENV)}
    os.environ[USERNAME_ENV], os.environ[PASSWORD_ENV] = username, password
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _call(uri: str, endpoint: str, method: str, **kwargs: Any) -> None:
    """One request to the auth API with the credentials of the environment (``_logged_in_as``)."""
    verify_rest_response(http_request(get_default_host_creds(uri), endpoint, method, **kwargs), endpoint)


def _ensure_user(uri: str, username: str, password: str, is_admin: bool) -> None:
    """Create the user, or set its password to the configured one (a rotation), and its admin flag."""
    try:
        _call(uri, f"{USERS_API}/get", "GET", params={"username": username})
    except RestException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        _call(uri, f"{USERS_API}/create", "POST", json={"username": username, "password": password})
    else:
        _call(uri, f"{USERS_API}/update-password", "PATCH", json={"username": username, "password": password})
    _call(uri, f"{USERS_API}/update-admin", "PATCH", json={"username": username, "is_admin": is_admin})


def _experiment_id(client: MlflowClient, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    return experiment.experiment_id if experiment else client.create_experiment(name)


def _grant(uri: str, username: str, experiment_id: str) -> None:
    grant = {
        "username": username,
        "resource_type": "experiment",
        "resource_id": experiment_id,
        "permission": EXPERIMENT_PERMISSION,
    }
    try:
        _call(uri, GRANT_API, "POST", json=grant)
    except RestException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":  # granted by an earlier start
            raise


def provision(settings: Settings) -> list[str]:
    """Log in as the admin and make every role's user exist with its configured password and rights,
    creating the experiments training and drift edit; returns the usernames. Idempotent."""
    uri = settings.mlflow_tracking_uri
    admin = settings.mlflow_admin_user
    current = admin
    try:
        with _logged_in_as(admin, settings.secret("mlflow_users.admin")):
            client = MlflowClient(tracking_uri=uri, registry_uri=uri)
            experiments = {role: _experiment_id(client, name) for role, name in edited_experiments(settings).items()}
            for role in ROLES:
                current = role
                username, password = credentials(settings, role)
                _ensure_user(uri, username, password, is_admin=role in ADMIN_ROLES)
                if role in experiments:
                    _grant(uri, username, experiments[role])
    except MlflowException as err:
        raise MlflowAccessError(
            f"MLflow at {uri}: setting up user {current!r} as admin {admin!r} failed: {err.message} (the admin "
            "password is fixed when the auth DB is first created: LEUKOPS_MLFLOW_USERS__ADMIN must match it)"
        ) from err
    return list(ROLES)
