"""Drift: recent batches and serving logs against the champion's training snapshot (Evidently).

Drift with new labelled data emits the retrain-request asset event (the retrain DAG listens to it);
drift without new labels fails the alert task with the report link, so QA sees it, instead of
retraining on the same data.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import CronTriggerTimetable, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from pipelines.core.settings import get_settings
from pipelines.orchestration.assets import RETRAIN_REQUEST

SETTINGS = get_settings()


@dag(
    dag_id="leukops_drift",
    schedule=CronTriggerTimetable(SETTINGS.schedules.drift, timezone="UTC"),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["leukops", "monitoring"],
)
def leukops_drift():
    @task(retries=3, retry_delay=timedelta(seconds=30), retry_exponential_backoff=True)
    def check_drift(task_name: str) -> dict:
        from pipelines.orchestration.airflow_tasks import check_drift

        context = get_current_context()
        # run_after, not logical_date: runs triggered by the REST API, the UI or an asset have no logical date
        return check_drift(task_name, context["run_id"], context["dag_run"].run_after)

    @task(retries=0, outlets=[RETRAIN_REQUEST])
    def request_retrain(verdicts: list[dict]) -> dict:
        from pipelines.orchestration.airflow_tasks import retrain_decision

        decision = retrain_decision(list(verdicts))
        if decision["action"] == "alert":
            raise AirflowFailException(decision["message"])
        if decision["action"] == "none":
            raise AirflowSkipException(decision["message"])
        get_current_context()["outlet_events"][RETRAIN_REQUEST].extra = decision
        return decision

    request_retrain(check_drift.expand(task_name=SETTINGS.retrain.tasks))


leukops_drift()
