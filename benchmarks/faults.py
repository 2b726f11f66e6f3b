"""Fault injection on a private local stack: the scenarios of ``tests/integration/test_faults.py`` as a table.

Starts its own stack (SeaweedFS, Postgres, Redis, MLflow; temp state dir, free ports), then:

1. ``s3-killed-mid-ingest``: SeaweedFS SIGKILLed (its process group, by pid) once the first original is
   uploaded, restarted, the ingest rerun: objects in raw/ must equal the distinct accepted shas;
2. ``mlflow-killed-mid-promotion``: the MLflow server SIGKILLed between the two alias moves of a promotion,
   restarted, ``leukops fsck --repair``: the aliases must be all old or all new, @previous != @champion;
3. ``train-killed-mid-epoch``: a training process SIGKILLed inside an epoch, resumed from its checkpoint:
   the final metrics must equal an uninterrupted run's to 1e-6 (same seed, fixed epochs, no budget);
4. ``two-ingests-two-snapshots``: two ingests, then two snapshots, each pair in real parallel processes:
   one ledger generation, no label lost.

Columns: scenario, outcome, objects (raw/ objects, or versions/epochs), orphans (fsck problems after the
scenario), seconds. It ends with ``leukops fsck``, which must report 0 problems.

    .venv/bin/python benchmarks/faults.py
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(Path(__file__).resolve().parent), str(REPO_ROOT)]
from ingest import DEFAULT_DATA, free_ports  # noqa: E402 - the benchmarks share one free-port finder

from pipelines.cli.fsck import report  # noqa: E402
from pipelines.core.settings import Settings, get_settings  # noqa: E402
from pipelines.data.ledger_store import read_ledger  # noqa: E402
from pipelines.data.manifests import all_manifests  # noqa: E402
from pipelines.data.sources import Source, save_source  # noqa: E402
from pipelines.devstack.stack import LocalStack  # noqa: E402
from pipelines.io import layout  # noqa: E402
from pipelines.io.registry import Registry, RegistryError  # noqa: E402
from pipelines.io.storage import ObjectStore  # noqa: E402
from pipelines.trust.journal import journaled_move  # noqa: E402
from pipelines.trust.promote import promotion_moves  # noqa: E402
from tests.integration.data import concurrency_jobs as jobs  # noqa: E402
from tests.integration.data.parallel import run_parallel  # noqa: E402

TASK = "five_class"
PROMOTION_TASK = "binary_all"
LABEL_MAP = {"Benign": "Healthy", "Early": "ALL", "Pre": "ALL", "Pro": "ALL"}  # folder -> five_class class
PER_CLASS = 12
RUN_DATE = "2026-12-01"
FAIL_FAST = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}


def kill(stack: LocalStack, name: str) -> None:
    """SIGKILL a service's process group by its pid; wait until it is gone."""
    pid = stack.processes.pid(name)
    os.killpg(pid, signal.SIGKILL)
    while stack.processes.pid(name) is not None:
        time.sleep(0.1)


def leukops(*args: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "pipelines.cli", *args, "--json"]
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    return subprocess.Popen(command, cwd=REPO_ROOT, env=os.environ | FAIL_FAST, **pipes)


def output(process: subprocess.Popen) -> tuple[int, dict]:
    out, err = process.communicate(timeout=600)
    lines = out.strip().splitlines()
    return process.returncode, json.loads(lines[-1]) if lines else {"error": err[-500:]}


def add_source(settings: Settings, data: Path, root: Path, name: str, start: int) -> None:
    for label in LABEL_MAP:
        (root / name / label).mkdir(parents=True)
        for f in sorted((data / label).iterdir())[start : start + PER_CLASS]:
            shutil.copyfile(f, root / name / label / f.name)
    save_source(Source(name, str(root / name), "folders", LABEL_MAP, (TASK,)), settings, replace=True)


def orphans(store: ObjectStore) -> int:
    return len(report(store)["problems"])


def s3_killed_mid_ingest(stack: LocalStack, settings: Settings, store: ObjectStore, data: Path, root: Path):
    add_source(settings, data, root, "faults-s3", start=200)
    first = leukops("ingest", "faults-s3", "--date", RUN_DATE, "--workers", "2")
    while not store.list(f"{layout.RAW_SHARDS}/") and first.poll() is None:
        time.sleep(0.05)
    kill(stack, "s3")
    interrupted = output(first)[0] != 0
    stack.up()
    code, rerun = output(leukops("ingest", "faults-s3", "--date", RUN_DATE, "--workers", "2"))
    raw = len(store.list(f"{layout.RAW_SHARDS}/"))
    accepted = all_manifests(store).query("status == 'accepted'")["sha256"].nunique()
    ok = interrupted and code == 0 and raw == accepted == rerun.get("accepted")
    return ("interrupted, rerun complete" if ok else f"FAILED {rerun}"), raw


def mlflow_killed_mid_promotion(stack: LocalStack, settings: Settings, store: ObjectStore, *_):
    client = Registry.from_settings(settings).client  # logged in as the settings' user
    name = settings.registered_model_name(PROMOTION_TASK)
    client.create_registered_model(name)
    for n in (1, 2):
        client.create_model_version(name, f"s3://{settings.artifacts_bucket}/faults/{name}/{n}")
    client.set_registered_model_alias(name, "champion", "1")
    registry = Registry.from_settings(settings)
    moves = promotion_moves(registry.aliases(PROMOTION_TASK), "2", approval_required=False)
    apply, calls = Registry._apply, []

    def apply_then_kill(self, *args):
        apply(self, *args)
        calls.append(args)
        if len(calls) == 1:
            kill(stack, "mlflow")

    Registry._apply = apply_then_kill
    os.environ.update(FAIL_FAST)
    try:
        journaled_move(registry, store, PROMOTION_TASK, moves, {"action": "promote", "who": "bench", "why": "kill"})
        return "FAILED: the move was not interrupted", 2
    except RegistryError:
        pass
    finally:
        Registry._apply = apply
    stack.up()
    code, repaired = output(leukops("fsck", "--repair"))
    aliases = Registry.from_settings(settings).aliases(PROMOTION_TASK)
    end = {"champion": "2", "previous": "1"}
    ok = repaired.get("repaired") and aliases in ({"champion": "1"}, end)
    return (f"repaired: all {'new' if aliases == end else 'old'} {aliases}" if ok else f"FAILED {aliases}"), 2


def train_killed_mid_epoch(stack, settings, store, data, root: Path):
    def train(checkpoint: str, out: str) -> subprocess.Popen:
        command = [sys.executable, "-m", "tests.integration.fault_train_job", str(root / checkpoint), str(root / out)]
        return subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    whole, killed = train("whole.pt", "whole.json"), train("run.pt", "killed.json")
    while not (root / "run.pt").exists():
        time.sleep(0.05)
    time.sleep(0.4)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    train("run.pt", "resumed.json").wait()
    whole.wait()
    after, ref = (json.loads((root / f).read_text()) for f in ("resumed.json", "whole.json"))
    same = all(abs(a - b) <= 1e-6 for a, b in zip(after["val_losses"], ref["val_losses"], strict=True))
    ok = same and after["resumed_from_epoch"] and after["best_val_f1"] == ref["best_val_f1"]
    return (f"resumed at epoch {after['resumed_from_epoch']}, metrics equal" if ok else "FAILED"), len(ref["epochs"])


def two_ingests_two_snapshots(stack, settings: Settings, store: ObjectStore, data: Path, root: Path):
    for name, start in (("faults-a", 230), ("faults-b", 260)):
        add_source(settings, data, root, name, start)
    ingests = run_parallel(jobs.ingest_job, [(settings.data_bucket, s, RUN_DATE) for s in ("faults-a", "faults-b")])
    snapshots = run_parallel(jobs.snapshot_job, [(settings.data_bucket, TASK)] * 2)
    ledger = read_ledger(store, TASK).frame
    accepted = all_manifests(store).query("status == 'accepted'")["sha256"].nunique()
    ok = (
        all("error" not in r for r in ingests + snapshots)
        and snapshots[0]["version"] == snapshots[1]["version"]
        and ledger["sha256"].is_unique
        and len(ledger) == accepted
    )
    return (f"ledger {len(ledger)} rows = accepted shas" if ok else f"FAILED {ingests} {snapshots}"), len(
        store.list(f"{layout.RAW_SHARDS}/")
    )


SCENARIOS: dict[str, Callable] = {
    "s3-killed-mid-ingest": s3_killed_mid_ingest,
    "mlflow-killed-mid-promotion": mlflow_killed_mid_promotion,
    "train-killed-mid-epoch": train_killed_mid_epoch,
    "two-ingests-two-snapshots": two_ingests_two_snapshots,
}


def main() -> int:
    state = Path(tempfile.mkdtemp(prefix="leukops-bench-faults-"))
    s3_port, mlflow_port = free_ports()
    env = {
        "LEUKOPS_PROFILE": "dev",
        "LEUKOPS_STATE_DIR": str(state),
        "LEUKOPS_SOURCES_DIR": str(state / "sources"),
        "LEUKOPS_S3_ENDPOINT": f"http://127.0.0.1:{s3_port}",
        "LEUKOPS_MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}",
        "LEUKOPS_REGISTERED_MODEL_PREFIX": f"faults{uuid.uuid4().hex[:6]}",
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}",
        "HF_HUB_OFFLINE": "1",
    }
    os.environ.update(env)  # the CLI subprocesses and spawned jobs read the same settings
    get_settings.cache_clear()
    settings = get_settings()
    state.chmod(0o755)  # Postgres runs as its own user when we are root
    stack = LocalStack(settings)
    stack.up()
    rows = []
    try:
        store = ObjectStore.from_settings(settings)
        for name, scenario in SCENARIOS.items():
            start = time.perf_counter()
            try:
                outcome, objects = scenario(stack, settings, store, DEFAULT_DATA, state / name)
            except Exception as err:  # noqa: BLE001 - a broken scenario is a row of the table, not the end
                outcome, objects = f"FAILED {type(err).__name__}: {err}"[:80], 0
            rows.append((name, outcome, objects, orphans(store), time.perf_counter() - start))
        final = report(store)
    finally:
        stack.down()
    print(f"{'scenario':<30} {'outcome':<48} {'objects':>7} {'orphans':>7} {'seconds':>8}")
    for name, outcome, objects, found, seconds in rows:
        print(f"{name:<30} {outcome:<48} {objects:>7} {found:>7} {seconds:>8.1f}")
    print(f"leukops fsck: {len(final['problems'])} problem(s); checked {json.dumps(final['checked'])}")
    shutil.rmtree(state, ignore_errors=True)
    return 1 if final["problems"] or any(r[1].startswith("FAILED") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
