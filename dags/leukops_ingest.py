"""Ingest: poll each registered source's landing location, ingest + validate new files, publish an Asset.

Data engineers trigger it per source (param ``source``); on its schedule it polls every registered
source. S3 writes fire no Airflow event by themselves, hence the polling sensor.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import CronTriggerTimetable, Param, PokeReturnValue, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from pipelines.core.settings import get_settings
from pipelines.orchestration.assets import ACCEPTED_IMAGES

SCHEDULES = get_settings().schedules


@dag(
    dag_id="leukops_ingest",
    schedule=CronTriggerTimetable(SCHEDULES.ingest_poll, timezone="UTC"),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    params={"source": Param(None, type=["null", "string"], description="one source; empty = every source")},
    tags=["leukops", "ingest"],
)
def leukops_ingest():
    @task
    def sources_to_poll() -> list[str]:
        from pipelines.orchestration.airflow_tasks import sources_to_poll

        return sources_to_poll(get_current_context()["params"]["source"])

    @task.sensor(poke_interval=60, timeout=timedelta(minutes=20), mode="reschedule", soft_fail=True)
    def new_files(source: str) -> PokeReturnValue:
        from pipelines.orchestration.airflow_tasks import pending_files

        return PokeReturnValue(is_done=pending_files(source) > 0, xcom_value=source)

    # One source at a time: cross-source duplicates and label conflicts are found against what the
    # other sources have already published.
    @task(retries=3, retry_delay=timedelta(seconds=20), retry_exponential_backoff=True, max_active_tis_per_dagrun=1)
    def ingest_and_validate(source: str) -> dict:
        from pipelines.orchestration.airflow_tasks import ingest

        context = get_current_context()
        # run_after, not logical_date: runs triggered by the REST API, the UI or an asset have no logical date
        run_date = context["dag_run"].run_after.date().isoformat()
        return ingest(source, context["run_id"], run_date)

    @task(retries=0, outlets=[ACCEPTED_IMAGES])
    def publish_accepted(report: dict) -> dict:
        """Deterministic verdict: a quarantined batch fails here (no retry), nothing new is a skip."""
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
