"""Secrets that are secrets (outside dev/test) and no dev-profile exposure beyond loopback.

The CLI checks run ``leukops serve`` / ``leukops stack up`` in-process with the server start replaced by
a recorder: a check that failed to refuse would reach it, and the test says so.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipelines.cli import main
from pipelines.core.settings import (
    DEV_API_TOKEN,
    DEV_SECRETS,
    SECRET_MIN_LENGTH,
    Settings,
    SettingsError,
    env_name,
    get_settings,
    secret_fields,
    secret_weakness,
)

REPO = Path(__file__).resolve().parents[3]
STRONG = "Vb3qXr9Zt1LmW8pQ-strong"

SET_BY_SERVE = ("LEUKOPS_MLFLOW_ROLE", "LEUKOPS_SERVING__TASK")


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No LEUKOPS_* variable and no .env (cwd is empty); the repo's versioned config file."""
    for key in [k for k in os.environ if k.startswith("LEUKOPS_")]:
        monkeypatch.delenv(key)
    for key in SET_BY_SERVE:  # `leukops serve` exports these for its workers: undo them after the test
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    monkeypatch.setenv("LEUKOPS_CONFIG_FILE", str(REPO / "leukops.yaml"))
    monkeypatch.chdir(tmp_path)
    get_settings.cache_clear()
    yield monkeypatch
    get_settings.cache_clear()


@pytest.fixture
def env_example(clean_env):
    """The environment of a deployment that copied .env.example and replaced nothing."""
    for line in (REPO / ".env.example").read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and key.startswith("LEUKOPS_"):
            clean_env.setenv(key, value)
    clean_env.setenv("LEUKOPS_PROFILE", "prod")
    return clean_env


@pytest.fixture
def server_starts(monkeypatch) -> list[str]:
    """Records what would have started (uvicorn, the stack) instead of starting it."""
    import uvicorn

    from pipelines.devstack.stack import LocalStack

    started: list[str] = []
    monkeypatch.setattr(uvicorn, "run", lambda *a, **kw: started.append(f"serving on {kw['host']}"))
    monkeypatch.setattr(LocalStack, "up", lambda self: started.append("stack") or {})
    monkeypatch.setattr("pipelines.cli.stack._human", lambda status: "up")
    return started


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("change-me-api-token-of-some-length", "'change-me' placeholder"),
        ("CHANGE-ME-but-in-capitals-0123", "'change-me' placeholder"),
        (DEV_API_TOKEN, "dev-profile default"),
        (DEV_SECRETS["s3_secret_key"], "dev-profile default"),
        ("x" * (SECRET_MIN_LENGTH - 1), f"shorter than {SECRET_MIN_LENGTH}"),
        ("", f"shorter than {SECRET_MIN_LENGTH}"),
    ],
)
def test_weak_secrets_are_named_with_the_reason(clean_env, value, reason) -> None:
    assert reason in secret_weakness(value)
    clean_env.setenv("LEUKOPS_SERVING__TOKEN", value)
    settings = Settings(profile="prod", _env_file=None)
    with pytest.raises(SettingsError, match="LEUKOPS_SERVING__TOKEN") as refused:
        settings.secret("serving.token")
    assert reason in str(refused.value) and (not value or value not in str(refused.value))
    with pytest.raises(SettingsError, match="LEUKOPS_SERVING__TOKEN"):
        settings.check_secrets()


def test_a_real_secret_passes_and_dev_and_test_accept_anything(clean_env) -> None:
    assert secret_weakness("x" * SECRET_MIN_LENGTH) is None
    assert Settings(profile="prod", serving={"token": STRONG}, _env_file=None).secret("serving.token") == STRONG
    for profile in ("dev", "test"):
        relaxed = Settings(profile=profile, s3_secret_key="s", serving={"token": "t"}, _env_file=None)
        relaxed.check_secrets()
        assert relaxed.secret("serving.token") == "t"


def test_every_secret_setting_is_checked_nested_sections_included(clean_env) -> None:
    """Each dev default, set for prod, is refused by name: the walk finds every secret in the model."""
    for path, value in DEV_SECRETS.items():
        clean_env.setenv(env_name(path), value)
    settings = Settings(profile="prod", _env_file=None)
    assert {path for path, _ in secret_fields(settings)} == set(DEV_SECRETS)
    with pytest.raises(SettingsError) as refused:
        settings.check_secrets()
    for path in DEV_SECRETS:
        assert f"{env_name(path)} is a public dev-profile default" in str(refused.value)
        with pytest.raises(SettingsError, match=env_name(path)):
            settings.secret(path)


def test_metrics_token_is_a_checked_secret(clean_env) -> None:
    settings = Settings(profile="prod", serving={"token": STRONG, "metrics_token": "short"}, _env_file=None)
    assert ("serving.metrics_token", settings.serving.metrics_token) in list(secret_fields(settings))
    with pytest.raises(SettingsError, match="LEUKOPS_SERVING__METRICS_TOKEN is shorter"):
        settings.check_secrets()


def test_serve_and_stack_up_refuse_the_env_example_placeholders(env_example, server_starts, capsys) -> None:
    assert main(["serve"]) == 2
    error = capsys.readouterr().err
    assert "LEUKOPS_SERVING__TOKEN still holds the 'change-me' placeholder" in error
    assert "LEUKOPS_S3_ACCESS_KEY still holds the 'change-me' placeholder" in error
    assert main(["stack", "up"]) == 2
    assert "LEUKOPS_S3_SECRET_KEY still holds the 'change-me' placeholder" in capsys.readouterr().err
    assert server_starts == []


def test_prod_with_real_secrets_serves_on_any_address(clean_env, server_starts) -> None:
    clean_env.setenv("LEUKOPS_PROFILE", "prod")
    for var in ("LEUKOPS_SERVING__TOKEN", "LEUKOPS_S3_ACCESS_KEY", "LEUKOPS_S3_SECRET_KEY"):
        clean_env.setenv(var, f"{var.lower()}-{STRONG}")
    assert main(["serve", "--host", "0.0.0.0"]) == 0
    assert server_starts == ["serving on 0.0.0.0"]


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.53", "localhost", "::1", "[::1]"])
def test_dev_may_bind_loopback(host) -> None:
    Settings(profile="dev", _env_file=None).check_bind(host, "serving")


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "lab-server.example"])
def test_dev_refuses_other_addresses_unless_acknowledged(host) -> None:
    dev = Settings(profile="dev", _env_file=None)
    with pytest.raises(SettingsError, match="--i-know-this-is-dev"):
        dev.check_bind(host, "serving")
    dev.check_bind(host, "serving", acknowledged=True)
    Settings(profile="prod", _env_file=None).check_bind(host, "serving")


def test_dev_serve_on_all_interfaces_needs_the_flag(clean_env, server_starts, capsys) -> None:
    clean_env.setenv("LEUKOPS_PROFILE", "dev")
    assert main(["serve", "--host", "0.0.0.0"]) == 2
    assert "refusing to bind serving to '0.0.0.0'" in capsys.readouterr().err and server_starts == []
    assert main(["serve", "--host", "0.0.0.0", "--i-know-this-is-dev"]) == 0
    assert main(["serve"]) == 0
    assert server_starts == ["serving on 0.0.0.0", "serving on 127.0.0.1"]


def test_dev_stack_up_with_a_non_loopback_endpoint_needs_the_flag(clean_env, server_starts, capsys) -> None:
    clean_env.setenv("LEUKOPS_PROFILE", "dev")
    assert main(["stack", "up"]) == 0  # `make demo`: the default endpoints are loopback
    get_settings.cache_clear()
    clean_env.setenv("LEUKOPS_S3_ENDPOINT", "http://10.1.2.3:18333")
    assert main(["stack", "up"]) == 2
    assert "LEUKOPS_S3_ENDPOINT" in capsys.readouterr().err and server_starts == ["stack"]
    assert main(["stack", "up", "--i-know-this-is-dev"]) == 0
    assert server_starts == ["stack", "stack"]
