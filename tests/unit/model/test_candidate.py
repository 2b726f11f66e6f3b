"""The candidate summary: one dataclass, read from a run's facts, for fresh and reused runs alike."""

from __future__ import annotations

import json

import pytest

from pipelines.io.registry import RunRecord
from pipelines.model import candidate
from pipelines.model.candidate import CandidateSummary, finished_candidate

TAGS = {
    "task": "binary_all",
    "dataset_version": "ds1",
    "backbone": "custom_cnn",
    "augment": "none",
    "pretrained": "false",
    "weights_source": "random-init",
    "stop_reason": "early_stopping",
    "device": "cpu",
    "airflow_candidate_key": "scheduled__2026/binary_all/custom_cnn/none",
}
METRICS = {
    "val_macro_f1": 0.8,
    "test_macro_f1": 0.75,
    "test_accuracy": 0.78,
    "test_f1_ci_low": 0.7,
    "test_f1_ci_high": 0.8,
    "best_epoch": 2.0,
    "epochs_run": 5.0,
    "train_images_per_s": 123.4567,
    "n_train": 60.0,
    "n_val": 20.0,
    "n_test": 20.0,
    "image_size": 64.0,
}


def _run(tags: dict[str, str] = TAGS) -> RunRecord:
    return RunRecord("run1", "1", "s3://mlflow/1/run1/artifacts", dict(METRICS), {}, dict(tags))


def test_summary_reads_the_logged_run_facts() -> None:
    summary = CandidateSummary.from_run(_run())
    assert summary.model_uri == "runs:/run1/model" and summary.pretrained is False
    assert (summary.epochs_run, summary.best_epoch, summary.image_size, summary.n_train) == (5, 2, 64, 60)
    assert summary.test_f1_ci == (0.7, 0.8) and summary.train_images_per_s == 123.46
    assert summary.resumed_from_epoch is None and summary.device == "cpu"
    as_json = json.loads(json.dumps(summary.to_dict()))
    assert as_json["test_f1_ci"] == [0.7, 0.8] and as_json["val_f1"] == 0.8
    assert CandidateSummary.from_run(_run(TAGS | {"resumed_from_epoch": "3"})).resumed_from_epoch == 3


def test_a_reused_run_reports_the_same_summary(monkeypatch: pytest.MonkeyPatch) -> None:
    asked = []
    found = {"key-1": _run()}
    monkeypatch.setattr(
        candidate.tracking, "find_finished_run", lambda s, tags: asked.append(tags) or found.get(tags["k"])
    )
    assert finished_candidate(None, {"k": "key-1"}) == CandidateSummary.from_run(_run())
    assert finished_candidate(None, {"k": "key-2"}) is None
    assert asked == [{"k": "key-1"}, {"k": "key-2"}]
