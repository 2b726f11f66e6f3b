"""The stack's MLflow server runs MLflow's basic-auth app: its command, env and auth INI, and the same
INI shape in compose."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.server.auth.config import read_auth_config

from pipelines.core.settings import DEV_SECRETS, Settings, SettingsError
from pipelines.devstack.mlflow_server import MlflowServer
from pipelines.devstack.postgres import Postgres

REPO = Path(__file__).resolve().parents[3]


def _server(settings: Settings, root: Path) -> MlflowServer:
    return MlflowServer(settings, root, Postgres(settings, root))


@pytest.fixture
def dev_server(tmp_path: Path) -> MlflowServer:
    return _server(Settings(profile="dev", state_dir=tmp_path, _env_file=None), tmp_path / "stack")


def test_the_server_runs_the_basic_auth_app(dev_server: MlflowServer) -> None:
    command = dev_server.command()
    assert command[command.index("--app-name") + 1] == "basic-auth"


def test_the_auth_ini_names_a_sqlite_db_in_the_stack_dir_and_holds_no_password(
    dev_server: MlflowServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    dev_server.prepare()
    env = dev_server.env()
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", env["MLFLOW_AUTH_CONFIG_PATH"])
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_PASSWORD", raising=False)
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_USERNAME", raising=False)
    config = read_auth_config()  # MLflow's own reader of the file
    assert config.database_uri == f"sqlite:///{(dev_server.home / 'basic_auth.db').resolve()}"
    assert config.default_permission == "READ"
    assert config.admin_username == "admin"
    assert config.admin_password is None  # travels in the server's env only
    assert 0 < config.auth_cache_ttl_seconds <= 60  # the scrypt check is not paid on every request
    assert DEV_SECRETS["mlflow_users.admin"] not in Path(env["MLFLOW_AUTH_CONFIG_PATH"]).read_text()
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"] == DEV_SECRETS["mlflow_users.admin"]
    assert env["MLFLOW_FLASK_SERVER_SECRET_KEY"] == DEV_SECRETS["mlflow_server_secret_key"]


def test_outside_dev_the_missing_admin_password_is_named(tmp_path: Path) -> None:
    settings = Settings(
        profile="prod",
        state_dir=tmp_path,
        s3_access_key="k" * 20,
        s3_secret_key="s" * 20,
        mlflow_server_secret_key="f" * 32,
        _env_file=None,
    )
    with pytest.raises(SettingsError, match="LEUKOPS_MLFLOW_USERS__ADMIN"):
        _server(settings, tmp_path / "stack").env()


def test_compose_uses_the_same_auth_config_as_the_local_stack(
    dev_server: MlflowServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_PASSWORD", raising=False)
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_USERNAME", raising=False)
    dev_server.prepare()
    configs = []
    for path in (dev_server.auth_config_path, REPO / "infra" / "mlflow" / "basic_auth.ini"):
        monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(path))
        configs.append(read_auth_config())
    local, compose = configs
    assert compose.database_uri == "sqlite:////var/lib/mlflow-auth/basic_auth.db"  # the mlflow-auth volume
    assert local._replace(database_uri="") == compose._replace(database_uri="")
    compose_file = (REPO / "docker-compose.yml").read_text()
    for needed in ("--app-name=basic-auth", "MLFLOW_AUTH_CONFIG_PATH", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert needed in compose_file
