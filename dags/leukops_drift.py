"""### leukops_drift — recent batches and serving logs against the champion's training data

Per task: the batches not checked yet and the serving request log of the last `schedules.drift_window_days`
days, compared with the `@champion`'s training snapshot (image facts, embeddings, prediction mix;
Evidently reports in S3 and MLflow).

- **Triggers**: its cron (`schedules.drift`) or a run from the UI / REST API; the window ends at the
  run's `run_after` (REST/UI runs have no logical date).
- **Outcomes**: drift with new labelled images emits `leukops_retrain_request` (the retrain DAG listens);
  drift without new labels *fails* `request_retrain` with the report links, so the failure alert
  (connection `leukops_alerts`) takes it to QA instead of retraining on the same data; no drift is a skip.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import CronTriggerTimetable, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from pipelines.core.settings import get_settings
from pipelines.orchestration.assets import RETRAIN_REQUEST
from pipelines.orchestration.notifiers import LeukopsAlertNotifier
from pipelines.orchestration.params import drift_params

SCHEDULES = get_settings().schedules


@dag(
    dag_id="leukops_drift",
    schedule=CronTriggerTimetable(SCHEDULES.drift, timezone="UTC"),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    params=drift_params(),
    default_args={"on_failure_callback": [LeukopsAlertNotifier()]},
    doc_md=__doc__,
    tags=["leukops", "monitoring"],
)
def leukops_drift():
    @task(execution_timeout=timedelta(minutes=5))
    def tasks_to_check() -> list[str]:
        """The run's `tasks`, or the retrained ones (`retrain.tasks`)."""
        from pipelines.orchestration.airflow_tasks import task_settings

        return task_settings(get_current_context()["params"]).retrain.tasks

    @task(
        retries=3,
        retry_delay=timedelta(seconds=30),
        retry_exponential_backoff=True,
        execution_timeout=timedelta(hours=1),
        doc_md="Drift reports for one task (one line per feature chunk in this log); the verdict is kept per run.",
    )
    def check_drift(task_name: str) -> dict:
        from pipelines.orchestration.airflow_tasks import check_drift

        context = get_current_context()
        # run_after, not logical_date: runs triggered by the REST API, the UI or an asset have no logical date
        return check_drift(task_name, context["run_id"], context["dag_run"].run_after)

    @task(retries=0, outlets=[RETRAIN_REQUEST], execution_timeout=timedelta(minutes=5))
    def request_retrain(verdicts: list[dict]) -> dict:
        """retrain → asset event; drift without new labels → failure (QA alert with the report links)."""
        from pipelines.orchestration.airflow_tasks import retrain_decision

        decision = retrain_decision(list(verdicts))
        if decision["action"] == "alert":
            raise AirflowFailException(decision["message"])
        if decision["action"] == "none":
            raise AirflowSkipException(decision["message"])
        get_current_context()["outlet_events"][RETRAIN_REQUEST].extra = decision
        return decision

    request_retrain(check_drift.expand(task_name=tasks_to_check()))


leukops_drift()
