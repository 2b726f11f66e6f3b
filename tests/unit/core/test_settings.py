import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.core.settings import (
    DEV_API_TOKEN,
    DEV_S3_SECRET_KEY,
    DEV_SECRETS,
    Settings,
    SettingsError,
    env_name,
)

REPO = Path(__file__).resolve().parents[3]
SECRET_VARS = [env_name(path) for path in DEV_SECRETS]


@pytest.fixture
def no_secrets(monkeypatch):
    for var in SECRET_VARS:
        monkeypatch.delenv(var, raising=False)


def test_env_names_follow_the_nested_delimiter():
    assert env_name("serving.token") == "LEUKOPS_SERVING__TOKEN"
    assert env_name("s3_roles.serving.access_key") == "LEUKOPS_S3_ROLES__SERVING__ACCESS_KEY"
    assert {  # every secret of the stack has a dev default (the full set: test_settings_secrets.py)
        "LEUKOPS_S3_ACCESS_KEY",
        "LEUKOPS_S3_SECRET_KEY",
        "LEUKOPS_SERVING__TOKEN",
        "LEUKOPS_POSTGRES_PASSWORD",
        "LEUKOPS_REDIS_PASSWORD",
        "LEUKOPS_AIRFLOW_ADMIN_PASSWORD",
    } <= set(SECRET_VARS)


def test_dev_profile_fills_dev_secrets(no_secrets):
    settings = Settings(profile="dev", _env_file=None)
    assert settings.secret("s3_secret_key") == DEV_S3_SECRET_KEY
    assert settings.secret("serving.token") == DEV_API_TOKEN


@pytest.mark.parametrize("profile", ["prod", "test"])
def test_other_profiles_load_without_secrets_and_refuse_each_one_at_use(no_secrets, profile):
    settings = Settings(profile=profile, _env_file=None)  # loading demands nothing
    for path, var in zip(DEV_SECRETS, SECRET_VARS, strict=True):
        with pytest.raises(SettingsError, match=var):
            settings.secret(path)


def test_prod_profile_with_secrets_and_nested_sections_from_env(monkeypatch):
    monkeypatch.setenv("LEUKOPS_S3_ACCESS_KEY", "AKIAIOSFODNN7EXAMPLE")
    monkeypatch.setenv("LEUKOPS_S3_SECRET_KEY", "sk-from-env-Vb3qXr9Zt1LmW8")
    monkeypatch.setenv("LEUKOPS_SERVING__TOKEN", "tok-Vb3qXr9Zt1LmW8pQ")
    monkeypatch.setenv("LEUKOPS_SERVING__MAX_BATCH", "3")
    monkeypatch.setenv("LEUKOPS_SERVING__CORS_ORIGINS", '["https://lab.example"]')
    monkeypatch.setenv("LEUKOPS_GATE__MACRO_F1_MIN", "0.9")
    monkeypatch.setenv("LEUKOPS_S3_ENDPOINT", "https://s3.example.org:443")
    settings = Settings(profile="prod", _env_file=None)
    assert settings.secret("s3_secret_key") == "sk-from-env-Vb3qXr9Zt1LmW8"
    assert settings.secret("serving.token") == "tok-Vb3qXr9Zt1LmW8pQ"
    assert settings.serving.max_batch == 3 and settings.serving.cors_origins == ["https://lab.example"]
    assert settings.gate.macro_f1_min == 0.9
    assert settings.s3_secure and settings.s3_host == "s3.example.org:443"
    assert settings.registered_model_name("wbc") == "leukops-wbc"


def test_dags_parse_in_prod_with_only_s3_and_mlflow_settings(tmp_path):
    """An Airflow DAG processor holds no serving token: parsing the DAG files must not ask for one."""
    code = (
        "import json, sys\n"
        "from airflow.dag_processing.dagbag import DagBag\n"
        "from pipelines.core.settings import get_settings\n"
        "bag = DagBag(sys.argv[1])\n"
        "errors = {k: str(v) for k, v in bag.import_errors.items()}\n"
        "token = get_settings().serving.token is not None\n"
        "print(json.dumps({'dags': sorted(bag.dags), 'errors': errors, 'token': token}))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEUKOPS_")}
    env |= {
        "LEUKOPS_PROFILE": "prod",
        "LEUKOPS_S3_ENDPOINT": "http://s3.invalid:9000",
        "LEUKOPS_S3_ACCESS_KEY": "ak",
        "LEUKOPS_S3_SECRET_KEY": "sk",
        "LEUKOPS_MLFLOW_TRACKING_URI": "http://mlflow.invalid:5000",
        "LEUKOPS_CONFIG_FILE": str(REPO / "leukops.yaml"),
        "AIRFLOW_HOME": str(tmp_path / "airflow"),
        "PYTHONPATH": str(REPO),
    }
    # cwd: a folder without a .env, so no token can come from a developer's file
    out = subprocess.run(
        [sys.executable, "-c", code, str(REPO / "dags")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["errors"] == {} and result["token"] is False
    assert result["dags"] == ["leukops_drift", "leukops_ingest", "leukops_nightly_retrain"]
