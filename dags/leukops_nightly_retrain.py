"""### leukops_nightly_retrain — snapshot, train the grid, explain, gate, promote

snapshot → plan the backbone × augmentation grid → train each cell on the `gpu` queue and pool →
explain it (Grad-CAM, LIME, shortcut test) → rank the survivors by validation macro-F1 and gate them
in that order → the first that passes becomes `@champion` (registry aliases, gate report, model card).

- **Triggers**: its cron (`retrain.schedule`), a drift run's `leukops_retrain_request` asset event (the
  run retrains the tasks the request names, its message as the reason), or a run from the UI / REST API.
  Training is skipped when the snapshot equals the last attempted one, unless `force` is set with a `reason`.
- **Params** (all optional; empty = `leukops.yaml` / `LEUKOPS_*`): the grid (`tasks`, `backbones`,
  `augmentations`), training (`epochs`, `image_size`, `batch_size`, `max_images`, `time_budget_min`),
  stain and sites (`stain_augment`, `stain_normalize`, `site_balance`), explanations (`explain_samples`,
  `explain_lime_images`) and every gate threshold (`macro_f1_min`, `class_recall_min`, ...). They travel
  in the run's conf, so every worker of the run uses them.
- **Failures**: one failed grid cell leaves the others to the gate; the run fails when every cell failed.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable, TriggerRule, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from pipelines.core.settings import get_settings
from pipelines.orchestration.assets import RETRAIN_REQUEST
from pipelines.orchestration.notifiers import LeukopsAlertNotifier
from pipelines.orchestration.params import retrain_params, with_retrain_requests

RETRAIN = get_settings().retrain
GPU_POOL = "gpu"


def _run_params(context) -> dict:
    """The run's params, completed by the retrain requests it consumed (an asset-triggered run)."""
    requests = [e.extra for e in context["dag_run"].consumed_asset_events or [] if e.extra]
    return with_retrain_requests(context["params"], requests)


@dag(
    dag_id="leukops_nightly_retrain",
    schedule=AssetOrTimeSchedule(
        timetable=CronTriggerTimetable(RETRAIN.schedule, timezone="UTC"), assets=RETRAIN_REQUEST
    ),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    params=retrain_params(),
    default_args={"on_failure_callback": [LeukopsAlertNotifier()]},
    doc_md=__doc__,
    tags=["leukops", "training"],
)
def leukops_nightly_retrain():
    @task(
        retries=3,
        retry_delay=timedelta(seconds=30),
        retry_exponential_backoff=True,
        execution_timeout=timedelta(minutes=30),
    )
    def snapshot() -> list[dict]:
        """Per task: the dataset version of the accepted, non-quarantined images (stable split ledger)."""
        from pipelines.data.snapshot import SnapshotError
        from pipelines.orchestration.airflow_tasks import snapshot_tasks

        try:
            return snapshot_tasks(_run_params(get_current_context()))
        except SnapshotError as err:  # the data, not the storage: e.g. no accepted images yet; retries cannot help
            raise AirflowFailException(str(err)) from err

    @task(execution_timeout=timedelta(minutes=10))
    def plan(snapshots: list[dict]) -> list[dict]:
        """The grid cells to train: none for a task whose snapshot was already attempted (unless forced)."""
        from pipelines.orchestration.airflow_tasks import plan_candidates

        context = get_current_context()
        return plan_candidates(snapshots, context["run_id"], _run_params(context))

    # The execution timeout caps a cell well above its own time budget (params allow up to 180 min).
    @task(
        queue="gpu",
        pool=GPU_POOL,
        retries=1,
        retry_delay=timedelta(minutes=2),
        execution_timeout=timedelta(hours=4),
        doc_md="One grid cell: train, evaluate on the test split, log the MLflow run (one log line per epoch).",
    )
    def train(candidate: dict) -> dict:
        from pipelines.orchestration.airflow_tasks import InvalidCandidateError, train

        try:
            return train(candidate, get_current_context()["params"])
        except InvalidCandidateError as err:  # a retry cannot fix a name off the allow-list
            raise AirflowFailException(str(err)) from err

    # all_done: a failed grid cell must not fail the whole (not yet expanded) explain step; its own
    # explain instance fails on the missing result and the gate runs over the others.
    @task(
        retries=2,
        retry_delay=timedelta(seconds=30),
        execution_timeout=timedelta(hours=1),
        trigger_rule=TriggerRule.ALL_DONE,
        doc_md="Grad-CAM localization, LIME (a log line per image) and the shortcut test on a seeded test sample.",
    )
    def explain(trained: dict) -> dict:
        from pipelines.orchestration.airflow_tasks import explain

        return explain(trained, get_current_context()["params"])

    # all_done_min_one_success: the gate waits for every cell and runs over the survivors; when every cell
    # failed, the run fails (upstream_failed, or NoSurvivorError below when only plan succeeded).
    @task(
        retries=2,
        retry_delay=timedelta(seconds=30),
        retry_exponential_backoff=True,
        execution_timeout=timedelta(hours=1),
        trigger_rule=TriggerRule.ALL_DONE_MIN_ONE_SUCCESS,
    )
    def gate_and_promote(planned: list[dict], explained: list[dict]) -> dict:
        """Rank the surviving candidates by validation macro-F1, gate them in that order, promote the first
        that passes; the gate report and model card go to the run's MLflow artifacts."""
        from pipelines.orchestration.airflow_tasks import NoSurvivorError, gate_and_promote

        if not planned:
            raise AirflowSkipException("nothing was trained: every snapshot was already attempted")
        context = get_current_context()
        try:
            return gate_and_promote(list(planned), list(explained), context["run_id"], context["params"])
        except NoSurvivorError as err:
            raise AirflowFailException(str(err)) from err

    planned = plan(snapshot())
    gate_and_promote(planned, explain.expand(trained=train.expand(candidate=planned)))


leukops_nightly_retrain()
