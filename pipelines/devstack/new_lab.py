"""A new lab joins, under the scheduler: the drift → label → retrain loop as an operator runs it.

1. The first lab's folder is registered and ingested (``leukops_ingest`` through the REST API), and a
   retrain run (REST) makes its model ``@champion``.
2. The new lab's labelled folder is registered (with its own split shares, so its test split can carry
   the gate's per-site checks) and ingested.
3. A ``leukops_drift`` run (REST) compares the new batch with the champion's training data; drift *with*
   new labelled images emits the ``leukops_retrain_request`` asset event.
4. The scheduler starts ``leukops_nightly_retrain`` from that event (not by hand): it snapshots both labs,
   trains, explains and gates the candidate, per site included, and promotes it when every check passes.

Nothing here trains or gates: each step is a DAG run, judged by its final state and its XComs.
`benchmarks/new_lab.py --loop` runs this on the real PBC and CellaVision images and prints the per-site
table; the scheduler integration test runs it on a few images of each.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.core.errors import LeukopsError
from pipelines.core.settings import Settings

RUN_TIMEOUT_S = {"leukops_ingest": 900, "leukops_nightly_retrain": 3600, "leukops_drift": 1200}
ASSET_RUN_WAIT_S = 120  # the scheduler queues an asset-triggered run within a few of its loops


class LoopError(LeukopsError):
    """A step of the loop did not end as it must; the message has the run's task states and log tails."""


@dataclass(frozen=True)
class Lab:
    """One lab's labelled image folder (one sub-folder per class of the task)."""

    source: str
    folder: Path
    split_shares: dict[str, float] | None = None  # None = the ledger's 80/10/10


@dataclass
class Loop:
    settings: Settings
    client: Any  # devstack.airflow_rest.AirflowClient
    task: str
    say: Callable[[str], None] = print
    stages: dict[str, float] = field(default_factory=dict)  # stage → wall seconds
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)  # stage → the DAG run (as the API gives it)

    def staged(self, stage: str, step: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        started = time.monotonic()
        self.say(f"{stage}: started")
        run = step()
        self.stages[stage] = round(time.monotonic() - started, 1)
        self.runs[stage] = run
        self.say(f"{stage}: {run['state']} in {self.stages[stage]:.0f} s ({run['dag_run_id']})")
        return run


def register(settings: Settings, task: str, lab: Lab) -> None:
    """What ``leukops source add NAME --path FOLDER --task TASK [--split ...]`` writes."""
    from pipelines.data.sources import Source, default_label_map, save_source

    source = Source(
        lab.source,
        str(lab.folder.resolve()),
        "folders",
        default_label_map([task]),
        (task,),
        split_shares=lab.split_shares,
        notes="registered by the new-lab loop",
    )
    save_source(source, settings, replace=True)


def failure_report(client: Any, dag_id: str, run: dict[str, Any]) -> str:
    """The run's task states and the log tail of each failed task instance."""
    instances = sorted(client.task_instances(dag_id, run["dag_run_id"]), key=lambda t: (t["task_id"], t["map_index"]))
    states = ", ".join(f"{ti['task_id']}[{ti['map_index']}]={ti['state']}" for ti in instances)
    logs = [
        f"--- {ti['task_id']}[{ti['map_index']}] try {ti['try_number']}:\n"
        + client.task_log(dag_id, run["dag_run_id"], ti["task_id"], ti["try_number"], ti["map_index"])[-3000:]
        for ti in instances
        if ti["state"] == "failed"
    ]
    return "\n".join([f"{dag_id} {run['dag_run_id']} {run['state']}: {states}", *logs])


def _finished(client: Any, dag_id: str, run: dict[str, Any]) -> dict[str, Any]:
    run = client.wait(dag_id, run["dag_run_id"], RUN_TIMEOUT_S[dag_id])
    if run["state"] != "success":
        raise LoopError(failure_report(client, dag_id, run))
    return run


def _triggered(loop: Loop, dag_id: str, conf: dict[str, Any]) -> dict[str, Any]:
    return _finished(loop.client, dag_id, loop.client.trigger(dag_id, conf))


def _asset_triggered_retrain(loop: Loop, before: set[str]) -> dict[str, Any]:
    """The retrain run the scheduler started from the drift run's request (never one started here)."""
    dag_id = "leukops_nightly_retrain"
    deadline = time.monotonic() + ASSET_RUN_WAIT_S
    while not (new := [r for r in loop.client.dag_runs(dag_id) if r["dag_run_id"] not in before]):
        if time.monotonic() > deadline:
            raise LoopError(f"the drift run's retrain request started no {dag_id} run in {ASSET_RUN_WAIT_S} s")
        time.sleep(3)
    if new[0]["run_type"] != "asset_triggered":
        raise LoopError(f"{dag_id} {new[0]['dag_run_id']} was started as {new[0]['run_type']}, not by the asset event")
    return _finished(loop.client, dag_id, new[0])


def _returned(loop: Loop, stage: str, dag_id: str, task_id: str) -> list[Any]:
    return loop.client.xcom_returns(dag_id, loop.runs[stage]["dag_run_id"], task_id)


def run_loop(loop: Loop, first: Lab, new: Lab, champion_conf: dict[str, Any] | None = None) -> dict[str, Any]:
    """The whole loop; returns the stage times, the drift verdict, the retrain request and the new
    champion's gate outcome (per-site figures, before = the old champion on the same test images)."""
    settings, task = loop.settings, loop.task
    register(settings, task, first)
    loop.staged("ingest first lab", lambda: _triggered(loop, "leukops_ingest", {"source": first.source}))
    conf = {"tasks": [task], "force": True, "reason": f"new-lab loop: {first.source} champion", **(champion_conf or {})}
    loop.staged("champion on first lab", lambda: _triggered(loop, "leukops_nightly_retrain", conf))
    before = _outcome(loop, "champion on first lab")
    if not before["promoted"]:
        raise LoopError(f"the first lab's candidate was not promoted: {_failed_checks(before)}")
    register(settings, task, new)
    loop.staged("ingest new lab", lambda: _triggered(loop, "leukops_ingest", {"source": new.source}))
    retrains = {r["dag_run_id"] for r in loop.client.dag_runs("leukops_nightly_retrain")}
    loop.staged("drift", lambda: _triggered(loop, "leukops_drift", {"tasks": [task]}))
    requests = _returned(loop, "drift", "leukops_drift", "request_retrain")
    if not requests:  # skipped: no drift that calls for a retrain, or no champion to compare with
        raise LoopError(
            f"the drift run requested no retrain: {_returned(loop, 'drift', 'leukops_drift', 'check_drift')}"
        )
    request = requests[0]
    loop.staged("retrain from the drift event", lambda: _asset_triggered_retrain(loop, retrains))
    after = _outcome(loop, "retrain from the drift event")
    return {
        "task": task,
        "stages_s": loop.stages,
        "runs": {stage: run["dag_run_id"] for stage, run in loop.runs.items()},
        "drift": _returned(loop, "drift", "leukops_drift", "check_drift"),
        "retrain_request": request,
        "retrain_run_type": loop.runs["retrain from the drift event"]["run_type"],
        "champion_before": before,
        "champion_after": after,
    }


def _outcome(loop: Loop, stage: str) -> dict[str, Any]:
    """The task's gate outcome of a retrain run, with the gated candidate's result first."""
    outcome = _returned(loop, stage, "leukops_nightly_retrain", "gate_and_promote")[0][loop.task]
    chosen = next((r for r in outcome["results"] if r["run_id"] == outcome["selected_run_id"]), None)
    return {**outcome, "chosen": chosen or (outcome["results"][-1] if outcome["results"] else None)}


def _failed_checks(outcome: dict[str, Any]) -> list[str]:
    chosen = outcome.get("chosen") or {}
    return [f"{c['name']}: {c['detail']}" for c in chosen.get("checks", []) if not c["passed"]] or [str(outcome)]


def site_rows(outcome: dict[str, Any]) -> list[dict[str, Any]]:
    """Per site of the candidate's test split: n, macro-F1 (interval), the champion's on the same images."""
    chosen = outcome.get("chosen") or {}
    return [
        {
            "site": s["source"],
            "n": s["n"],
            "gated": s["gated"],
            "macro_f1": s["macro_f1"],
            "interval": s["f1_interval"],
            "champion_macro_f1": s.get("champion_macro_f1"),
            "classes_absent": s["classes_absent"],
        }
        for s in chosen.get("sites", [])
    ]


def site_checks(outcome: dict[str, Any]) -> list[dict[str, Any]]:
    chosen = outcome.get("chosen") or {}
    return [c for c in chosen.get("checks", []) if c["name"].startswith("site_")]


def render_sites(outcome: dict[str, Any]) -> str:
    """The per-site table of a gate outcome, as the loop prints it."""
    lines = [
        "| site | n test | gated | macro-F1 (95% CI) | old champion, same images |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in site_rows(outcome):
        low, high = row["interval"]
        before = "-" if row["champion_macro_f1"] is None else f"{row['champion_macro_f1']:.3f}"
        gated = "yes" if row["gated"] else "reported"
        lines.append(
            f"| {row['site']} | {row['n']} | {gated} | {row['macro_f1']:.3f} ({low:.3f}-{high:.3f}) | {before} |"
        )
    return "\n".join(lines)
