"""MLflow adapter for runs: log params, metrics, tags, artifacts and datasets; fetch artifacts; find runs.

With registry.py, the only mlflow user under ``pipelines/`` (``pipelines.model.pyfunc`` aside). It knows
nothing of models or training: ``pipelines.model.bundle`` writes and reads the model bundle,
``pipelines.model.pyfunc`` packages it for ``mlflow models serve``, and this module uploads or downloads the
resulting folder like any other artifact. Metrics go out through ``MlflowClient.log_batch`` (one call per
batch of metrics, whatever its size), and every value put into a search filter is quoted by
``search_filter.quoted``.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException

from pipelines.core.errors import LeukopsError
from pipelines.core.settings import Settings
from pipelines.io import layout
from pipelines.io.mlflow_access import drift_experiment, login
from pipelines.io.registry import RunRecord, run_record
from pipelines.io.search_filter import quoted

RUN_KEY_TAG = "leukops_run_key"
MAX_PARAM_CHARS = 6000  # MLflow's limit on one param value


class TrackingError(LeukopsError):
    """An MLflow run or model could not be read or written; the message names the URI."""


def _client(settings: Settings) -> mlflow.MlflowClient:
    login(settings)
    uri = settings.mlflow_tracking_uri
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def _log_metrics(client: mlflow.MlflowClient, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(key, float(value), now, step) for key, value in metrics.items()])


def _log_files(client: mlflow.MlflowClient, run_id: str, artifacts: dict[str, bytes]) -> None:
    """Upload ``artifacts`` (path in the run -> bytes) to a run."""
    with tempfile.TemporaryDirectory() as tmp:
        for artifact_file, data in artifacts.items():
            path = Path(tmp) / artifact_file
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        client.log_artifacts(run_id, tmp)


def _flatten(prefix: str, value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        return {
            k: v for key, sub in value.items() for k, v in _flatten(f"{prefix}.{key}" if prefix else key, sub).items()
        }
    return {prefix: value}


# -- training runs --------------------------------------------------------------------------------


class TrainingTracker:
    """One training run in MLflow, open while the ``with`` block runs.

    A run keyed by ``run_key`` that did not finish (a crash) is reopened rather than duplicated, matching
    the training checkpoint that resumes under the same key.
    """

    def __init__(self, settings: Settings, *, run_key: str, run_name: str, tags: dict[str, str]) -> None:
        self.settings = settings
        self.client = _client(settings)
        self.run_key = run_key
        self.run_name = run_name
        self.tags = {**tags, RUN_KEY_TAG: run_key}
        self.run_id: str | None = None

    def __enter__(self) -> TrainingTracker:
        mlflow.set_tracking_uri(self.settings.mlflow_tracking_uri)
        try:
            experiment = mlflow.set_experiment(self.settings.mlflow_experiment)
        except MlflowException as err:
            raise TrackingError(f"MLflow at {self.settings.mlflow_tracking_uri} refused the experiment: {err}") from err
        unfinished = self.client.search_runs(
            [experiment.experiment_id],
            filter_string=f"tags.{RUN_KEY_TAG} = {quoted(self.run_key)} and attributes.status != 'FINISHED'",
            max_results=1,
        )
        run_id = unfinished[0].info.run_id if unfinished else None
        run = mlflow.start_run(run_id=run_id, run_name=None if run_id else self.run_name, tags=self.tags)
        self.run_id = run.info.run_id
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        with contextlib.redirect_stdout(sys.stderr):  # MLflow prints the run URL; stdout is for --json
            mlflow.end_run("FINISHED" if exc_type is None else "FAILED")

    def log_params(self, params: dict[str, Any]) -> None:
        """Flattened params (a reopened run keeps the ones it has) and the whole dict as the run's config."""
        flat = {k: str(v)[:MAX_PARAM_CHARS] for k, v in _flatten("", params).items()}
        existing = self.client.get_run(self.run_id).data.params
        mlflow.log_params({k: v for k, v in flat.items() if k not in existing})
        mlflow.log_dict(params, layout.RUN_CONFIG)

    def log_snapshot(self, task: str, version: str, frame: pd.DataFrame, source_uri: str) -> None:
        """Dataset version and split counts as tags, and each split as an MLflow dataset input."""
        counts = frame.groupby(["split", "label"]).size()
        tags = {"dataset_version": version, "task": task}
        tags |= {f"n_{split}": str(int(n)) for split, n in frame["split"].value_counts().items()}
        mlflow.set_tags(tags)
        mlflow.log_dict({f"{s}/{c}": int(n) for (s, c), n in counts.items()}, layout.SPLIT_COUNTS)
        for split, rows in frame.groupby("split"):
            dataset = mlflow.data.from_pandas(
                rows[["sha256", "key", "label"]].reset_index(drop=True),
                source=source_uri,
                targets="label",
                name=f"{task}@{version}/{split}",
            )
            mlflow.log_input(dataset, context=str(split))

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        _log_metrics(self.client, self.run_id, metrics, step)

    def set_tags(self, tags: dict[str, str]) -> None:
        mlflow.set_tags(tags)

    def log_figure(self, figure, artifact_file: str) -> None:
        mlflow.log_figure(figure, artifact_file)

    def log_dict(self, data: dict[str, Any], artifact_file: str) -> None:
        mlflow.log_dict(data, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        mlflow.log_text(text, artifact_file)

    def log_artifacts(self, local_dir: Path, artifact_path: str) -> None:
        """Upload the folder ``local_dir`` as the run's artifact folder ``artifact_path``."""
        self.client.log_artifacts(self.run_id, str(local_dir), artifact_path)


def find_finished_run(settings: Settings, tags: dict[str, str]) -> RunRecord | None:
    """The latest FINISHED run of the training experiment carrying all ``tags`` (e.g. an Airflow candidate
    key); None when there is none."""
    client = _client(settings)
    experiment = client.get_experiment_by_name(settings.mlflow_experiment)
    if experiment is None:
        return None
    conditions = [f"tags.`{key}` = {quoted(value)}" for key, value in tags.items()]
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=" and ".join([*conditions, "attributes.status = 'FINISHED'"]),
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return run_record(runs[0]) if runs else None


def download_model(settings: Settings, model_uri: str, dst: Path) -> tuple[Path, str | None]:
    """Fetch the MLflow model at ``model_uri`` (a run's, a registered model's, or a path) into ``dst``.

    Returns the local model folder and the id of the run that logged it (from its MLmodel metadata).
    """
    login(settings)
    uri = settings.mlflow_tracking_uri
    try:
        local = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=model_uri, dst_path=str(dst), tracking_uri=uri, registry_uri=uri
            )
        )
    except (MlflowException, OSError) as err:
        raise TrackingError(f"cannot download model {model_uri!r} from {uri}: {err}") from err
    if not (local / "MLmodel").exists():
        raise TrackingError(f"{model_uri!r} is not an MLflow model (no MLmodel file)")
    info = mlflow.models.Model.load(str(local / "MLmodel"))
    return local, info.run_id or (info.metadata or {}).get("run_id")


# -- other runs -----------------------------------------------------------------------------------


def log_drift_run(
    settings: Settings,
    run_name: str,
    tags: dict[str, str],
    metrics: dict[str, float],
    artifacts: dict[str, bytes],
) -> str:
    """One finished run in the ``<experiment>-drift`` experiment (kept apart from training candidates)."""
    client = _client(settings)
    name = drift_experiment(settings)
    experiment = client.get_experiment_by_name(name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    try:
        _log_metrics(client, run.info.run_id, metrics)
        _log_files(client, run.info.run_id, artifacts)
    except BaseException:
        client.set_terminated(run.info.run_id, "FAILED")
        raise
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


# -- outputs added to a finished run (explanations) -----------------------------------------------------


def read_run(settings: Settings, run_id: str) -> RunRecord:
    """The facts of an existing run (metrics, params, tags); names the run when it is missing."""
    try:
        return run_record(_client(settings).get_run(run_id))
    except MlflowException as err:
        raise TrackingError(f"MLflow run {run_id!r} at {settings.mlflow_tracking_uri}: {err}") from err


def run_tags(settings: Settings, run_id: str) -> dict[str, str]:
    """The tags of an existing run (e.g. ``task``, ``dataset_version``)."""
    return read_run(settings, run_id).tags


def log_to_run(settings: Settings, run_id: str, metrics: dict[str, float], artifacts: dict[str, bytes]) -> None:
    """Add metrics and artifacts (path in the run -> bytes) to an existing run, finished or not."""
    client = _client(settings)
    try:
        _log_metrics(client, run_id, metrics)
        _log_files(client, run_id, artifacts)
    except MlflowException as err:
        raise TrackingError(f"cannot log to MLflow run {run_id!r}: {err}") from err
