"""`make demo`: the three DAGs end to end on the embedded stack, with a summary a person can act on.

Starts the local S3 + MLflow stack, writes a small synthetic smear source (plus a real folder when
given), runs ``leukops_ingest``, ``leukops_nightly_retrain`` and ``leukops_drift`` with
``airflow dags test`` (sqlite metadata under the state dir) and reads the outcome back from Airflow's
XComs. Demo sources live under the state dir, not in the repository's sources registry. A second run
finds nothing new to ingest and an unchanged snapshot, so it skips training: that is the idempotency
the nightly DAG relies on.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.core.settings import Settings

# summary section -> (DAG, task) whose return values it shows
SUMMARY_RETURNS = {
    "ingest": ("leukops_ingest", "ingest_and_validate"),
    "snapshot": ("leukops_nightly_retrain", "snapshot"),
    "candidates": ("leukops_nightly_retrain", "explain"),
    "promotion": ("leukops_nightly_retrain", "gate_and_promote"),
    "drift": ("leukops_drift", "check_drift"),
    "retrain_request": ("leukops_drift", "request_retrain"),
}
DEMO_GRID = {
    "LEUKOPS_RETRAIN__BACKBONES": '["efficientnet_lite0"]',
    "LEUKOPS_RETRAIN__AUGMENTATIONS": '["none", "mixup"]',
    "LEUKOPS_RETRAIN__EPOCHS": "4",
    "LEUKOPS_RETRAIN__TIME_BUDGET_MIN": "3",
    "LEUKOPS_RETRAIN__EXPLAIN_SAMPLES": "16",
}


@dataclass
class DemoRun:
    settings: Settings
    dags_dir: Path
    say: Callable[[str], None]
    started: float = field(default_factory=time.monotonic)
    runs: dict[str, str] = field(default_factory=dict)

    def step(self, text: str) -> None:
        self.say(f"[{time.monotonic() - self.started:6.1f}s] {text}")


def demo_settings(settings: Settings, task: str, image_size: int) -> Settings:
    """The demo's grid and its own sources registry, exported so the Airflow subprocesses see them."""
    overrides = {
        **DEMO_GRID,
        "LEUKOPS_RETRAIN__TASKS": f'["{task}"]',
        "LEUKOPS_RETRAIN__IMAGE_SIZE": str(image_size),
        "LEUKOPS_SOURCES_DIR": str((settings.state_dir / "demo" / "sources").resolve()),
    }
    for key, value in overrides.items():
        if key == "LEUKOPS_SOURCES_DIR":
            os.environ[key] = value  # never the real registry: demo sources point into the state dir
        else:
            os.environ.setdefault(key, value)  # an exported grid value wins over the demo's
    from pipelines.core.settings import get_settings

    get_settings.cache_clear()
    return get_settings()


def register_sources(settings: Settings, task: str, data: Path | None, per_class: int, size: int) -> list[str]:
    from pipelines.core.taxonomy import get_task
    from pipelines.data.sources import Source, save_source
    from pipelines.devstack.synthetic import write_synthetic

    classes = get_task(task).classes
    identity = {c: c for c in classes}
    synth_dir = (settings.state_dir / "demo" / f"synth-{task}-{per_class}x{size}").resolve()
    if not (synth_dir / "synth.json").exists():
        write_synthetic(synth_dir, task, per_class, size, seed=0)
    sources = [
        Source(
            f"demo-synth-{task}",
            str(synth_dir / "images"),
            "folders",
            identity,
            (task,),
            notes="synthetic smears written by `leukops demo`",
        )
    ]
    if data is not None:
        sources.append(
            Source(
                f"demo-data-{task}",
                str(data.resolve()),
                "folders",
                identity,
                (task,),
                notes="real image folder given to `make demo DATA=...`",
            )
        )
    for source in sources:
        save_source(source, settings, replace=True)
    return [s.name for s in sources]


def _run(demo: DemoRun, dag_id: str) -> dict[str, Any]:
    from pipelines.devstack.airflow_local import dags_test

    demo.step(f"airflow dags test {dag_id} ...")
    result = dags_test(demo.settings, demo.dags_dir, dag_id)
    demo.runs[dag_id] = result.run_id
    demo.step(f"{dag_id}: {result.state}  " + ", ".join(f"{t}={'/'.join(s)}" for t, s in result.task_states.items()))
    return {"run_id": result.run_id, "state": result.state, "tasks": result.task_states, "log": str(result.log_path)}


def _returns(demo: DemoRun) -> dict[str, list]:
    """The summary's sections (``SUMMARY_RETURNS``), read from the runs' XComs in one query."""
    from pipelines.devstack.airflow_local import task_returns

    instances = [(dag_id, demo.runs[dag_id], task_id) for dag_id, task_id in SUMMARY_RETURNS.values()]
    return dict(zip(SUMMARY_RETURNS, task_returns(demo.settings, instances), strict=True))


def run_demo(
    settings: Settings,
    task: str,
    data: Path | None,
    dags_dir: Path,
    *,
    per_class: int = 40,
    image_size: int = 128,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    from pipelines.devstack.airflow_local import init
    from pipelines.devstack.stack import LocalStack

    settings = demo_settings(settings, task, image_size)
    demo = DemoRun(settings, dags_dir, say)
    demo.step("starting the embedded stack (SeaweedFS S3 + MLflow)")
    LocalStack(settings).up()
    names = register_sources(settings, task, data, per_class, image_size)
    demo.step(f"sources registered: {', '.join(names)}")
    init(settings, dags_dir)
    dag_runs = {dag: _run(demo, dag) for dag in ("leukops_ingest", "leukops_nightly_retrain", "leukops_drift")}
    return {
        "task": task,
        "dag_runs": dag_runs,
        **_returns(demo),
        "wall_s": round(time.monotonic() - demo.started, 1),
        "mlflow_ui": settings.mlflow_tracking_uri,
    }


def _pct(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, int | float) else "n/a"


def render_summary(summary: dict[str, Any]) -> str:
    lines = [f"leukops demo — task {summary['task']} — {summary['wall_s']} s", ""]
    for report in summary["ingest"]:
        lines.append(f"ingest  {report['source']}: {report['status']} — {report['message']}")
        if report.get("data_docs"):
            lines.append(f"        Data Docs: {report['data_docs']}")
    for snap in summary["snapshot"][0] if summary["snapshot"] else []:
        lines.append(f"dataset {snap['task']}: version {snap['dataset_version']}  counts {snap['counts']}")
    if not summary["candidates"]:
        lines.append("retrain skipped: the snapshot equals the last attempted one (rerun with force + reason)")
    for cand in summary["candidates"]:
        gradcam = cand.get("explain", {}).get("gradcam", {})
        shortcut = cand.get("explain", {}).get("shortcut", {})
        lines.append(
            f"candidate {cand['backbone']}/{cand['augment']}: val F1 {_pct(cand['val_f1'])}  test F1 "
            f"{_pct(cand['test_f1'])}  nucleus enrichment {_pct(gradcam.get('nucleus_enrichment'))}  "
            f"shortcut flip rate {_pct(shortcut.get('flip_rate'))}  run {cand['run_id']}"
        )
    for outcomes in summary["promotion"]:
        for task, outcome in outcomes.items():
            lines.append(f"gate    {task}: promoted={outcome['promoted']} version={outcome['version']}")
            for result in outcome["results"]:
                failed = ", ".join(c["name"] for c in result["checks"] if not c["passed"])
                lines.append(f"        run {result['run_id']}: {'PASS' if result['passed'] else 'FAIL ' + failed}")
    for verdict in summary["drift"]:
        for report in verdict.get("reports", []):
            lines.append(
                f"drift   {verdict['task']} {report['current']}: drift={report['drift_detected']} "
                f"retrain_recommended={report['retrain_recommended']}  report {report['report_html']}"
            )
        if verdict.get("note"):
            lines.append(f"drift   {verdict['task']}: {verdict['note']}")
    state = summary["dag_runs"]["leukops_drift"]["tasks"].get("request_retrain", ["?"])[0]
    lines += [
        f"retrain request from drift: {state}",
        "",
        f"MLflow UI: {summary['mlflow_ui']}",
        "Airflow UI: `make airflow-up` then http://localhost:8080",
    ]
    return "\n".join(lines)
