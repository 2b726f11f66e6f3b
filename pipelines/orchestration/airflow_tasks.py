"""Entry points of the Airflow tasks: resolve settings, call one library stage, return small JSON.

Inside Airflow the connections ``leukops_s3_<role>`` and ``leukops_mlflow`` override the S3 and MLflow
settings, so one set of DAGs runs against the embedded stack and compose; a task's stores sign as its
least-privilege S3 identity (ingest, training, drift); a task that talks to MLflow
logs in as its role's user, whose password comes from the connection ``leukops_mlflow_<role>``. Every function here is
idempotent: a rerun with the same Airflow run id finds and returns what the first attempt made.
"""

from __future__ import annotations

import logging
from datetime import date, datetime, timedelta
from typing import Any

from pipelines.core.errors import LeukopsError
from pipelines.core.settings import MlflowRole, S3Credentials, S3Role, Settings, get_settings
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


def _mlflow_login(settings: Settings, role: MlflowRole) -> dict[str, Any]:
    """Settings overrides that make the task log in to MLflow as ``role``: the password of the connection
    ``leukops_mlflow_<role>`` when it exists (its login must be the role's user), else the settings' own."""
    overrides: dict[str, Any] = {"mlflow_role": role}
    conn_id = f"leukops_mlflow_{role}"
    conn = _airflow_connection(conn_id)
    if conn is not None and conn.password:
        if conn.login != role:
            raise FlowError(f"Airflow connection {conn_id}: login {conn.login!r} is not the MLflow user {role!r}")
        from pydantic import SecretStr

        overrides["mlflow_users"] = settings.mlflow_users.model_copy(update={role: SecretStr(conn.password)})
    return overrides


def s3_connection_id(role: S3Role) -> str:
    return f"leukops_s3_{role}"


def _s3_login(settings: Settings, role: S3Role) -> dict[str, Any]:
    """Settings overrides that make the task's stores sign as the S3 identity ``role``: the key pair (and
    endpoint) of the connection ``leukops_s3_<role>`` when it exists, else the settings' ``s3_roles.<role>``.
    The workers run every role's tasks, so the task picks its identity, never the worker's environment."""
    overrides: dict[str, Any] = {"s3_role": role}
    conn = _airflow_connection(s3_connection_id(role))
    if conn is not None and conn.login:
        from pydantic import SecretStr

        keys = S3Credentials(access_key=SecretStr(conn.login), secret_key=SecretStr(conn.password or ""))
        overrides["s3_roles"] = settings.s3_roles.model_copy(update={role: keys})
        if endpoint := conn.extra_dejson.get("endpoint_url"):
            overrides["s3_endpoint"] = endpoint
    return overrides


def task_settings(
    params: dict[str, Any] | None = None, mlflow_role: MlflowRole | None = None, s3_role: S3Role | None = None
) -> Settings:
    """The settings, with the S3/MLflow values of the Airflow connections when they exist and the run's
    validated overrides (``params``: the DAG run's params, see ``orchestration.params``); ``mlflow_role``:
    the MLflow user the task logs in as; ``s3_role``: the least-privilege S3 identity its stores sign as."""
    settings = with_overrides(get_settings(), params or {})
    overrides: dict[str, Any] = _mlflow_login(settings, mlflow_role) if mlflow_role else {}
    if s3_role:
        overrides |= _s3_login(settings, s3_role)
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

    settings = task_settings(s3_role="ingest")
    spec = load_source(source, settings)
    seen = set(all_manifests(_store(settings), source).get("path", []))
    return sum(1 for f in list_files(spec, reader_for(spec, settings)) if f.path not in seen)


def ingest(source: str, run_id: str, run_date: str) -> dict[str, Any]:
    """Ingest + validate one source; the report is kept under the run id so a retry (or a cleared task)
    returns the same verdict instead of "nothing new". The verdict is stored before its manifest is
    published, so S3 failing between the two cannot lose a quarantine alert; a stored verdict whose
    manifest never landed is ingested again."""
    from pipelines.data.ingest import ingest_source
    from pipelines.data.quarantine import verdict_landed
    from pipelines.data.sources import load_source

    settings = task_settings(s3_role="ingest")
    store = _store(settings)
    report_key = ingest_report_key(source, run_id)
    if (stored := _read_state(store, report_key)) is not None and verdict_landed(store, stored):
        return stored

    def record(verdict) -> None:
        store.put_json(report_key, verdict.to_dict())

    spec = load_source(source, settings)
    report = ingest_source(spec, settings, store, run_date=run_date, record_verdict=record).to_dict()
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

    settings = task_settings(params, s3_role="training")
    store = _store(settings)
    return [snapshot_summary(task, take_snapshot(store, settings, task)) for task in settings.retrain.tasks]


def plan_candidates(snapshots: list[dict[str, Any]], run_id: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    """The grid (settings + the run's overrides) for every task whose snapshot changed since the last
    attempt (or all, when forced)."""
    force, reason = bool(params.get("force")), str(params.get("reason") or "").strip()
    if force and not reason:
        raise FlowError("force=true needs a reason (it is recorded with the runs)")
    settings = task_settings(params, s3_role="training")
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
    from pipelines.trust.champion_start import champion_start

    check_cell(candidate)
    settings = task_settings(params, mlflow_role="training", s3_role="training")
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
        max_images=grid.max_images,
        batch_size=grid.batch_size,
        epochs=grid.epochs,
        time_budget_min=grid.time_budget_min,
        extra_tags={AIRFLOW_RUN_KEY_TAG: candidate["candidate_key"], "retrain_reason": candidate["reason"]},
        champion_reader=champion_start,
    )
    return {**candidate, **result.to_dict(), "reused": False}


def explain(trained: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """Grad-CAM/LIME and the shortcut test, then the external validation on every holdout source of the
    task: both logged to the candidate's run, where the gate reads them."""
    from pipelines.model.holdout import evaluate_run_on_holdouts
    from pipelines.trust.explain import explain_run

    settings = task_settings(params, mlflow_role="training", s3_role="training")
    grid = settings.retrain
    summary = explain_run(
        trained["run_id"], samples=grid.explain_samples, lime_images=grid.explain_lime_images, settings=settings
    )
    holdouts = evaluate_run_on_holdouts(trained["run_id"], trained["task"], settings)
    return {**trained, "explain": summary, "holdouts": holdouts}


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
    settings = task_settings(params, mlflow_role="promotion", s3_role="training")
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

    settings = task_settings(mlflow_role="drift", s3_role="drift")
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
        report = outcome.to_dict()
        reports.append({"current": current, **report, "report_url": _browser_url(store, report.get("report_html"))})
        log.info("drift %s (%d/%d): %s", current, len(reports), len(currents), reports[-1]["report_url"])
    return reports


def _browser_url(store: ObjectStore, uri: str | None) -> str | None:
    """A presigned http URL for an ``s3://`` URI in the store's bucket (alerts need a clickable link)."""
    prefix = f"s3://{store.bucket}/"
    return store.presigned_url(uri.removeprefix(prefix)) if uri and uri.startswith(prefix) else uri


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
    links = [r.get("report_url") or r["report_html"] for v in drifted for r in v["reports"] if r["retrain_recommended"]]
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
