"""The least-privilege S3 identities: rendered from the key catalog, one key pair each, admin kept out of
the components (SeaweedFS identities file, MinIO policies, compose, the stores' credentials)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipelines.core.settings import S3_ROLES, Settings
from pipelines.devstack import s3_roles
from pipelines.devstack.seaweedfs import HEALTH_BUCKET, SeaweedFS
from pipelines.io import layout
from pipelines.io.storage import ObjectStore

REPO = Path(__file__).resolve().parents[3]
POLICIES = REPO / "infra" / "minio" / "policies"
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
ROOT_PAIR = {"LEUKOPS_S3_ACCESS_KEY", "LEUKOPS_S3_SECRET_KEY"}


@pytest.fixture
def dev_settings() -> Settings:
    return Settings(profile="dev", data_bucket="d", _env_file=None)


def test_every_settings_role_has_a_catalog_entry() -> None:
    assert set(layout.ROLE_WRITES) == set(layout.ROLE_READS) == set(S3_ROLES)
    assert set(layout.ROLE_DELETES) <= set(S3_ROLES)
    for role, deletes in layout.ROLE_DELETES.items():
        assert set(deletes) <= set(layout.ROLE_WRITES[role])


def test_identities_file_has_the_admin_and_one_pair_per_role(dev_settings, tmp_path) -> None:
    seaweed = SeaweedFS(dev_settings, tmp_path)
    seaweed.prepare()
    assert (seaweed.identities_file.stat().st_mode & 0o777) == 0o600
    identities = s3_roles.seaweed_identities(dev_settings)["identities"]
    assert [i["name"] for i in identities] == ["admin", *S3_ROLES]
    keys = [i["credentials"][0]["accessKey"] for i in identities]
    assert len(set(keys)) == len(keys)  # no two identities share a key
    assert identities[0]["actions"] == s3_roles.ADMIN_ACTIONS
    assert all("Admin" not in i["actions"] for i in identities[1:])


def test_serving_may_write_only_its_request_log_and_read_only_its_images(dev_settings) -> None:
    actions = s3_roles.seaweed_actions("serving", "d")
    assert actions == [
        f"Read:d/{layout.SERVING_IMAGES}/*",
        f"Write:d/{layout.SERVING_REQUESTS}/*",
        f"Write:d/{layout.SERVING_IMAGES}/*",
    ]


def test_ingest_writes_raw_but_not_reports_and_reads_landing_buckets() -> None:
    actions = s3_roles.seaweed_actions("ingest", "d")
    assert f"Write:d/{layout.RAW}/*" in actions and "Read" in actions and "List" in actions
    assert not any(a.startswith(f"Write:d/{layout.DRIFT_REPORTS}") for a in actions)
    assert "Write" not in actions and "Write:d" not in actions  # never bucket-wide


def test_training_and_drift_read_the_data_bucket_only() -> None:
    for role in ("training", "drift"):
        actions = s3_roles.seaweed_actions(role, "d")
        assert actions[:2] == ["Read:d", "List:d"]
        assert all(a.startswith("Write:d/") and a.endswith("/*") for a in actions[2:])


@pytest.mark.parametrize("role", S3_ROLES)
def test_committed_minio_policies_match_the_catalog(role) -> None:
    text = (POLICIES / f"{role}.json").read_text()
    assert text == s3_roles.policy_file_text(role), "regenerate: python -m pipelines.devstack.s3_roles " + str(
        POLICIES.relative_to(REPO)
    )


def test_minio_policies_never_grant_version_deletion_or_admin() -> None:
    for role in S3_ROLES:
        actions = {a for st in s3_roles.minio_policy(role)["Statement"] for a in st["Action"]}
        assert not {a for a in actions if "Version" in a or "Bucket" in a and "Put" in a}, actions
        deletes = [st for st in s3_roles.minio_policy(role)["Statement"] if "s3:DeleteObject" in st["Action"]]
        allowed = [f"arn:aws:s3:::leukops-data/{p}/*" for p in layout.ROLE_DELETES.get(role, ())]
        assert [r for st in deletes for r in st["Resource"]] == allowed


def test_write_minio_policies_cli_writes_one_file_per_role(tmp_path) -> None:
    s3_roles.main([str(tmp_path), "--data-bucket", "other"])
    assert sorted(p.stem for p in tmp_path.iterdir()) == sorted(S3_ROLES)
    assert "arn:aws:s3:::other/serving/requests/*" in (tmp_path / "serving.json").read_text()


def test_compose_keeps_the_root_pair_out_of_leukops_containers() -> None:
    holders = {name for name, s in COMPOSE.items() if ROOT_PAIR & set(s.get("environment") or {})}
    assert holders == set()  # MinIO, its init and MLflow name the root pair under their own variables
    serving = set(COMPOSE["serving"]["environment"])
    assert {k for k in serving if k.startswith("LEUKOPS_S3_ROLES__")} == {
        "LEUKOPS_S3_ROLES__SERVING__ACCESS_KEY",
        "LEUKOPS_S3_ROLES__SERVING__SECRET_KEY",
    }
    assert COMPOSE["serving"]["environment"]["LEUKOPS_S3_ROLE"] == "serving"
    assert COMPOSE["minio-init"]["entrypoint"][-1] == "/leukops-minio/init.sh"


def test_a_role_store_signs_with_its_own_pair(dev_settings) -> None:
    serving = ObjectStore.for_role(dev_settings, "serving")
    admin = ObjectStore.from_settings(dev_settings)
    assert serving.identity == "serving" and admin.identity == "admin"
    assert serving.client._provider.retrieve().access_key == dev_settings.secret("s3_roles.serving.access_key")
    assert admin.client._provider.retrieve().access_key == dev_settings.secret("s3_access_key")


def test_a_missing_role_key_names_its_variable() -> None:
    settings = Settings(profile="test", s3_access_key="k", s3_secret_key="s", _env_file=None)
    with pytest.raises(Exception, match="LEUKOPS_S3_ROLES__SERVING__ACCESS_KEY"):
        ObjectStore.for_role(settings, "serving")


def test_role_keys_come_from_nested_env(monkeypatch) -> None:
    monkeypatch.setenv("LEUKOPS_S3_ROLES__DRIFT__ACCESS_KEY", "drift-access-key-from-env")
    monkeypatch.setenv("LEUKOPS_S3_ROLE", "drift")
    settings = Settings(profile="dev", _env_file=None)
    assert ObjectStore.from_settings(settings).client._provider.retrieve().access_key == "drift-access-key-from-env"


def test_health_probe_lives_outside_the_data_bucket(dev_settings) -> None:
    assert HEALTH_BUCKET not in (dev_settings.data_bucket, dev_settings.artifacts_bucket)
