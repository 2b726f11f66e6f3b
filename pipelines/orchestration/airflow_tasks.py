"""Entry points of the Airflow tasks: resolve settings, call one library stage, return small JSON.

Inside Airflow the connections ``leukops_s3`` and ``leukops_mlflow`` override the S3 and MLflow
settings, so one set of DAGs runs against the embedded stack and compose. Every function here is
idempotent: a rerun with the same Airflow run id finds and returns what the first attempt made.
"""

from __future__ import annotations

import logging
from datetime import date, datetime, timedelta
from typing import Any

from pipelines.core.errors import LeukopsError
from pipelines.core.settings import Settings, get_settings
from pipelines.io.layout import (
    drift_checked_batches_key,
    drift_dag_report_id,
    drift_verdict_key,
    ingest_report_key,
    retrain_last_attempt_key,
)
from pipelines.io.storage import ObjectMissingError, ObjectStore
from pipelines.orchestration.params import overrides_of, with_overrides

log = logging.getLogger(__name__)

AIRFLOW_RUN_KEY_TAG = "airflow_candidate_key"


class FlowError(LeukopsError):
    pass


class InvalidCandidateError(FlowError):
    """A grid cell that cannot train whatever the retries (a name off the allow-lists): fail it at once."""


class NoSurvivorError(FlowError):
    """Every planned grid cell failed: nothing to gate (a retry of the gate cannot change that)."""


# -- settings through Airflow connections ---------------------------------------------------------


def _airflow_connection(conn_id: str):
    try:
        from airflow.sdk import Connection

        return Connection.get(conn_id)
    except Exception as err:  # outside Airflow, or no such connection: plain settings apply
        log.debug("no Airflow connection %s (%s); using settings", conn_id, err)
        return None


def task_settings(params: dict[str, Any] | None = None) -> Settings:
    """The settings, with the S3/MLflow values of the Airflow connections when they exist and the run's
    validated overrides (``params``: the DAG run's params, see ``orchestration.params``)."""
    settings = with_overrides(get_settings(), params or {})
    overrides: dict[str, Any] = {}
    s3 = _airflow_connection("leukops_s3")
    if s3 is not None:
        from pydantic import SecretStr

        extra = s3.extra_dejson
        overrides |= {"s3_access_key": SecretStr(s3.login), "s3_secret_key": SecretStr(s3.password)}
        if extra.get("endpoint_url"):
            overrides["s3_endpoint"] = extra["endpoint_url"]
    mlflow = _airflow_connection("leukops_mlflow")
    if mlflow is not None and mlflow.host:
        host = mlflow.host if "://" in mlflow.host else f"{mlflow.schema or 'http'}://{mlflow.host}"
        overrides["mlflow_tracking_uri"] = f"{host}:{mlflow.port}" if mlflow.port else host
    return settings.model_copy(update=overrides) if overrides else settings


def _store(settings: Settings) -> ObjectStore:
    return ObjectStore.from_settings(settings)


def _read_state(store: ObjectStore, key: str) -> dict[str, Any] | None:
    try:
        return store.get_json(key)
    except ObjectMissingError:
        return None


# -- leukops_ingest ------------------------------------------------------------------------------


def sources_to_poll(source: str | None) -> list[str]:
    from pipelines.data.sources import list_sources, load_source

    settings = task_settings()
    if source:
        return [load_source(source, settings).name]
    return [s.name for s in list_sources(settings)]


def pending_files(source: str) -> int:
    """Files at the source's location whose path no manifest of this source has seen yet."""
    from pipelines.data.manifests import all_manifests
    from pipelines.data.sources import list_files, load_source, reader_for

    settings = task_settings()
    spec = load_source(source, settings)
    seen = set(all_manifests(_store(settings), source).get("path", []))
    return sum(1 for f in list_files(spec, reader_for(spec, settings)) if f.path not in seen)


def ingest(source: str, run_id: str, run_date: str) -> dict[str, Any]:
    """Ingest + validate one source; the report is kept under the run id so a retry (or a cleared task)
    returns the same verdict instead of "nothing new"."""
    from pipelines.data.ingest import ingest_source
    from pipelines.data.sources import load_source

    settings = task_settings()
    store = _store(settings)
    report_key = ingest_report_key(source, run_id)
    if (stored := _read_state(store, report_key)) is not None:
        return stored
    report = ingest_source(load_source(source, settings), settings, store, run_date=run_date).to_dict()
    store.put_json(report_key, report)
    return report


def ingest_verdict(report: dict[str, Any]) -> dict[str, Any]:
    """quarantined -> the task fails with the reasons and the Data Docs link; nothing new -> skip."""
    status = report["status"]
    if status == "quarantined":
        message = f"{report['message']}; Data Docs: {report.get('data_docs')}"
        return {"action": "quarantined", "message": message, "batch_id": report.get("batch_id")}
    if status == "nothing_new":
        return {"action": "nothing_new", "message": report["message"]}
    return {
        "action": "accepted",
        "message": report["message"],
        "source": report["source"],
        "batch_id": report["batch_id"],
        "accepted": report["accepted"],
        "rejected": report["rejected"],
        "data_docs": report.get("data_docs"),
    }


# -- leukops_nightly_retrain -----------------------------------------------------------------------


def snapshot_tasks(params: dict[str, Any]) -> list[dict[str, Any]]:
    from pipelines.data.snapshot import snapshot_summary, take_snapshot

    settings = task_settings(params)
    store = _store(settings)
    return [snapshot_summary(task, take_snapshot(store, settings, task)) for task in settings.retrain.tasks]


def plan_candidates(snapshots: list[dict[str, Any]], run_id: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    """The grid (settings + the run's overrides) for every task whose snapshot changed since the last
    attempt (or all, when forced)."""
    force, reason = bool(params.get("force")), str(params.get("reason") or "").strip()
    if force and not reason:
        raise FlowError("force=true needs a reason (it is recorded with the runs)")
    settings = task_settings(params)
    store = _store(settings)
    grid = settings.retrain
    candidates = []
    for snap in snapshots:
        task, version = snap["task"], snap["dataset_version"]
        last = _read_state(store, retrain_last_attempt_key(task))
        if not snap["images"]:
            log.warning("task %s: empty snapshot, nothing to train", task)
            continue
        if last and last["dataset_version"] == version and not force:
            log.info("task %s: snapshot %s already attempted by %s; skipping", task, version, last["run_id"])
            continue
        for backbone in grid.backbones:
            for augment in grid.augmentations:
                candidates.append(
                    {
                        "task": task,
                        "dataset_version": version,
                        "backbone": backbone,
                        "augment": augment,
                        "candidate_key": f"{run_id}/{task}/{backbone}/{augment}",
                        "reason": reason or "scheduled retrain",
                    }
                )
    log.info("planned %d candidate(s); run overrides: %s", len(candidates), overrides_of(params) or "none")
    return candidates


def check_cell(candidate: dict[str, Any]) -> None:
    from pipelines.model.augment import AUGMENTATIONS
    from pipelines.model.backbones import BACKBONES

    if candidate["backbone"] not in BACKBONES:
        raise InvalidCandidateError(f"unknown backbone {candidate['backbone']!r}; allowed: {', '.join(BACKBONES)}")
    if candidate["augment"] not in AUGMENTATIONS:
        raise InvalidCandidateError(
            f"unknown augmentation {candidate['augment']!r}; allowed: {', '.join(AUGMENTATIONS)}"
        )


def train(candidate: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """Train one grid cell; a rerun of the same Airflow run returns the finished run instead."""
    from pipelines.model.candidate import finished_candidate, train_candidate

    check_cell(candidate)
    settings = task_settings(params)
    finished = finished_candidate(settings, {AIRFLOW_RUN_KEY_TAG: candidate["candidate_key"]})
    if finished is not None:
        return {**candidate, **finished.to_dict(), "reused": True}
    grid = settings.retrain
    result = train_candidate(
        settings,
        candidate["task"],
        candidate["backbone"],
        candidate["augment"],
        dataset_version=candidate["dataset_version"],
        image_size=grid.image_size,
        max_images=grid.max_images,
        batch_size=grid.batch_size,
        epochs=grid.epochs,
        time_budget_min=grid.time_budget_min,
        extra_tags={AIRFLOW_RUN_KEY_TAG: candidate["candidate_key"], "retrain_reason": candidate["reason"]},
    )
    return {**candidate, **result.to_dict(), "reused": False}


def explain(trained: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    from pipelines.trust.explain import explain_run

    settings = task_settings(params)
    grid = settings.retrain
    summary = explain_run(
        trained["run_id"], samples=grid.explain_samples, lime_images=grid.explain_lime_images, settings=settings
    )
    return {**trained, "explain": summary}


def survivors(planned: list[dict[str, Any]], finished: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The planned candidates that were trained and explained; FlowError when none was (every cell failed)."""
    done = {c["candidate_key"] for c in finished}
    lost = [c["candidate_key"] for c in planned if c["candidate_key"] not in done]
    if planned and not finished:
        raise NoSurvivorError(
            f"every candidate failed ({', '.join(lost)}): nothing to gate; see the train/explain logs"
        )
    if lost:
        log.warning("%d of %d candidate(s) failed and are left out of the gate: %s", len(lost), len(planned), lost)
    return finished


def gate_and_promote(
    planned: list[dict[str, Any]], finished: list[dict[str, Any]], run_id: str, params: dict[str, Any]
) -> dict[str, Any]:
    """Per task: rank the surviving candidates by validation F1, gate in that order (gate floors: settings
    + the run's overrides), promote the first that passes; record the attempted snapshot so an unchanged
    snapshot is not retrained every night."""
    from pipelines.trust.promote import select_and_promote

    candidates = survivors(planned, finished)
    settings = task_settings(params)
    store = _store(settings)
    outcomes = {}
    for task in sorted({c["task"] for c in candidates}):
        mine = [c for c in candidates if c["task"] == task]
        reason = f"{mine[0]['reason']} (airflow run {run_id})"
        outcome = select_and_promote([c["run_id"] for c in mine], reason, settings)
        trained = {c["candidate_key"] for c in mine}
        outcome["failed_candidates"] = [
            c["candidate_key"] for c in planned if c["task"] == task and c["candidate_key"] not in trained
        ]
        store.put_json(
            retrain_last_attempt_key(task),
            {
                "dataset_version": mine[0]["dataset_version"],
                "run_id": run_id,
                "promoted": outcome["promoted"],
                "version": outcome["version"],
            },
        )
        outcomes[task] = outcome
    return outcomes


# -- leukops_drift ---------------------------------------------------------------------------------


def _batches_to_check(store: ObjectStore, task: str) -> list[str]:
    from pipelines.data.manifests import published_batches
    from pipelines.data.sources import list_sources

    checked = set((_read_state(store, drift_checked_batches_key(task)) or {}).get("ids", []))
    feeding = {s.name for s in list_sources(task_settings()) if task in s.tasks}
    batches = []
    for source, batch_id in published_batches(store):
        if source in feeding and batch_id not in checked:
            batches.append(batch_id)
    return batches


def _new_labelled_images(store: ObjectStore, settings: Settings, task: str, champion_version: str) -> int:
    """Accepted training images of the task that the champion's snapshot does not hold."""
    from pipelines.data.manifests import accepted_rows
    from pipelines.data.snapshot import load_snapshot
    from pipelines.data.sources import list_sources

    trained_on = set(load_snapshot(store, task, champion_version).frame["sha256"])
    feeding = [s for s in list_sources(settings) if s.role == "train" and task in s.tasks]
    shas = set().union(*(set(accepted_rows(store, s.name)["sha256"]) for s in feeding)) if feeding else set()
    return len(shas - trained_on)


def check_drift(task: str, run_id: str, when: datetime) -> dict[str, Any]:
    """Drift of the batches not checked yet and of the serving log window, against the champion.

    The verdict is stored under the run id and returned as is on a retry; the checked-batches state is
    written last and only lists batches that produced a report.
    """
    from pipelines.monitor.inputs import find_champion

    settings = task_settings()
    store = _store(settings)
    verdict_key = drift_verdict_key(task, run_id)
    if (stored := _read_state(store, verdict_key)) is not None:
        return stored
    champion = find_champion(settings, task)
    if champion is None:
        return {
            "task": task,
            "reports": [],
            "retrain_recommended": False,
            "new_labelled_images": 0,
            "note": f"no @champion for {task}: nothing to compare against",
        }
    end = when.date()
    start = end - timedelta(days=settings.schedules.drift_window_days)
    currents = [f"batch:{b}" for b in _batches_to_check(store, task)] + [f"serving:{start}..{end}"]
    reports = _drift_reports(task, currents, run_id, end, settings, store)
    verdict = {
        "task": task,
        "champion_version": champion.version,
        "reports": reports,
        "retrain_recommended": any(r["retrain_recommended"] for r in reports),
        "new_labelled_images": _new_labelled_images(store, settings, task, champion.dataset_version),
    }
    store.put_json(verdict_key, verdict)
    _mark_batches_checked(store, task, reports)
    return verdict


def _drift_reports(
    task: str, currents: list[str], run_id: str, run_date: date, settings: Settings, store: ObjectStore
) -> list[dict[str, Any]]:
    """One drift report per current set against the champion; sets that cannot be compared are left out."""
    from pipelines.monitor.drift import monitor
    from pipelines.monitor.features import DriftError

    reports = []
    for current in currents:
        report_id = drift_dag_report_id(task, current, run_id)
        try:
            outcome = monitor(
                task, "champion", current, settings=settings, store=store, run_date=run_date, report_id=report_id
            )
        except DriftError as err:  # e.g. no serving requests in the window, a batch too small to compare
            log.info("drift %s: %s", current, err)
            continue
        reports.append({"current": current, **outcome.to_dict()})
        log.info("drift %s (%d/%d): %s", current, len(reports), len(currents), reports[-1].get("report_html"))
    return reports


def _mark_batches_checked(store: ObjectStore, task: str, reports: list[dict[str, Any]]) -> None:
    checked = [r["current"].split(":", 1)[1] for r in reports if r["current"].startswith("batch:")]
    previous = (_read_state(store, drift_checked_batches_key(task)) or {}).get("ids", [])
    store.put_json(drift_checked_batches_key(task), {"ids": sorted({*previous, *checked})})


def retrain_decision(verdicts: list[dict[str, Any]]) -> dict[str, Any]:
    """retrain: drift and new labels; alert: drift but no new labels (QA must look); none otherwise."""
    drifted = [v for v in verdicts if v["retrain_recommended"]]
    if not drifted:
        return {"action": "none", "message": "no drift that calls for a retrain", "tasks": []}
    with_labels = [v["task"] for v in drifted if v["new_labelled_images"] > 0]
    links = [r["report_html"] for v in drifted for r in v["reports"] if r["retrain_recommended"]]
    if not with_labels:
        return {
            "action": "alert",
            "message": f"drift detected for {', '.join(v['task'] for v in drifted)} but no new labelled "
            f"images to retrain on; reports: {', '.join(links)}",
            "tasks": [],
        }
    return {
        "action": "retrain",
        "message": f"retrain requested for {', '.join(with_labels)}",
        "tasks": with_labels,
        "reports": links,
    }
