"""Nightly retrain: snapshot -> train the backbone x augmentation grid on the GPU queue -> explain ->
select by validation F1 -> gate + promote (+ model card).

Runs on its cron and whenever the drift DAG requests a retrain. Training is skipped when the snapshot
equals the last attempted one, unless triggered with ``force`` and a ``reason``.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable, Param, dag, get_current_context, task

from pipelines.core.settings import get_settings
from pipelines.orchestration.assets import RETRAIN_REQUEST

RETRAIN = get_settings().retrain
GPU_POOL = "gpu"


@dag(
    dag_id="leukops_nightly_retrain",
    schedule=AssetOrTimeSchedule(
        timetable=CronTriggerTimetable(RETRAIN.schedule, timezone="UTC"), assets=RETRAIN_REQUEST
    ),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    params={
        "force": Param(False, type="boolean", description="retrain even if the snapshot is unchanged"),
        "reason": Param("", type="string", description="why (required with force; kept in the run's tags)"),
    },
    tags=["leukops", "training"],
)
def leukops_nightly_retrain():
    @task(retries=3, retry_delay=timedelta(seconds=30), retry_exponential_backoff=True)
    def snapshot() -> list[dict]:
        from pipelines.orchestration.airflow_tasks import snapshot_tasks

        return snapshot_tasks()

    @task
    def plan(snapshots: list[dict]) -> list[dict]:
        from pipelines.orchestration.airflow_tasks import plan_candidates

        context = get_current_context()
        return plan_candidates(snapshots, context["run_id"], **context["params"])

    @task(queue="gpu", pool=GPU_POOL, retries=1, retry_delay=timedelta(minutes=2))
    def train(candidate: dict) -> dict:
        from pipelines.orchestration.airflow_tasks import train

        return train(candidate)

    @task(retries=2, retry_delay=timedelta(seconds=30))
    def explain(trained: dict) -> dict:
        from pipelines.orchestration.airflow_tasks import explain

        return explain(trained)

    @task(retries=2, retry_delay=timedelta(seconds=30), retry_exponential_backoff=True)
    def gate_and_promote(candidates: list[dict]) -> dict:
        from pipelines.orchestration.airflow_tasks import gate_and_promote

        return gate_and_promote(list(candidates), get_current_context()["run_id"])

    gate_and_promote(explain.expand(trained=train.expand(candidate=plan(snapshot()))))


leukops_nightly_retrain()
