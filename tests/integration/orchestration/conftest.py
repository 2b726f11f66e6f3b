"""The scheduler fixture: a whole second local stack (own state dir, ports, sources, registered-model
prefix) with Airflow on top (CeleryExecutor: api-server, scheduler, dag-processor, triggerer, default
and gpu workers), started once per session through the product's own ``LocalStack`` and stopped at
the end (only what it started).

Its config file is a copy of ``leukops.yaml`` with a tiny training grid and open gate floors, so even a
run nobody passed a conf to (an asset-triggered retrain) stays lean; the plumbing, not the model, is
what these tests check (the gate's decisions have their own tests).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from pipelines.core.settings import Settings, get_settings
from pipelines.devstack.airflow_rest import AirflowClient
from pipelines.devstack.stack import LocalStack
from tests.conftest import REPO_ROOT, _free_port_block, searchable

DAGS = REPO_ROOT / "dags"
TASK = "all_subtypes"
DAG_IDS = ("leukops_ingest", "leukops_nightly_retrain", "leukops_drift")
CATCH_UP_TIMEOUT_S = 300
PARSE_INTERVAL_S = 15  # how often the dag-processor re-reads a DAG file (Airflow's default: 30 s)
TINY_RETRAIN = {
    "tasks": [TASK],
    "backbones": ["efficientnet_lite0"],
    "augmentations": ["none"],
    "epochs": 1,
    "image_size": 64,
    "batch_size": 8,
    "time_budget_min": 5,
    "explain_samples": 4,
    "explain_lime_images": 1,
}
OPEN_GATE = {
    "macro_f1_min": 0.0,
    "class_recall_min": 0.0,
    "nucleus_enrichment_min": 0.0,
    "cell_enrichment_min": 0.0,
    "shortcut_flip_rate_max": 1.0,
}


@dataclass
class Scheduler:
    settings: Settings
    stack: LocalStack
    client: AirflowClient
    config_file: Path
    startup_s: float

    def set_schedule(self, section: str, key: str, cron: str) -> None:
        """Change a schedule in the config file; the dag-processor's next parse applies it."""
        self.set_config(section, {key: cron})

    def set_config(self, section: str, values: dict) -> dict:
        """Change values of a config-file section (each task process reads the file); returns the old ones."""
        config = yaml.safe_load(self.config_file.read_text())
        old = {key: config.get(section, {}).get(key) for key in values}
        config.setdefault(section, {}).update(values)
        self.config_file.write_text(yaml.safe_dump(config))
        return old


def cron_at(moment: datetime) -> str:
    """A cron that fires once a day, at ``moment``'s minute (UTC)."""
    return f"{moment.minute} {moment.hour} * * *"


def next_minute_after(delay_s: float) -> datetime:
    moment = datetime.now(UTC) + timedelta(seconds=delay_s)
    return moment.replace(second=0, microsecond=0) + timedelta(minutes=1)


def _test_config(path: Path) -> Path:
    config = yaml.safe_load((REPO_ROOT / "leukops.yaml").read_text())
    config["retrain"] = {**config.get("retrain", {}), **TINY_RETRAIN}
    for recipe in config["retrain"].get("per_task", {}).values():
        recipe.pop("image_size", None)  # a task's own size (wbc: 160 px) would win over the tiny one
    config["gate"] = {**config.get("gate", {}), **OPEN_GATE}
    path.write_text(yaml.safe_dump(config))
    return path


def _wait_for_catch_up_runs(client: AirflowClient) -> None:
    """Unpaused, each DAG first runs its latest past cron slot (catchup=False); let those end, so no test's
    run queues behind one (max_active_runs=1) or finds its files already taken by a catch-up poll."""
    deadline = time.monotonic() + CATCH_UP_TIMEOUT_S
    while time.monotonic() < deadline:
        runs = {dag_id: client.dag_runs(dag_id) for dag_id in DAG_IDS}
        if all(runs.values()) and all(r["state"] in ("success", "failed") for rs in runs.values() for r in rs):
            return
        time.sleep(3)
    raise TimeoutError(f"the catch-up runs of {DAG_IDS} did not end in {CATCH_UP_TIMEOUT_S}s: {runs}")


@pytest.fixture(scope="session")
def scheduler(tmp_path_factory: pytest.TempPathFactory, session_env: dict[str, str]) -> Iterator[Scheduler]:
    state_dir = searchable(tmp_path_factory.mktemp("scheduler-state"))
    s3_port, mlflow_port = _free_port_block()
    env = {
        "LEUKOPS_STATE_DIR": str(state_dir),
        "LEUKOPS_SOURCES_DIR": str(tmp_path_factory.mktemp("scheduler-sources")),
        "LEUKOPS_S3_ENDPOINT": f"http://127.0.0.1:{s3_port}",
        "LEUKOPS_MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}",
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}",
        "LEUKOPS_AIRFLOW_URL": f"http://127.0.0.1:{mlflow_port + 1}",
        "LEUKOPS_CONFIG_FILE": str(_test_config(state_dir / "leukops.yaml")),
        "LEUKOPS_REGISTERED_MODEL_PREFIX": "schedtest",
        "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": str(PARSE_INTERVAL_S),
    }
    started = time.monotonic()
    with pytest.MonkeyPatch.context() as patch:  # the components keep this env; the test process does not
        for key, value in env.items():
            patch.setenv(key, value)
        get_settings.cache_clear()
        settings = get_settings()
        local = LocalStack(settings)
        try:
            local.up()
            local.airflow.up(DAGS)
        except BaseException:
            local.down()
            raise
    get_settings.cache_clear()
    client = local.airflow.client()
    _wait_for_catch_up_runs(client)
    startup_s = time.monotonic() - started
    sys.__stderr__.write(f"\n[scheduler fixture] stack + Airflow (CeleryExecutor) healthy in {startup_s:.0f}s\n")
    try:
        yield Scheduler(settings, local, client, Path(env["LEUKOPS_CONFIG_FILE"]), startup_s)
    finally:
        local.down()
