"""### leukops_ingest — new smear images into S3, validated

Polls each registered source's landing location (a folder or an S3 prefix), ingests the files it has not
seen (decode, facts, sha256, perceptual hash), validates the batch with the Great Expectations suite and
publishes the accepted rows (asset `leukops_accepted_images`).

- **Triggers**: its cron (`schedules.ingest_poll`) polls every source; a run from the UI or the REST API
  may name one `source` and how long to wait for files (`wait_for_files_min`, 0 = look once).
- **Outcomes**: a source with nothing new is *skipped*; a quarantined batch *fails* `publish_accepted`
  with the reasons and the Data Docs link, and the failure alert (connection `leukops_alerts`) takes it
  to QA.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pendulum
from airflow.sdk import CronTriggerTimetable, PokeReturnValue, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from pipelines.core.settings import get_settings
from pipelines.orchestration.assets import ACCEPTED_IMAGES
from pipelines.orchestration.notifiers import LeukopsAlertNotifier
from pipelines.orchestration.params import ingest_params

SCHEDULES = get_settings().schedules


@dag(
    dag_id="leukops_ingest",
    schedule=CronTriggerTimetable(SCHEDULES.ingest_poll, timezone="UTC"),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    params=ingest_params(),
    default_args={"on_failure_callback": [LeukopsAlertNotifier()]},
    doc_md=__doc__,
    tags=["leukops", "ingest"],
)
def leukops_ingest():
    @task(execution_timeout=timedelta(minutes=5))
    def sources_to_poll() -> list[str]:
        """The sources to poll: the run's `source`, or every registered one."""
        from pipelines.orchestration.airflow_tasks import sources_to_poll

        return sources_to_poll(get_current_context()["params"]["source"])

    # Reschedule mode frees the worker slot between pokes; `wait_for_files_min` (default 0: one look) bounds
    # the wait, so a run that finds nothing new ends in seconds instead of sitting out the timeout.
    @task.sensor(
        poke_interval=30,
        timeout=timedelta(minutes=61),
        mode="reschedule",
        soft_fail=True,
        execution_timeout=timedelta(minutes=5),
        doc_md="Files at the source that no manifest of it has seen; skipped when none came within the wait.",
    )
    def new_files(source: str) -> PokeReturnValue:
        from pipelines.orchestration.airflow_tasks import pending_files

        context = get_current_context()
        pending = pending_files(source)
        run = context["dag_run"]
        waited = datetime.now(UTC) - (run.start_date or run.run_after)
        if not pending and waited >= timedelta(minutes=context["params"]["wait_for_files_min"]):
            raise AirflowSkipException(f"{source}: no new files (waited {waited.total_seconds():.0f} s)")
        return PokeReturnValue(is_done=pending > 0, xcom_value=source)

    # One source at a time: cross-source duplicates and label conflicts are found against what the
    # other sources have already published.
    @task(
        retries=3,
        retry_delay=timedelta(seconds=20),
        retry_exponential_backoff=True,
        max_active_tis_per_dagrun=1,
        execution_timeout=timedelta(hours=2),
        doc_md="Ingest + validate one source's new files; the report (kept per run id) makes a retry a no-op.",
    )
    def ingest_and_validate(source: str) -> dict:
        from pipelines.orchestration.airflow_tasks import ingest

        context = get_current_context()
        # run_after, not logical_date: runs triggered by the REST API, the UI or an asset have no logical date
        run_date = context["dag_run"].run_after.date().isoformat()
        return ingest(source, context["run_id"], run_date)

    @task(
        retries=0,
        outlets=[ACCEPTED_IMAGES],
        execution_timeout=timedelta(minutes=5),
        doc_md="Deterministic verdict: a quarantined batch fails here (no retry; QA is alerted), nothing new "
        "is a skip, an accepted batch becomes a `leukops_accepted_images` event.",
    )
    def publish_accepted(report: dict) -> dict:
        from pipelines.orchestration.airflow_tasks import ingest_verdict

        verdict = ingest_verdict(report)
        if verdict["action"] == "quarantined":
            raise AirflowFailException(verdict["message"])
        if verdict["action"] == "nothing_new":
            raise AirflowSkipException(verdict["message"])
        get_current_context()["outlet_events"][ACCEPTED_IMAGES].extra = verdict
        return verdict

    publish_accepted.expand(report=ingest_and_validate.expand(source=new_files.expand(source=sources_to_poll())))


leukops_ingest()
