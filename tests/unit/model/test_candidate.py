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
    "kept_epoch": 2.0,
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
    assert (summary.epochs_run, summary.kept_epoch, summary.image_size, summary.n_train) == (5, 2, 64, 60)
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


def test_the_one_training_path_trains_a_folder_frame_with_class_weights(shared_data, monkeypatch) -> None:
    """`build_run` + `fit_prepared` (what the CLI, the DAG and the benchmark run) on real smears: one 32 px
    epoch of 14 images (~3 s on a quiet 2-core machine)."""
    import pandas as pd

    from pipelines.core.settings import RetrainConfig
    from pipelines.model import train
    from pipelines.model.candidate import build_run, candidate_spec, fit_prepared, train_config

    counts = {"Benign": 2, "Early": 4, "Pre": 4, "Pro": 4}  # train images per class: Benign the smallest
    rows = []
    for label, n_train in counts.items():
        files = sorted((shared_data / "all_taleqani" / label).glob("*.jpg"))[: n_train + 2]
        splits = ["train"] * n_train + ["val", "test"]
        rows += [{"path": f, "label": label, "split": s} for f, s in zip(files, splits, strict=True)]
    retrain = RetrainConfig(image_size=32, batch_size=4, time_budget_min=None)
    spec = candidate_spec(retrain, "all_subtypes", "custom_cnn", device="cpu")
    config = train_config(retrain, epochs=1)
    run = build_run(spec, config, pd.DataFrame(rows), "v-test", "folder")
    seen = {}
    real_fit = train.fit
    monkeypatch.setattr("pipelines.model.candidate.fit", lambda *a, **kw: seen.update(kw) or real_fit(*a, **kw))
    result = fit_prepared(run)
    assert seen["class_weights"][0] == pytest.approx(14 / (4 * 2)) and seen["class_weights"][1] == pytest.approx(
        14 / 16
    )
    assert [s.name for s in seen["stages"]] == ["full"] and seen["mixer"] is None  # augment "none" from settings
    assert len(result.history) == 1 and result.planned_steps == len(run.loaders["train"])
    assert set(result.kept_state) == set(run.backbone.model.state_dict())
