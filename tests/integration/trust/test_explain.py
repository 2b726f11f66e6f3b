"""`leukops explain` on a real training run: synthetic smears ingested into S3, a snapshot, a custom_cnn
run in the real MLflow server, then Grad-CAM / LIME / shortcut results logged back to that run."""

from __future__ import annotations

import json

import mlflow
import pytest

from pipelines.cli import main
from pipelines.data.ingest import ingest_source
from pipelines.data.snapshot import take_snapshot
from pipelines.data.sources import Source, default_label_map, load_source, save_source
from pipelines.devstack.synthetic import write_synthetic
from pipelines.trust.explain import ExplainError, explain_run

TASK = "binary_all"


@pytest.fixture(scope="module")
def run_id(stack, settings, store, tmp_path_factory) -> str:
    """One real (tiny) training run on synthetic smears with the corner shortcut: 60 images, 64 px."""
    from pipelines.model.candidate import train_candidate

    folder = tmp_path_factory.mktemp("synthetic-explain")
    write_synthetic(folder, TASK, per_class=30, size=64, seed=0, shortcut="corner")
    source = Source("synthetic-explain", str(folder / "images"), "folders", default_label_map([TASK]), (TASK,))
    save_source(source, settings, replace=True)
    ingest_source(load_source(source.name, settings), settings, store, run_date="2026-01-01")
    version = take_snapshot(store, settings, TASK).snapshot.version
    summary = train_candidate(
        settings, TASK, "custom_cnn", "none", dataset_version=version, image_size=64, batch_size=16, epochs=1
    )
    return summary.run_id


def test_explain_logs_metrics_and_artifacts_to_the_run(run_id, settings) -> None:
    report = explain_run(run_id, samples=6, seed=0, lime_images=1)
    assert report["n_images"] >= 2 and len(report["sha256"]) == report["n_images"]
    assert 0 <= report["gradcam"]["nucleus_mass"] <= 1
    assert 0 <= report["shortcut"]["flip_rate"] <= 1
    client = mlflow.MlflowClient(settings.mlflow_tracking_uri)
    metrics = client.get_run(run_id).data.metrics
    for name in (
        "gradcam_nucleus_mass",
        "gradcam_nucleus_enrichment",
        "gradcam_artefact_mass",
        "gradcam_artefact_enrichment",
        "shortcut_flip_rate",
        "shortcut_f1_drop",
        "lime_nucleus_mass",
    ):
        assert name in metrics, name
    assert metrics["shortcut_flip_rate"] == pytest.approx(report["shortcut"]["flip_rate"])
    logged = {a.path for a in client.list_artifacts(run_id, "explain")}
    assert "explain/metrics.json" in logged
    overlays = {a.path for a in client.list_artifacts(run_id, "explain/overlays")}
    assert overlays and all(p.endswith(".png") for p in overlays)
    stored = json.loads(
        open(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="explain/metrics.json")).read()
    )
    assert stored["sha256"] == report["sha256"] and stored["dataset_version"] == report["dataset_version"]


def test_explain_cli_prints_the_contract_json(run_id, capsys) -> None:
    assert main(["explain", "--run-id", run_id, "--samples", "4", "--lime-images", "1", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {"gradcam", "lime", "shortcut", "segmentation"} <= set(data)
    assert {"nucleus_mass", "nucleus_enrichment", "pointing_game", "artefact_mass", "artefact_enrichment"} <= set(
        data["gradcam"]
    )
    assert {"flip_rate", "f1_drop"} <= set(data["shortcut"])


def test_explain_names_a_missing_run(stack, capsys) -> None:
    assert main(["explain", "--run-id", "0" * 32]) == 2
    assert "0" * 32 in capsys.readouterr().err
    with pytest.raises(ExplainError, match="at least 2"):
        explain_run("anything", samples=1)
