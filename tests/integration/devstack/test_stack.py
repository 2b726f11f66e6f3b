"""The embedded local stack and the storage adapter against the real SeaweedFS + MLflow servers."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from pipelines.core.settings import Settings
from pipelines.devstack.processes import StackError
from pipelines.devstack.stack import LocalStack
from pipelines.io import layout
from pipelines.io.storage import BucketMissingError, ObjectStore, StorageAuthError, sha256_hex
from tests.conftest import _free_port_block


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *args], capture_output=True, text=True, timeout=120, env=os.environ
    )


def test_status_json_reports_both_healthy(stack):
    result = _cli("stack", "status", "--json")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["s3"]["healthy"] is True and status["mlflow"]["healthy"] is True
    assert status["s3"]["endpoint"] == os.environ["LEUKOPS_S3_ENDPOINT"]


def test_json_and_parquet_round_trip(store):
    import pandas as pd

    frame = pd.DataFrame({"sha256": ["a", "b"], "label": ["Early", "Pro"]})
    store.put_parquet("tests/frame.parquet", frame)
    store.put_json("tests/doc.json", {"k": [1, 2]})
    assert store.get_parquet("tests/frame.parquet").equals(frame)
    assert store.get_json("tests/doc.json") == {"k": [1, 2]}


def test_wrong_secret_is_refused_by_the_server(store, settings):
    intruder = ObjectStore(
        settings.s3_host, settings.secret("s3_access_key"), "not-the-secret", settings.data_bucket, retries=0
    )
    with pytest.raises(StorageAuthError, match="refused"):
        intruder.put_bytes("tests/intruder.txt", b"x")
    assert not store.exists("tests/intruder.txt")


def test_missing_bucket_is_a_clear_error(stack, settings):
    with pytest.raises(BucketMissingError, match="no-such-bucket"):
        ObjectStore.from_settings(settings, bucket="no-such-bucket").check()


def test_raw_objects_cannot_be_deleted(store):
    key = layout.raw_key(sha256_hex(b"immutable bytes"), "jpg")
    store.put_bytes(key, b"immutable bytes")
    with pytest.raises(Exception, match="immutable"):
        store.delete(key)
    assert store.exists(key)


def test_mlflow_artifact_lands_in_the_s3_bucket(stack, settings, tmp_path):
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    mlflow.set_experiment("stack-test")
    note = tmp_path / "note.txt"
    note.write_text("proxied artifact")
    with mlflow.start_run() as run:
        mlflow.log_artifact(str(note))
    artifacts = ObjectStore.from_settings(settings, bucket=settings.artifacts_bucket)
    keys = [k for k in artifacts.list() if run.info.run_id in k]
    assert any(k.endswith("note.txt") for k in keys), keys
    assert artifacts.get_bytes(next(k for k in keys if k.endswith("note.txt"))) == b"proxied artifact"


def _isolated_settings(tmp_path: Path) -> Settings:
    s3_port, mlflow_port = _free_port_block()
    return Settings(
        profile="dev",
        state_dir=tmp_path / "state",
        s3_endpoint=f"http://127.0.0.1:{s3_port}",
        mlflow_tracking_uri=f"http://127.0.0.1:{mlflow_port}",
        _env_file=None,
    )


def test_busy_port_is_a_clear_error_not_a_hang(tmp_path):
    settings = _isolated_settings(tmp_path)
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", int(settings.s3_endpoint.rsplit(":", 1)[1])))
        blocker.listen()
        with pytest.raises(StackError, match="already in use"):
            LocalStack(settings).up()
    assert LocalStack(settings).pids() == {}


def test_down_stops_everything_it_started_and_data_persists(tmp_path):
    settings = _isolated_settings(tmp_path)
    local = LocalStack(settings)
    local.up()
    ObjectStore.from_settings(settings).put_bytes("persist/me.txt", b"still here")
    pids = local.pids()
    assert set(pids) == {"s3", "mlflow"}
    groups = {os.getpgid(pid) for pid in pids.values()}
    local.down()
    assert local.pids() == {}
    leftover = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _pgid(p) in groups]
    assert leftover == []
    local.up()
    try:
        assert ObjectStore.from_settings(settings).get_bytes("persist/me.txt") == b"still here"
    finally:
        local.down()


def _pgid(proc: Path) -> int | None:
    try:
        return int((proc / "stat").read_text().rsplit(")", 1)[1].split()[2])
    except (OSError, IndexError, ValueError):
        return None
