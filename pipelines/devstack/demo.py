"""`make demo`: the three DAGs end to end under the scheduler, with a summary a person can act on.

Starts the local stack (SeaweedFS S3, Postgres, Redis, MLflow) and Airflow on top of it (CeleryExecutor:
api-server, scheduler, dag-processor, triggerer, a default and a `gpu` worker), writes a small synthetic
smear source (plus a real folder when given), then triggers ``leukops_ingest``, ``leukops_nightly_retrain``
and ``leukops_drift`` through the REST API (JWT from ``/auth/token``) one after the other, printing a line
per task state change. The demo's short grid and its gate thresholds travel in the retrain run's conf
(``DEMO_GRID``, ``DEMO_GATE``), so the Celery workers apply them; nothing goes through this process's
environment. The stack and the UIs stay up afterwards (``leukops stack down`` stops them).

Demo sources live under the state dir (``<state_dir>/demo/sources``, the registry the demo's Airflow reads),
not in the repository's registry. A second run finds nothing new to ingest and an unchanged snapshot, so
it skips training: that is the idempotency the nightly DAG relies on.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from pipelines.core.errors import LeukopsError
from pipelines.core.settings import DEV_SECRETS, Settings

DAGS = ("leukops_ingest", "leukops_nightly_retrain", "leukops_drift")
DAG_TIMEOUT_S = {"leukops_ingest": 600, "leukops_nightly_retrain": 1800, "leukops_drift": 900}
# summary section -> (DAG, task) whose return values it shows
SUMMARY_RETURNS = {
    "ingest": ("leukops_ingest", "ingest_and_validate"),
    "snapshot": ("leukops_nightly_retrain", "snapshot"),
    "candidates": ("leukops_nightly_retrain", "explain"),
    "promotion": ("leukops_nightly_retrain", "gate_and_promote"),
    "drift": ("leukops_drift", "check_drift"),
    "retrain_request": ("leukops_drift", "request_retrain"),
}
# A two-cell grid that trains in about a minute per cell on 2 CPU cores.
DEMO_GRID = {
    "backbones": ["efficientnet_lite0"],
    "augmentations": ["none", "mixup"],
    "epochs": 4,
    "time_budget_min": 2,
    "explain_samples": 16,
    "explain_lime_images": 1,
}
# The demo's gate: the synthetic test split is a few dozen images, so the floors are "clearly better than
# chance on four classes" and each check may rest on as few images as that split holds; the
# non-inferiority check against an earlier champion and the statistics of every bound stay the gate's own.
DEMO_GATE = {
    "macro_f1_min": 0.30,
    "class_recall_min": 0.0,
    "nucleus_enrichment_min": 0.0,
    "shortcut_flip_rate_max": 1.0,
    "min_check_images": 5,
}
SETTLE_TIMEOUT_S = 180.0
LINK_OK = {200, 301, 302, 303, 307, 308, 401}  # a page, a redirect, or a login the page asks for


class DemoError(LeukopsError):
    pass


@dataclass
class DemoRun:
    settings: Settings
    say: Callable[[str], None]
    started: float = field(default_factory=time.monotonic)
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)

    def step(self, text: str) -> None:
        self.say(f"[{time.monotonic() - self.started:6.1f}s] {text}")


def demo_settings(settings: Settings) -> Settings:
    """The settings with the demo's own sources registry (the Airflow components inherit it)."""
    return settings.model_copy(update={"sources_dir": (settings.state_dir / "demo" / "sources").resolve()})


def retrain_conf(task: str, image_size: int) -> dict[str, Any]:
    return {"tasks": [task], "image_size": image_size, **DEMO_GRID, **DEMO_GATE, "reason": "make demo"}


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


def run_url(settings: Settings, dag_id: str, run_id: str) -> str:
    """The DAG run's page in the Airflow UI."""
    return f"{settings.airflow_url.rstrip('/')}/dags/{dag_id}/runs/{quote(run_id, safe='')}"


def _task_label(ti: dict[str, Any]) -> str:
    index = ti.get("map_index")
    return f"{ti['task_id']}[{index}]" if index is not None and index >= 0 else ti["task_id"]


def settle_scheduled_runs(demo: DemoRun, client: Any, timeout_s: float = SETTLE_TIMEOUT_S) -> None:
    """Let the runs of the DAGs' latest cron ticks finish before the demo registers its sources.

    Unpausing a DAG makes the scheduler run its latest tick (catchup=False only drops the older ones);
    such a run, started before the demo's sources exist, finds nothing. Registered earlier, it could
    ingest or train first, with the settings' grid instead of the demo's conf.
    """
    from datetime import UTC, datetime

    deadline = time.monotonic() + timeout_s
    for dag_id in DAGS:
        while (dag := client.dag(dag_id))["is_paused"] is False and _tick_pending(dag, datetime.now(UTC)):
            if time.monotonic() > deadline:
                raise DemoError(f"{dag_id}: the scheduler created no run for its due tick in {timeout_s:.0f} s")
            time.sleep(1)
        if dag["is_paused"]:
            raise DemoError(f"{dag_id} is paused: unpause it (`airflow dags unpause {dag_id}`) and rerun")
        for run in client.dag_runs(dag_id, state=["queued", "running"]):
            demo.step(f"{dag_id}: waiting for its scheduled run {run['dag_run_id']} to finish")
            client.wait(dag_id, run["dag_run_id"], DAG_TIMEOUT_S[dag_id])


def _tick_pending(dag: dict[str, Any], now: Any) -> bool:
    from datetime import datetime

    due = dag.get("next_dagrun_run_after")
    return due is not None and datetime.fromisoformat(due) <= now


def run_dag(demo: DemoRun, client: Any, dag_id: str, conf: dict[str, Any]) -> dict[str, Any]:
    """Trigger one run (no logical date, as from the UI), poll it, print each task's state changes."""
    run_id = client.trigger(dag_id, conf)["dag_run_id"]
    demo.step(f"{dag_id}: triggered {run_id}")
    seen: dict[str, str] = {}

    def progress(_run: dict[str, Any]) -> None:
        for ti in sorted(client.task_instances(dag_id, run_id), key=lambda t: (t["task_id"], t.get("map_index"))):
            label, state = _task_label(ti), ti.get("state") or "none"
            if seen.get(label) != state:
                seen[label] = state
                demo.step(f"{dag_id}: {label} {state}")

    run = client.wait(dag_id, run_id, DAG_TIMEOUT_S[dag_id], on_poll=progress)
    demo.step(f"{dag_id}: {run['state']}")
    return {"run_id": run_id, "state": run["state"], "url": run_url(demo.settings, dag_id, run_id), "tasks": seen}


def _returns(client: Any, runs: dict[str, dict[str, Any]]) -> dict[str, list]:
    """The summary's sections (``SUMMARY_RETURNS``) from the runs' XComs; empty for DAGs that did not run."""
    return {
        section: client.xcom_returns(dag_id, runs[dag_id]["run_id"], task_id) if dag_id in runs else []
        for section, (dag_id, task_id) in SUMMARY_RETURNS.items()
    }


def browser_url(settings: Settings, uri: str | None) -> str | None:
    """An http URL for an ``s3://bucket/key`` URI (presigned GET); other URIs as they are."""
    from pipelines.io.storage import ObjectStore

    if not uri or not uri.startswith("s3://"):
        return uri
    bucket, key = uri.removeprefix("s3://").split("/", 1)
    return ObjectStore.from_settings(settings, bucket).presigned_url(key)


def link_status(url: str) -> int | str:
    """The HTTP status the URL answers with (redirects not followed), or the connection error."""
    import httpx

    try:
        return httpx.get(url, follow_redirects=False, timeout=10).status_code
    except httpx.HTTPError as err:
        return f"unreachable ({type(err).__name__})"


def _champion(settings: Settings, task: str) -> dict[str, Any] | None:
    from pipelines.io.registry import Registry

    champion = Registry.from_settings(settings).champion(task)
    if champion is None:
        return None
    name = settings.registered_model_name(task)
    url = f"{settings.mlflow_tracking_uri.rstrip('/')}/#/models/{name}/versions/{champion.version}"
    return {"name": name, "version": int(champion.version), "run_id": champion.run_id, "url": url}


def summary_links(settings: Settings, summary: dict[str, Any]) -> dict[str, str]:
    """label -> http URL: the DAG runs, the champion's model version, the Data Docs, the drift reports."""
    links = {f"Airflow {dag_id}": run["url"] for dag_id, run in summary["dag_runs"].items()}
    if summary["champion"]:
        links["MLflow champion"] = summary["champion"]["url"]
    for report in summary["ingest"]:
        if report.get("data_docs"):
            links[f"Data Docs {report['source']}"] = browser_url(settings, report["data_docs"])
    for verdict in summary["drift"]:
        for report in verdict.get("reports", []):
            links[f"drift {verdict['task']} {report['current']}"] = browser_url(settings, report["report_html"])
    return links


def run_demo(
    settings: Settings,
    task: str,
    data: Path | None,
    dags_dir: Path,
    *,
    per_class: int = 60,
    image_size: int = 128,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    from pipelines.devstack.stack import LocalStack

    settings = demo_settings(settings)
    demo = DemoRun(settings, say)
    stack = LocalStack(settings)
    demo.step("starting the stack: SeaweedFS S3, Postgres, Redis, MLflow")
    stack.up()
    demo.step(f"starting Airflow (CeleryExecutor) at {settings.airflow_url}")
    stack.airflow.up(dags_dir)
    client = stack.airflow.client()
    settle_scheduled_runs(demo, client)
    names = register_sources(settings, task, data, per_class, image_size)
    demo.step(f"sources registered: {', '.join(names)}")
    confs = {
        "leukops_ingest": {},
        "leukops_nightly_retrain": retrain_conf(task, image_size),
        "leukops_drift": {"tasks": [task]},
    }
    for dag_id in DAGS:
        demo.runs[dag_id] = run_dag(demo, client, dag_id, confs[dag_id])
        if demo.runs[dag_id]["state"] != "success":
            break  # the next DAG would run on what this one did not produce
    summary = run_summary(settings, client, task, demo.runs)
    summary["wall_s"] = round(time.monotonic() - demo.started, 1)
    return summary


def run_summary(settings: Settings, client: Any, task: str, runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """What the runs produced (their XComs), the champion, and every link with the HTTP status it answers."""
    summary = {
        "task": task,
        "dag_runs": runs,
        **_returns(client, runs),
        "champion": _champion(settings, task),
        "mlflow_ui": settings.mlflow_tracking_uri,
        "airflow_ui": settings.airflow_url,
    }
    summary["links"] = {
        label: {"url": url, "status": link_status(url)} for label, url in summary_links(settings, summary).items()
    }
    return summary


def succeeded(summary: dict[str, Any]) -> bool:
    """All three DAG runs ended `success`."""
    return [d for d in DAGS if summary["dag_runs"].get(d, {}).get("state") == "success"] == list(DAGS)


def _pct(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, int | float) else "n/a"


def _ingest_lines(summary: dict[str, Any]) -> list[str]:
    if not summary["ingest"]:
        return ["ingest  nothing new in any demo source (the sensor skipped)"]
    return [f"ingest  {r['source']}: {r['status']} — {r['message']}" for r in summary["ingest"]]


def _retrain_lines(summary: dict[str, Any]) -> list[str]:
    lines = [
        f"dataset {snap['task']}: version {snap['dataset_version']}  counts {snap['counts']}"
        for snap in (summary["snapshot"][0] if summary["snapshot"] else [])
    ]
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
    return lines


def _drift_lines(summary: dict[str, Any]) -> list[str]:
    lines = []
    for verdict in summary["drift"]:
        for report in verdict.get("reports", []):
            lines.append(
                f"drift   {verdict['task']} {report['current']}: drift={report['drift_detected']} "
                f"retrain_recommended={report['retrain_recommended']}"
            )
        if verdict.get("note"):
            lines.append(f"drift   {verdict['task']}: {verdict['note']}")
    state = summary["dag_runs"].get("leukops_drift", {}).get("tasks", {}).get("request_retrain", "not run")
    return lines + [f"retrain request from drift: {state}"]


def _link_note(status: int | str) -> str:
    if status == 401:  # MLflow's basic auth: the page is there
        return "  <- asks for the login below"
    return "" if status in LINK_OK else "  <- does not answer"


def render_summary(summary: dict[str, Any]) -> str:
    runs = "  ".join(f"{dag}={run['state']}" for dag, run in summary["dag_runs"].items())
    lines = [f"leukops demo — task {summary['task']} — {summary['wall_s']} s — {runs}", ""]
    lines += _ingest_lines(summary) + _retrain_lines(summary) + _drift_lines(summary) + [""]
    champion = summary["champion"]
    lines.append(f"champion: {champion['name']} v{champion['version']}" if champion else "champion: none")
    for label, link in summary["links"].items():
        lines.append(f"{label}: {link['url']}  (HTTP {link['status']}){_link_note(link['status'])}")
    lines += [
        "",
        f"Airflow UI: {summary['airflow_ui']} (user admin; dev-profile password `admin`, else "
        "LEUKOPS_AIRFLOW_ADMIN_PASSWORD)",
        f"MLflow UI: {summary['mlflow_ui']} (basic auth: user admin, dev-profile password "
        f"`{DEV_SECRETS['mlflow_users.admin']}`, else LEUKOPS_MLFLOW_USERS__ADMIN; QA reads as user qa)",
        "The stack stays up; stop it with `leukops stack down`.",
    ]
    return "\n".join(lines)
