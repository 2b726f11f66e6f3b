"""Training through the real stack: real Taleqani images ingested into S3, a snapshot, a transfer-learned
EfficientNet-Lite0 run logged to the real MLflow server, its model loaded back, external validation."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from pipelines.cli import main
from pipelines.data.imagefacts import decode_image
from pipelines.data.ingest import ingest_source
from pipelines.data.snapshot import take_snapshot
from pipelines.data.sources import Source, default_label_map, load_source, save_source
from pipelines.io import layout
from pipelines.io.registry import Registry
from pipelines.model.bundle import load_model
from pipelines.model.candidate import CandidateSummary, finished_candidate
from tests.integration.signing import attest_version

TASK = "all_subtypes"
CLASSES = ["Benign", "Early", "Pre", "Pro"]


def _copy_images(shared_data: Path, root: Path, per_class: int, offset: int) -> Path:
    for label in CLASSES:
        files = sorted((shared_data / "all_taleqani" / label).iterdir())[offset : offset + per_class]
        (root / label).mkdir(parents=True)
        for file in files:
            shutil.copyfile(file, root / label / file.name)
    return root


def _ingest(settings, store, name: str, folder: Path, role: str = "train", tasks=(TASK,)) -> None:
    source = Source(name, str(folder), "folders", default_label_map(tasks), tuple(tasks), role=role)
    save_source(source, settings, replace=True)
    report = ingest_source(load_source(name, settings), settings, store, run_date="2026-01-01")
    assert report.accepted > 0, report


@pytest.fixture(scope="module")
def champion(trained, settings) -> str:
    """``trained`` registered, attested (aliases need a signature) and made @champion: its version."""
    registry = Registry.from_settings(settings)
    version = registry.register(TASK, registry.read_run(trained.run_id), {}, "train test").version
    attest_version(settings, registry, TASK, version, trained.run_id, "train test")
    mlflow.MlflowClient(settings.mlflow_tracking_uri).set_registered_model_alias(
        settings.registered_model_name(TASK), "champion", version
    )
    return version


@pytest.fixture(scope="module")
def trained(stack, settings, store, shared_data, tmp_path_factory) -> CandidateSummary:
    """One real transfer-learned run: 40 images, 64 px, head-only epoch then a full fine-tuning epoch."""
    from pipelines.model.candidate import train_candidate

    folder = _copy_images(shared_data, tmp_path_factory.mktemp("taleqani"), per_class=10, offset=0)
    _ingest(settings, store, "taleqani-train", folder)
    version = take_snapshot(store, settings, TASK).snapshot.version
    return train_candidate(
        settings,
        TASK,
        "efficientnet_lite0",
        "mixup",
        dataset_version=version,
        image_size=64,
        max_images=40,
        batch_size=8,
        epochs=2,
        head_epochs=1,
        lr=3e-3,
        extra_tags={"candidate_key": "it-train-1"},
    )


def test_training_run_is_logged_with_contract_metrics_tags_and_artifacts(trained, settings) -> None:
    assert trained.pretrained is True and trained.epochs_run == 2
    assert 0.0 <= trained.test_f1 <= 1.0 and 0.0 <= trained.val_f1 <= 1.0
    client = mlflow.MlflowClient(settings.mlflow_tracking_uri)
    run = client.get_run(trained.run_id)
    assert run.info.status == "FINISHED"
    tags, metrics = run.data.tags, run.data.metrics
    assert {k: tags[k] for k in ("task", "backbone", "augment", "pretrained")} == {
        "task": TASK,
        "backbone": "efficientnet_lite0",
        "augment": "mixup",
        "pretrained": "true",
    }
    assert tags["dataset_version"] == trained.dataset_version
    for name in (
        "val_macro_f1",
        "val_loss",
        "kept_epoch",
        "test_macro_f1",
        "test_accuracy",
        "test_f1_ci_low",
        "test_f1_ci_high",
        "test_ece",
    ):
        assert name in metrics, name
    assert metrics["test_f1_ci_low"] <= metrics["test_macro_f1"] <= metrics["test_f1_ci_high"]
    assert any(k.startswith("test_recall_") for k in metrics)
    assert metrics["image_size"] == 64 and metrics["n_train"] + metrics["n_val"] + metrics["n_test"] == 40
    assert run.data.params["train.epochs"] == "2"
    # the recipe fields the call left out come from settings.retrain (the one source of defaults)
    assert run.data.params["train.ema_decay"] == str(settings.retrain.ema_decay)
    assert run.data.params["train.layer_lr_floor"] == str(settings.retrain.layer_lr_floor)
    history = client.get_metric_history(trained.run_id, "epoch/val_macro_f1")
    assert sorted(m.step for m in history) == [0, 1]
    kept = next(m.value for m in history if m.step == metrics["kept_epoch"])
    assert metrics["val_macro_f1"] == pytest.approx(kept)
    assert kept <= max(m.value for m in history)
    artifacts = {a.path for a in client.list_artifacts(trained.run_id, "evaluation")}
    assert {"evaluation/confusion_matrix.png", "evaluation/per_class_report.txt"} <= artifacts
    # per site: every test image belongs to one site (the session's other tests add sources with the same
    # images to the task, and an image brought by two sources counts under the first by name)
    sites = layout.metric_sources(metrics, "site")
    assert sites
    assert sum(metrics[layout.site_metric(site, "n_images")] for site in sites) == metrics["n_test"]
    assert all(0.0 <= metrics[layout.site_metric(site, "macro_f1")] <= 1.0 for site in sites)
    assert layout.SITE_REPORT in artifacts
    assert {i.dataset.name.rsplit("/", 1)[-1] for i in run.inputs.dataset_inputs} == {"train", "val", "test"}

    # an Airflow retry finds the finished run and reports the very summary training returned
    assert finished_candidate(settings, {"candidate_key": "it-train-1"}) == trained
    assert finished_candidate(settings, {"candidate_key": "it's never trained"}) is None


def test_model_loads_back_as_the_real_timm_module_with_named_layers(trained, shared_data) -> None:
    loaded = load_model(trained.model_uri)
    assert loaded.run_id == trained.run_id and loaded.task == TASK and loaded.classes == CLASSES
    assert type(loaded.module.encoder).__name__ == "EfficientNet"
    assert loaded.module.get_submodule(loaded.backbone.gradcam_layer_name) is loaded.gradcam_layer
    assert loaded.preprocessing["input_size"] == [3, 64, 64]
    rgb = [decode_image(p.read_bytes()).rgb for p in sorted((shared_data / "all_taleqani" / "Pro").iterdir())[:3]]
    proba = loaded.predict_proba(rgb)
    assert proba.shape == (3, 4) and np.allclose(proba.sum(axis=1), 1.0, atol=1e-5)
    assert loaded.embed(rgb).shape == (3, loaded.module.encoder.num_features)
    with torch.no_grad():
        assert not loaded.module.training


def test_pyfunc_flavour_predicts_base64_images_like_the_loader(trained, shared_data) -> None:
    files = sorted((shared_data / "all_taleqani" / "Benign").iterdir())[:2]
    frame = pd.DataFrame({"image": [base64.b64encode(f.read_bytes()).decode() for f in files]})
    pyfunc = mlflow.pyfunc.load_model(trained.model_uri)
    assert [c.name for c in pyfunc.metadata.get_input_schema().inputs] == ["image"]
    out = pyfunc.predict(frame)
    assert list(out.columns) == ["predicted_class", "confidence", *CLASSES]
    expected = load_model(trained.model_uri).predict_proba([decode_image(f.read_bytes()).rgb for f in files])
    assert np.allclose(out[CLASSES].to_numpy(), expected, atol=1e-5)
    assert set(out["predicted_class"]) <= set(CLASSES)


def test_evaluate_on_a_holdout_source_and_refuse_a_source_of_another_task(
    trained, champion, settings, store, shared_data, tmp_path, capsys
) -> None:
    _ingest(settings, store, "taleqani-holdout", _copy_images(shared_data, tmp_path / "h", 3, 380), "holdout")
    code = main(["evaluate", "--model", trained.run_id, "--source", "taleqani-holdout", "--json"])
    assert code == 0, capsys.readouterr().err
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 12 and result["task"] == TASK and result["absent_classes"] == []
    assert 0.0 <= result["macro_f1"] <= 1.0 and set(result["per_class"]) == set(CLASSES)
    code = main(["evaluate", "--model", "champion", "--source", "taleqani-holdout", "--json"])
    assert code == 0, capsys.readouterr().err
    by_alias = json.loads(capsys.readouterr().out)
    # @champion is verified first, then the verified version's run is what is evaluated
    assert by_alias["model_uri"] == f"runs:/{trained.run_id}/model"
    assert by_alias["attestation"]["valid"] is True and by_alias["attestation"]["version"] == champion
    assert by_alias["run_id"] == trained.run_id and by_alias["macro_f1"] == pytest.approx(result["macro_f1"])
    binary_map = {"Benign": "Healthy", "Early": "ALL", "Pre": "ALL", "Pro": "ALL"}
    binary = _copy_images(shared_data, tmp_path / "b", 2, 390)
    save_source(Source("binary-lab", str(binary), "folders", binary_map, ("binary_all",)), settings, replace=True)
    assert main(["evaluate", "--model", trained.run_id, "--source", "binary-lab", "--json"]) == 2
    assert "not the model's task 'all_subtypes'" in capsys.readouterr().err


def test_cli_train_from_random_init_reports_json(trained, capsys) -> None:
    argv = ["train", "--task", TASK, "--dataset-version", trained.dataset_version, "--backbone", "custom_cnn"]
    argv += ["--augment", "randaug", "--epochs", "1", "--image-size", "32", "--max-images", "24", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["pretrained"] is False and out["epochs_run"] == 1 and out["run_id"] != trained.run_id
    assert set(out) == set(trained.to_dict())


def test_cli_train_warm_start_fine_tunes_the_verified_champion(trained, champion, settings, capsys) -> None:
    """`leukops train --warm-start` reads @champion through the attestation check (the trust wing's reader
    the CLI injects) and tags the run with the version its weights came from."""
    argv = ["train", "--task", TASK, "--dataset-version", trained.dataset_version, "--backbone", "efficientnet_lite0"]
    argv += ["--augment", "none", "--epochs", "1", "--image-size", "64", "--max-images", "24", "--warm-start"]
    assert main([*argv, "--json"]) == 0, capsys.readouterr().err
    run_id = json.loads(capsys.readouterr().out)["run_id"]
    tags = mlflow.MlflowClient(settings.mlflow_tracking_uri).get_run(run_id).data.tags
    assert tags["warm_start"] == f"champion v{champion} (run {trained.run_id})"
