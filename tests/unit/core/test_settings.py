import pytest

from pipelines.core.settings import DEV_S3_SECRET_KEY, Settings, SettingsError


def test_dev_profile_fills_dev_secrets(monkeypatch):
    monkeypatch.delenv("LEUKOPS_S3_SECRET_KEY", raising=False)
    settings = Settings(profile="dev", _env_file=None)
    assert settings.secret("s3_secret_key") == DEV_S3_SECRET_KEY
    assert settings.api_token is not None


@pytest.mark.parametrize("profile", ["prod", "test"])
def test_other_profiles_refuse_missing_secret(monkeypatch, profile):
    for var in ("LEUKOPS_S3_ACCESS_KEY", "LEUKOPS_S3_SECRET_KEY", "LEUKOPS_API_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(SettingsError, match="LEUKOPS_S3_ACCESS_KEY"):
        Settings(profile=profile, _env_file=None)


def test_prod_profile_with_secrets_from_env(monkeypatch):
    monkeypatch.setenv("LEUKOPS_S3_ACCESS_KEY", "ak")
    monkeypatch.setenv("LEUKOPS_S3_SECRET_KEY", "sk-from-env")
    monkeypatch.setenv("LEUKOPS_API_TOKEN", "tok")
    monkeypatch.setenv("LEUKOPS_GATE__MACRO_F1_MIN", "0.9")
    monkeypatch.setenv("LEUKOPS_S3_ENDPOINT", "https://s3.example.org:443")
    settings = Settings(profile="prod", _env_file=None)
    assert settings.secret("s3_secret_key") == "sk-from-env"
    assert settings.gate.macro_f1_min == 0.9
    assert settings.s3_secure and settings.s3_host == "s3.example.org:443"
    assert settings.registered_model_name("wbc") == "leukops-wbc"
