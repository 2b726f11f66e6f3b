"""Fault injection with real servers and processes killed by pid (SIGKILL).

The session's servers are never killed: a fault case starts a process of its own on the session's stores
(a SeaweedFS of its own; a second MLflow server on the session's Postgres database and artifact bucket)
and kills that one.
A training process is the unit tests' tiny net (``fault_train_job``): ``leukops train`` runs the same
``fit`` with the same checkpoint code, but a real backbone would not fit this file's time. Two ingests + two
snapshots at once, in real parallel processes, are proven in ``tests/integration/data/test_concurrency.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from pipelines.cli.fsck import report
from pipelines.data.ingest import ingest_source
from pipelines.data.manifests import all_manifests
from pipelines.data.sources import load_source
from pipelines.devstack.mlflow_server import MlflowServer
from pipelines.devstack.processes import ProcessDir, busy_ports, port_is_free
from pipelines.devstack.seaweedfs import SeaweedFS, seaweed_ports
from pipelines.io import layout
from pipelines.io.registry import Registry, RegistryError
from pipelines.io.storage import ObjectStore
from pipelines.trust.journal import DONE, UNFINISHED_PROMOTION, entries, journaled_move
from pipelines.trust.promote import promotion_moves
from tests.conftest import REPO_ROOT, searchable
from tests.integration.data.commands import cli

TASK = "binary_all"
MLFLOW_FAILS_FAST = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}


LABELS = ("Benign=Healthy", "Early=ALL", "Pre=ALL", "Pro=ALL")
INGEST_IMAGES = 12  # per class folder: uploads long enough to kill the server among them


def _free_port() -> int:
    return next(p for p in range(41000, 42000, 7) if port_is_free(p))


def _free_s3_port() -> int:
    return next(p for p in range(42000, 44000, 20) if all(port_is_free(q) for q in seaweed_ports(p).values()))


def _start(processes: ProcessDir, service, timeout_s: float | None = None) -> None:
    service.prepare()
    processes.spawn(service.name, service.command(), service.env())
    processes.wait_ready(service.name, service.ready, timeout_s or service.ready_timeout_s)


@pytest.fixture(scope="module")
def private_s3(stack, settings, tmp_path_factory):
    """A SeaweedFS of its own (the session's keys): ``(settings, processes, server)``."""
    private = settings.model_copy(update={"s3_endpoint": f"http://127.0.0.1:{_free_s3_port()}"})
    root = searchable(tmp_path_factory.mktemp("private-s3"))
    server, processes = SeaweedFS(private, root), ProcessDir(root)
    _start(processes, server)
    yield private, processes, server
    processes.stop(server.name, timeout_s=10)


@pytest.fixture(scope="module")
def private_mlflow(stack, settings, tmp_path_factory):
    """A second MLflow server on the session's database and bucket: ``(settings, processes)``."""
    private = settings.model_copy(update={"mlflow_tracking_uri": f"http://127.0.0.1:{_free_port()}"})
    root = searchable(tmp_path_factory.mktemp("private-mlflow"))
    server, processes = MlflowServer(private, root, stack.postgres), ProcessDir(root)
    _start(processes, server, timeout_s=300)  # a loaded 2-core machine needs minutes for MLflow's imports
    yield private, processes
    processes.stop(server.name, timeout_s=10)


def _two_versions(settings) -> None:
    """Versions 1 and 2 of the task's (fresh) model, 1 @champion; sources need not hold a model."""
    client = Registry.from_settings(settings).client  # logged in as the settings' user
    name = settings.registered_model_name(TASK)
    client.create_registered_model(name)
    for n in (1, 2):
        client.create_model_version(name, f"s3://{settings.artifacts_bucket}/faults/{name}/{n}")
    client.set_registered_model_alias(name, "champion", "1")


def _kill(processes: ProcessDir, name: str) -> None:
    """SIGKILL a server's whole process group (its pid leads it) and wait until it is gone."""
    pid = processes.pid(name)
    assert pid is not None, f"{name} is not running"
    os.killpg(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while processes.pid(name) is not None:  # a zombie counts as gone (ProcessDir.pid)
        assert time.monotonic() < deadline, f"{name} (pid {pid}) still alive after SIGKILL"
        time.sleep(0.1)


def _wait_until_free(ports: dict[str, int], timeout_s: float = 30) -> None:
    """A SIGKILLed Go server's leader turns zombie before its last thread has closed the listeners: a restart
    on the same ports waits for them."""
    deadline = time.monotonic() + timeout_s
    while busy := busy_ports(ports):
        assert time.monotonic() < deadline, f"ports still bound {timeout_s:.0f}s after the kill: {busy}"
        time.sleep(0.2)


def _leukops_process(env: dict[str, str], *args: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "pipelines.cli", *args, "--json"]
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, "cwd": REPO_ROOT}
    return subprocess.Popen(command, env=os.environ | MLFLOW_FAILS_FAST | env, **pipes)


def _leukops(env: dict[str, str], *args: str) -> tuple[int, dict]:
    process = _leukops_process(env, *args)
    out, err = process.communicate(timeout=300)
    assert out.strip(), err
    return process.returncode, json.loads(out.strip().splitlines()[-1])


def _copy(shared_data: Path, root: Path, start: int) -> Path:
    for label in ("Benign", "Early", "Pre", "Pro"):
        (root / label).mkdir(parents=True)
        for f in sorted((shared_data / "all_taleqani" / label).iterdir())[start : start + INGEST_IMAGES]:
            shutil.copyfile(f, root / label / f.name)
    return root


def test_s3_killed_mid_ingest_then_restarted_the_rerun_completes_nothing_lost_fsck_clean(
    private_s3, capsys, shared_data, tmp_path
) -> None:
    private, processes, server = private_s3
    name = f"faults-{uuid.uuid4().hex[:6]}"
    folder = _copy(shared_data, tmp_path / name, start=300)
    assert (
        cli(capsys, "source", "add", name, "--path", str(folder), "--task", "five_class", "--label-map", *LABELS)[0]
        == 0
    )
    env = {"LEUKOPS_S3_ENDPOINT": private.s3_endpoint}
    bucket = ObjectStore.from_settings(private)

    first = _leukops_process(env, "ingest", name, "--date", "2026-12-01", "--workers", "2")
    deadline = time.monotonic() + 120
    while not bucket.list(f"{layout.RAW_SHARDS}/") and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    _kill(processes, server.name)  # among the uploads, before the manifest
    out, err = first.communicate(timeout=180)
    assert first.returncode != 0, f"the ingest finished before the kill: {out[-500:]}"

    _wait_until_free(seaweed_ports(int(private.s3_endpoint.rsplit(":", 1)[1])))
    _start(processes, server)  # the same data dir: what was acknowledged is there
    rerun = ingest_source(load_source(name, private), private, bucket, run_date="2026-12-01", workers=2).to_dict()
    assert rerun["status"] == "accepted", rerun
    accepted = all_manifests(bucket).query("status == 'accepted'")["sha256"].nunique()
    assert len(bucket.list(f"{layout.RAW_SHARDS}/")) == accepted == rerun["accepted"] > 0
    healthy = report(bucket)
    assert healthy["problems"] == [] and healthy["checked"]["raw_objects"] == accepted


def test_mlflow_killed_between_alias_moves_ends_all_new_after_fsck_repair(
    private_mlflow, settings, store, monkeypatch
) -> None:
    private, processes = private_mlflow
    private = private.model_copy(update={"registered_model_prefix": f"f{uuid.uuid4().hex[:8]}"})
    shared = settings.model_copy(update={"registered_model_prefix": private.registered_model_prefix})
    _two_versions(private)
    registry = Registry.from_settings(private)
    moves = promotion_moves(registry.aliases(TASK), "2", approval_required=False)  # previous=1, then champion=2
    for name, value in MLFLOW_FAILS_FAST.items():
        monkeypatch.setenv(name, value)

    apply = Registry._apply
    calls = []

    def apply_then_kill(self, name, alias, version, before):  # the server dies right after the first move
        apply(self, name, alias, version, before)
        calls.append(alias)
        if len(calls) == 1:
            _kill(processes, "mlflow")

    monkeypatch.setattr(Registry, "_apply", apply_then_kill)
    with pytest.raises(RegistryError, match="unfinished"):
        journaled_move(registry, store, TASK, moves, {"action": "promote", "who": "faults", "why": "kill"})
    monkeypatch.undo()

    half = Registry.from_settings(shared).aliases(TASK)  # the same database, through the session's server
    assert half == {"champion": "1", "previous": "1"}  # half moved: @previous equals @champion
    (entry,) = [e for e in entries(store, TASK) if e.before == {"champion": "1"} and e.state != DONE]

    env = {
        "LEUKOPS_MLFLOW_TRACKING_URI": shared.mlflow_tracking_uri,
        "LEUKOPS_REGISTERED_MODEL_PREFIX": shared.registered_model_prefix,
    }
    assert entry.key in {p["key"] for p in report(store)["problems"] if p["kind"] == UNFINISHED_PROMOTION}
    code, repaired = _leukops(env, "fsck", "--repair")
    assert {"key": entry.key, "task": TASK, "state": DONE, "aliases": {"champion": "2", "previous": "1"}} in (
        repaired["repaired"]
    )
    assert not [p for p in repaired["problems"] if p["kind"] == UNFINISHED_PROMOTION]
    after = Registry.from_settings(shared)
    assert after.aliases(TASK) == {"champion": "2", "previous": "1"}
    assert any(r.get("journal") == entry.entry_id for r in after.version(TASK, "2").audit)
    assert store.get_json(layout.promotion_journal_key(TASK, entry.entry_id))["state"] == DONE


def _train_process(checkpoint: Path, out: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "tests.integration.fault_train_job", str(checkpoint), str(out)]
    return subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_training_sigkilled_mid_epoch_resumes_to_the_uninterrupted_metrics(tmp_path) -> None:
    uninterrupted = _train_process(tmp_path / "whole.pt", tmp_path / "whole.json")
    killed = _train_process(tmp_path / "run.pt", tmp_path / "killed.json")
    deadline = time.monotonic() + 240
    while not (tmp_path / "run.pt").exists():  # the first epoch is checkpointed (atomic rename)
        assert killed.poll() is None and time.monotonic() < deadline, killed.stdout.read()
        time.sleep(0.05)
    time.sleep(0.4)  # an epoch lasts about a second: well inside the next one
    os.kill(killed.pid, signal.SIGKILL)
    assert killed.wait(timeout=30) == -signal.SIGKILL and not (tmp_path / "killed.json").exists()

    resumed = _train_process(tmp_path / "run.pt", tmp_path / "resumed.json")
    assert resumed.wait(timeout=240) == 0, resumed.stdout.read()
    assert uninterrupted.wait(timeout=240) == 0, uninterrupted.stdout.read()
    after, whole = (json.loads((tmp_path / f).read_text()) for f in ("resumed.json", "whole.json"))
    assert after["resumed_from_epoch"] in (1, 2, 3) and whole["resumed_from_epoch"] is None
    assert after["epochs"] == whole["epochs"] == [0, 1, 2, 3]
    assert after["val_losses"] == pytest.approx(whole["val_losses"], abs=1e-6)
    assert after["val_macro_f1"] == pytest.approx(whole["val_macro_f1"], abs=1e-6)
    assert after["best_val_f1"] == pytest.approx(whole["best_val_f1"], abs=1e-6)
