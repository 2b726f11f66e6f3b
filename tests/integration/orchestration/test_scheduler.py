"""The DAGs under the real scheduler (CeleryExecutor on the local stack): runs are started the way users
and Airflow start them — a cron firing, the REST API (no logical date), an asset event — and judged by
their final DAG-run and task states, their XComs and where each task ran (queue and worker).

The tests share one scheduler and build on each other in file order (ingest → retrain → drift → the
retrain the drift run requests); each waits for its own runs only.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipelines.devstack.airflow_services import worker_names
from tests.integration.orchestration.conftest import OPEN_GATE, TASK, Scheduler, cron_at, next_minute_after

pytestmark = pytest.mark.airflow

CLASSES = ("Benign", "Early", "Pre", "Pro")
# Real smears 20-31 of each class: the sha256 split puts at least two of each class in the test share
# (the gate checks every class's recall), which the first dozen Benign ones are not.
PER_CLASS, OFFSET = 12, 20
RUN_TIMEOUT_S = 420
SCHEDULE_WAIT_S = 150
PARSE_WAIT_S = 35  # the dag-processor re-reads the DAG files every 15 s; a margin for a busy machine


def _states(scheduler: Scheduler, dag_id: str, run_id: str) -> dict[str, list[dict]]:
    instances: dict[str, list[dict]] = {}
    for ti in sorted(scheduler.client.task_instances(dag_id, run_id), key=lambda t: (t["task_id"], t["map_index"])):
        instances.setdefault(ti["task_id"], []).append(ti)
    return instances


def _run_to_end(scheduler: Scheduler, dag_id: str, conf: dict | None = None) -> dict:
    run = scheduler.client.trigger(dag_id, conf)  # "logical_date": null, as the UI and most callers send
    assert run["logical_date"] is None, run
    return scheduler.client.wait(dag_id, run["dag_run_id"], RUN_TIMEOUT_S)


def _failure_report(scheduler: Scheduler, dag_id: str, run: dict) -> str:
    """Task states of the run, and the log tail of each failed task instance."""
    states = _states(scheduler, dag_id, run["dag_run_id"])
    summary = f"{dag_id} {run['dag_run_id']} {run['state']}: " + ", ".join(
        f"{task}={[ti['state'] for ti in tis]}" for task, tis in states.items()
    )
    failed = [ti for tis in states.values() for ti in tis if ti["state"] == "failed"]
    logs = [
        f"--- {ti['task_id']}[{ti['map_index']}] try {ti['try_number']}:\n"
        + scheduler.client.task_log(dag_id, run["dag_run_id"], ti["task_id"], ti["try_number"], ti["map_index"])[-3000:]
        for ti in failed
    ]
    return "\n".join([summary, *logs])


def _register(scheduler: Scheduler, name: str, folder: Path) -> None:
    from pipelines.data.sources import Source, save_source

    save_source(Source(name, str(folder), "folders", {c: c for c in CLASSES}, (TASK,)), scheduler.settings)


def _assert_trained_on_the_gpu_worker(train_instances: list[dict]) -> None:
    for ti in train_instances:
        assert ti["queue"] == "gpu", ti
        assert ti["hostname"] == worker_names()["gpu"], ti


def _retrain_conf(scheduler: Scheduler, **conf) -> dict:
    """The conf, holding only params the retrain DAG declares (helper D may add or drop gate params)."""
    declared = scheduler.client._send("GET", "/dags/leukops_nightly_retrain/details")["params"]
    return {key: value for key, value in conf.items() if key in declared}


def test_a_cron_schedule_fires_a_run(scheduler: Scheduler):
    """A near cron (set through the config file, as an operator would) makes the scheduler start a run by
    itself; no source is registered yet, so the poll finds nothing and the run ends `success`."""
    fire_at = next_minute_after(PARSE_WAIT_S)  # after the dag-processor's next parse of the new schedule
    scheduler.set_schedule("schedules", "ingest_poll", cron_at(fire_at))
    deadline = time.monotonic() + PARSE_WAIT_S + SCHEDULE_WAIT_S
    while time.monotonic() < deadline:
        fired = [r for r in scheduler.client.dag_runs("leukops_ingest") if _fired_at(r, fire_at)]
        if fired and fired[0]["state"] in ("success", "failed"):
            break
        time.sleep(5)
    assert fired, f"no scheduled leukops_ingest run at {fire_at:%H:%M} UTC"
    run = fired[0]
    assert run["state"] == "success", _failure_report(scheduler, "leukops_ingest", run)


def _fired_at(run: dict, moment: datetime) -> bool:
    """A scheduled run for ``moment`` (the DAGs also catch up on their latest past slot when unpaused)."""
    logical_date = run["logical_date"]  # a cron run has one; the REST runs below do not
    return run["run_type"] == "scheduled" and bool(logical_date) and datetime.fromisoformat(logical_date) == moment


def test_the_token_command_prints_a_bare_bearer_token(scheduler: Scheduler):
    env = os.environ | {
        "LEUKOPS_STATE_DIR": str(scheduler.settings.state_dir),
        "LEUKOPS_AIRFLOW_URL": scheduler.settings.airflow_url,
    }
    out = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "airflow", "token"], capture_output=True, text=True, env=env
    )
    assert out.returncode == 0, out.stderr[-2000:]
    token = out.stdout.strip()
    assert token.count(".") == 2 and "\n" not in token  # a JWT, nothing else on stdout
    from pipelines.devstack.airflow_rest import AirflowClient

    dags = AirflowClient(scheduler.settings.airflow_url, token).dags("leukops_")
    assert {d["dag_id"] for d in dags} >= {"leukops_ingest", "leukops_nightly_retrain", "leukops_drift"}
    assert not any(d["is_paused"] for d in dags)  # the init step unpaused them


def test_rest_triggered_ingest_of_real_images(scheduler: Scheduler, sample_images):
    images = sample_images("all_taleqani", per_class=PER_CLASS, offset=OFFSET)
    _register(scheduler, "sched-taleqani", images)
    run = _run_to_end(scheduler, "leukops_ingest", {"source": "sched-taleqani"})
    assert run["state"] == "success", _failure_report(scheduler, "leukops_ingest", run)
    states = _states(scheduler, "leukops_ingest", run["dag_run_id"])
    assert [ti["state"] for ti in states["publish_accepted"]] == ["success"]
    verdict = scheduler.client.xcom_returns("leukops_ingest", run["dag_run_id"], "publish_accepted")[0]
    # every file is judged; the real set holds a few near-duplicate smears, which the ingest rejects
    assert verdict["action"] == "accepted", verdict
    assert verdict["accepted"] + verdict["rejected"] == PER_CLASS * len(CLASSES), verdict
    assert verdict["accepted"] >= 0.9 * PER_CLASS * len(CLASSES), verdict
    events = scheduler.client.asset_events("leukops_accepted_images", "leukops_ingest")
    assert events[-1]["run_id"] == run["dag_run_id"]


def test_a_failed_grid_cell_does_not_block_promotion(scheduler: Scheduler):
    conf = _retrain_conf(
        scheduler,
        force=True,
        reason="scheduler test: one grid cell off the allow-list",
        backbones=["efficientnet_lite0", "no_such_backbone"],
        augmentations=["none"],
        min_check_images=1,
        **OPEN_GATE,
    )
    run = _run_to_end(scheduler, "leukops_nightly_retrain", conf)
    report = _failure_report(scheduler, "leukops_nightly_retrain", run)
    assert run["state"] == "success", report
    states = _states(scheduler, "leukops_nightly_retrain", run["dag_run_id"])
    assert sorted(ti["state"] for ti in states["train"]) == ["failed", "success"], report
    _assert_trained_on_the_gpu_worker(states["train"])
    assert [ti["state"] for ti in states["gate_and_promote"]] == ["success"], report
    outcome = scheduler.client.xcom_returns("leukops_nightly_retrain", run["dag_run_id"], "gate_and_promote")[0][TASK]
    assert outcome["promoted"] and len(outcome["failed_candidates"]) == 1, outcome
    from pipelines.io.registry import Registry

    champion = Registry.from_settings(scheduler.settings).aliases(TASK).get("champion")
    assert champion is not None, "the surviving candidate was not promoted"


def _stain_shifted(source: Path, target: Path) -> Path:
    """Same smears, another lab: bluer and darker."""
    for path in source.rglob("*.jpg"):
        bgr = cv2.imread(str(path))
        shifted = np.clip(bgr.astype(np.float32) * np.array([1.25, 0.8, 0.7]) - 15, 0, 255).astype(np.uint8)
        out = target / path.relative_to(source)
        out.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(out.with_suffix(".png")), shifted)
    return target


def test_drift_retrain_request_starts_the_retrain_by_asset(scheduler: Scheduler, sample_images, tmp_path):
    shifted = _stain_shifted(sample_images("all_taleqani", per_class=8), tmp_path / "shifted")
    _register(scheduler, "sched-shifted-lab", shifted)
    ingest = _run_to_end(scheduler, "leukops_ingest", {"source": "sched-shifted-lab"})
    assert ingest["state"] == "success", _failure_report(scheduler, "leukops_ingest", ingest)
    before = {r["dag_run_id"] for r in scheduler.client.dag_runs("leukops_nightly_retrain")}

    drift = _run_to_end(scheduler, "leukops_drift")
    assert drift["state"] == "success", _failure_report(scheduler, "leukops_drift", drift)
    request = scheduler.client.asset_events("leukops_retrain_request", "leukops_drift")[-1]
    assert request["run_id"] == drift["dag_run_id"] and request["extra"]["action"] == "retrain", request

    deadline = time.monotonic() + 60
    while not (
        new := [r for r in scheduler.client.dag_runs("leukops_nightly_retrain") if r["dag_run_id"] not in before]
    ):
        assert time.monotonic() < deadline, "the retrain request started no retrain run"
        time.sleep(3)
    assert new[0]["run_type"] == "asset_triggered", new[0]
    retrain = scheduler.client.wait("leukops_nightly_retrain", new[0]["dag_run_id"], RUN_TIMEOUT_S)
    report = _failure_report(scheduler, "leukops_nightly_retrain", retrain)
    assert retrain["state"] == "success", report
    states = _states(scheduler, "leukops_nightly_retrain", retrain["dag_run_id"])
    assert [ti["state"] for ti in states["train"]] == ["success"], report  # new labelled data: it trained
    _assert_trained_on_the_gpu_worker(states["train"])


def test_the_demo_summary_links_answer_over_http(scheduler: Scheduler):
    """The links `make demo` prints for the newest successful run of each DAG — Airflow runs, the MLflow
    champion version, the Data Docs and the drift report — are http URLs that answer (200 / redirect / 401)."""
    from pipelines.devstack.demo import DAGS, LINK_OK, run_summary, run_url

    runs = {}
    for dag_id in DAGS:
        done = [r for r in scheduler.client.dag_runs(dag_id) if r["state"] == "success"]
        newest = max(done, key=lambda r: r["run_after"])
        runs[dag_id] = {
            "run_id": newest["dag_run_id"],
            "state": "success",
            "url": run_url(scheduler.settings, dag_id, newest["dag_run_id"]),
        }
    links = run_summary(scheduler.settings, scheduler.client, TASK, runs)["links"]
    kinds = {label.split(" ", 1)[0] for label in links}
    assert {"Airflow", "MLflow", "Data", "drift"} <= kinds, links
    assert all(link["url"].startswith("http") for link in links.values()), links
    assert all(link["status"] in LINK_OK for link in links.values()), links


# The loop's own gate: a few dozen test images, so every check may rest on one image; the per-site checks
# run (two sites) but cannot fail on a one-epoch, 64-px model; the benchmark runs the shipped gate.
LOOP_GATE = {"min_check_images": 1, "non_inferiority_margin": 1.0, "site_non_inferiority_margin": 1.0}


def test_a_new_lab_joins_drift_with_its_labels_retrains_on_both_labs(scheduler: Scheduler, sample_images):
    """The new-lab loop on real images of two labs: PBC's champion, CellaVision labelled (split 50/10/40)
    → the drift run requests a retrain of `wbc` → the scheduler starts it from that asset event → the
    candidate, fine-tuned from that champion on both labs, passes the per-site checks and becomes @champion."""
    from pipelines.devstack.new_lab import Lab, Loop, run_loop, site_checks
    from pipelines.io.tracking import run_tags

    # 11 PBC images a class at 60/20/20 give every class a test image (the gate checks each class's recall)
    first = Lab("loop-pbc", sample_images("pbc", per_class=11), {"train": 0.6, "val": 0.2, "test": 0.2})
    new = Lab(
        "loop-cellavision", sample_images("wbc_seg_cellavision", per_class=40), {"train": 0.5, "val": 0.1, "test": 0.4}
    )
    old_gate = scheduler.set_config("gate", LOOP_GATE)
    try:
        result = run_loop(Loop(scheduler.settings, scheduler.client, "wbc", say=print), first, new)
    finally:
        scheduler.set_config("gate", old_gate)
    request = result["retrain_request"]
    assert request["action"] == "retrain" and request["tasks"] == ["wbc"], request
    assert result["retrain_run_type"] == "asset_triggered"
    drifted = [r["current"] for v in result["drift"] for r in v["reports"] if r["retrain_recommended"]]
    assert drifted and all(c.startswith("batch:") for c in drifted), result["drift"]
    before, after = result["champion_before"], result["champion_after"]
    assert before["promoted"] and after["promoted"] and after["version"] > before["version"], (before, after)
    sites = {s["source"]: s for s in after["chosen"]["sites"]}
    assert set(sites) == {first.source, new.source}, sites
    assert 0.25 * 100 <= sites[new.source]["n"] <= 0.55 * 100, sites  # its own 40 % test share of 100 images
    checks = {c["name"]: c for c in site_checks(after)}
    assert {f"site_macro_f1[{new.source}]", f"site_non_inferiority[{new.source}]"} <= set(checks), checks
    assert all(c["passed"] for c in checks.values()), checks
    assert sites[new.source]["champion_macro_f1"] is not None  # the old champion, on the same images
    tags = run_tags(scheduler.settings, after["chosen"]["run_id"])
    assert tags["warm_start"] == f"champion v{before['version']} (run {before['chosen']['run_id']})", (
        "wbc's recipe: the retrain fine-tunes the attested champion, verified in the worker"
    )
