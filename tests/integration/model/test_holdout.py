"""External validation through the real stack: a calibrated model logged to the real MLflow server, real
Taleqani images ingested as a holdout source, `leukops evaluate --all-holdouts` logging the figures to the
run (what the gate reads) and `leukops evaluate --source` printing them. The model is a tiny untrained CNN
(no training: ~1 s): the figures are checked against the same model's predictions made here."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import mlflow
import pytest
import torch

from pipelines.cli import main
from pipelines.data.imagefacts import decode_image
from pipelines.data.ingest import ingest_source
from pipelines.data.sources import Source, default_label_map, load_source, save_source
from pipelines.io import layout
from pipelines.io.tracking import TrainingTracker
from pipelines.model.backbones import create_backbone
from pipelines.model.bundle import ModelBundle, load_model
from pipelines.model.evaluate import evaluate_predictions
from pipelines.model.predict import InferenceConfig
from pipelines.model.preprocess import preprocessing_from
from pipelines.model.pyfunc import log_model

TASK = "all_subtypes"
CLASSES = ("Benign", "Early", "Pre", "Pro")
INFERENCE = InferenceConfig(temperature=0.7, tta=("hflip",))


def _holdout_folder(shared_data: Path, root: Path, per_class: int, offset: int, labels=CLASSES) -> list[Path]:
    files = []
    for label in labels:
        (root / label).mkdir(parents=True)
        for file in sorted((shared_data / "all_taleqani" / label).glob("*.jpg"))[offset : offset + per_class]:
            (root / label / file.name).write_bytes(file.read_bytes())
            files.append(root / label / file.name)
    return files


@pytest.fixture(scope="module")
def calibrated_run(stack, settings, shared_data) -> str:
    torch.manual_seed(0)
    backbone = create_backbone("custom_cnn", len(CLASSES), pretrained=False, image_size=32)
    bundle = ModelBundle.for_backbone(TASK, CLASSES, backbone, preprocessing_from(backbone.data_config), INFERENCE)
    example = (shared_data / "all_taleqani" / "Benign" / "WBC-Benign-001.jpg").read_bytes()
    tags = {"task": TASK}
    with TrainingTracker(settings, run_key=uuid.uuid4().hex, run_name="holdout-it", tags=tags) as tracker:
        log_model(tracker, bundle, backbone.model.state_dict(), example)
    return tracker.run_id


def test_all_holdouts_logs_each_sources_figures_to_the_run(
    calibrated_run, settings, store, shared_data, tmp_path, capsys
) -> None:
    files = _holdout_folder(shared_data, tmp_path / "held", per_class=3, offset=340)
    name = f"held-{uuid.uuid4().hex[:6]}"
    save_source(
        Source(name, str(tmp_path / "held"), "folders", default_label_map([TASK]), (TASK,), role="holdout"), settings
    )
    assert ingest_source(load_source(name, settings), settings, store, run_date="2026-01-01").accepted == 12
    never_ingested = f"empty-{uuid.uuid4().hex[:6]}"
    (tmp_path / "empty").mkdir()
    save_source(
        Source(never_ingested, str(tmp_path / "empty"), "folders", default_label_map([TASK]), (TASK,), role="holdout"),
        settings,
    )

    assert main(["evaluate", "--model", calibrated_run, "--all-holdouts", "--json"]) == 0, capsys.readouterr().err
    result = json.loads(capsys.readouterr().out)
    assert result["run_id"] == calibrated_run and result["task"] == TASK
    assert "ingest it first" in result["skipped"][never_ingested]

    loaded = load_model(layout.run_model_uri(calibrated_run), settings=settings)
    assert loaded.inference == INFERENCE
    labels = [f.parent.name for f in files]
    expected = evaluate_predictions(
        labels, loaded.predict_proba([decode_image(f.read_bytes()).rgb for f in files]), CLASSES
    )
    figures = result["sources"][name]
    assert figures["n_images"] == 12 and figures["macro_f1"] == pytest.approx(expected.macro_f1)
    assert figures["ece"] == pytest.approx(expected.ece) and figures["ece_uncalibrated"] != figures["ece"]

    run = mlflow.MlflowClient(settings.mlflow_tracking_uri).get_run(calibrated_run)
    logged = run.data.metrics
    assert logged[layout.holdout_metric(name, "macro_f1")] == pytest.approx(expected.macro_f1)
    assert logged[layout.holdout_metric(name, "n_images")] == 12
    assert logged[layout.holdout_metric(name, "f1_ci_low")] == pytest.approx(expected.f1_ci_low)
    assert not any(key.startswith(f"holdout.{never_ingested}.") for key in logged)
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    report = mlflow.artifacts.load_dict(layout.run_artifact_uri(calibrated_run, layout.holdout_report_path(name)))
    assert report["n"] == 12 and report["ece_uncalibrated"] == pytest.approx(figures["ece_uncalibrated"])

    assert main(["evaluate", "--model", calibrated_run, "--source", name]) == 0
    text = capsys.readouterr().out
    assert "95% CI" in text and "temperature 0.700, TTA hflip" in text and "uncalibrated" in text
    assert all(f"{c:<14} recall" in text for c in CLASSES)


def test_a_holdout_labelling_a_subset_of_the_classes_is_scored_on_those(
    calibrated_run, settings, store, shared_data, tmp_path, capsys
) -> None:
    _holdout_folder(shared_data, tmp_path / "part", per_class=3, offset=350, labels=("Benign", "Early"))
    name = f"part-{uuid.uuid4().hex[:6]}"
    save_source(
        Source(name, str(tmp_path / "part"), "folders", default_label_map([TASK]), (TASK,), role="holdout"), settings
    )
    assert ingest_source(load_source(name, settings), settings, store, run_date="2026-01-01").accepted == 6

    assert main(["evaluate", "--model", calibrated_run, "--source", name, "--json"]) == 0, capsys.readouterr().err
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 6 and result["classes_scored"] == ["Benign", "Early"]
    assert result["absent_classes"] == ["Pre", "Pro"] and "counted as errors" in result["scoring"]
    assert main(["evaluate", "--model", calibrated_run, "--source", name]) == 0
    assert "scored on the 2 of 4 classes these images carry (absent: Pre, Pro)" in capsys.readouterr().out
