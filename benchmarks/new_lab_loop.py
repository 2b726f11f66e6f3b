"""The new-lab loop of ``benchmarks/new_lab.py --loop``: PBC's champion → CellaVision labelled → drift DAG →
retrain started by its asset event → per-site gate, on a private stack with Airflow (CeleryExecutor)."""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
from pathlib import Path

import yaml

from pipelines.core.settings import get_settings
from pipelines.devstack.demo import DemoRun, settle_scheduled_runs
from pipelines.devstack.new_lab import Lab, Loop, render_sites, run_loop, site_checks
from pipelines.devstack.processes import port_is_free
from pipelines.devstack.redis_server import redis_port
from pipelines.devstack.seaweedfs import seaweed_ports
from pipelines.devstack.stack import LocalStack

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA = REPO_ROOT.parent / "shared" / "data"
TASK = "wbc"
# PBC's 200 images a class give 20 test images a class at 80/10/10, under the gate's 30 per class-recall
# check: the operator's answer is a larger test share for the lab (``leukops source add --split 65/10/25``)
FIRST_LAB = Lab("pbc", DATA / "pbc", {"train": 0.65, "val": 0.1, "test": 0.25})
NEW_LAB = Lab("cellavision", DATA / "wbc_seg_cellavision", {"train": 0.5, "val": 0.1, "test": 0.4})


def free_ports() -> tuple[int, int]:
    """An S3 port whose SeaweedFS and Redis ports are free, and free MLflow and Airflow ports (+1)."""
    rng = random.Random()
    for _ in range(200):
        s3 = rng.randrange(41000, 60000, 20)
        if all(port_is_free(p) for p in [*seaweed_ports(s3).values(), redis_port(s3), s3 + 17, s3 + 18]):
            return s3, s3 + 17
    raise RuntimeError("no free port block")


def config_file(path: Path, budget_min: float, cold_start: bool) -> Path:
    """leukops.yaml as shipped, the nightly grid on the wbc task with one cell of ``budget_min`` minutes, the
    gate as shipped; ``cold_start``: every retrain from ImageNet (wbc's recipe fine-tunes the champion)."""
    config = yaml.safe_load((REPO_ROOT / "leukops.yaml").read_text())
    config["retrain"] |= {"tasks": [TASK], "augmentations": ["none"], "time_budget_min": budget_min}
    if cold_start:
        config["retrain"]["per_task"][TASK]["warm_start"] = False
    path.write_text(yaml.safe_dump(config))
    return path


def environment(state: Path, budget_min: float, cold_start: bool) -> dict[str, str]:
    s3_port, mlflow_port = free_ports()
    return {
        "LEUKOPS_PROFILE": "dev",
        "LEUKOPS_STATE_DIR": str(state),
        "LEUKOPS_SOURCES_DIR": str(state / "sources"),
        "LEUKOPS_S3_ENDPOINT": f"http://127.0.0.1:{s3_port}",
        "LEUKOPS_MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}",
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}",
        "LEUKOPS_AIRFLOW_URL": f"http://127.0.0.1:{mlflow_port + 1}",
        "LEUKOPS_CONFIG_FILE": str(config_file(state / "leukops.yaml", budget_min, cold_start)),
        "LEUKOPS_REGISTERED_MODEL_PREFIX": "newlab",
        "HF_HUB_OFFLINE": "1",
    }


def say(text: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {text}", flush=True)


def run(budget_min: float, cold_start: bool, json_out: Path | None) -> None:
    state = Path(tempfile.mkdtemp(prefix="leukops-bench-newlab-"))
    state.chmod(0o755)  # Postgres runs as its own user when we are root
    os.environ.update(environment(state, budget_min, cold_start))  # the Airflow components inherit these settings
    get_settings.cache_clear()
    settings = get_settings()
    stack = LocalStack(settings)
    started = time.monotonic()
    try:
        stack.up()
        stack.airflow.up(REPO_ROOT / "dags")
        client = stack.airflow.client()
        settle_scheduled_runs(DemoRun(settings, say), client)
        say(f"stack + Airflow up in {time.monotonic() - started:.0f} s; state {state}")
        result = run_loop(Loop(settings, client, TASK, say), FIRST_LAB, NEW_LAB)
        result["retrain_started_from"] = started_from(settings, result)
    finally:
        stack.down()
    if json_out:  # first: the figures outlive a report that fails to print
        json_out.write_text(json.dumps(result, indent=2, default=str))
    report(result)


def started_from(settings, result: dict) -> str:
    """The retrain's chosen run's ``warm_start`` tag: the champion it fine-tuned, or why it was refused."""
    from pipelines.io.tracking import run_tags

    run_id = (result["champion_after"].get("chosen") or {}).get("run_id")
    return run_tags(settings, run_id).get("warm_start", "ImageNet") if run_id else "no run"


def report(result: dict) -> None:
    print("\nstage wall times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in result["stages_s"].items()))
    for verdict in result["drift"]:
        for r in verdict["reports"]:
            print(f"drift {r['current']}: retrain_recommended={r['retrain_recommended']} ({r.get('report_url')})")
    print(f"retrain request: {result['retrain_request']['message']}; retrain run type {result['retrain_run_type']}")
    print(f"retrain started from: {result['retrain_started_from']}")
    for when in ("champion_before", "champion_after"):
        outcome = result[when]
        gated = outcome.get("chosen") or {}
        verdict = "promoted @champion" if outcome["promoted"] else f"refused: {', '.join(gated.get('failed', []))}"
        print(f"\n{when}: v{gated.get('version')} (run {gated.get('run_id')}) {verdict}")
        print(render_sites(outcome))
        chosen = outcome.get("chosen") or {}
        evidence = [c for c in chosen.get("checks", []) if c["name"].endswith(("_enrichment", "shortcut_flip_rate"))]
        for check in evidence + site_checks(outcome):
            print(f"  {check['name']}: {'pass' if check['passed'] else 'FAIL'} — {check['detail']}")
