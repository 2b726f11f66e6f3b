"""The three DAGs: parse checks, structure, and real `airflow dags test` runs against the real local
S3 + MLflow servers (Airflow as a subprocess with its own AIRFLOW_HOME, migrated once per module)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipelines.core.settings import get_settings
from pipelines.devstack import airflow_local

DAGS = Path(__file__).resolve().parents[3] / "dags"
TASK = "all_subtypes"
# Tiny, fast grid in the retrain run's conf (as a caller passes it, so every worker sees it); thresholds low
# enough that the plumbing, not the model, is what this test checks (the gate's decisions have their own
# tests). The second backbone is off the allow-list: that cell fails at once and the gate goes on without it.
RETRAIN_CONF = {
    "tasks": [TASK],
    "backbones": ["efficientnet_lite0", "no_such_backbone"],
    "augmentations": ["none"],
    "epochs": 2,
    "image_size": 64,
    "batch_size": 16,
    "explain_samples": 8,
    "macro_f1_min": 0.0,
    "class_recall_min": 0.0,
    "nucleus_enrichment_min": 0.0,
    "shortcut_flip_rate_max": 1.0,
    "min_check_images": 1,
}


def test_dags_parse_fast_without_import_errors(settings):
    code = (
        "import time, json\n"
        "from airflow.dag_processing.dagbag import DagBag\n"
        f"bag = DagBag({str(DAGS)!r})\n"
        "print(json.dumps({'errors': {k: str(v) for k, v in bag.import_errors.items()}, 'dags': sorted(bag.dags),"
        " 'seconds': {s.file: s.duration.total_seconds() for s in bag.dagbag_stats}}))\n"
    )
    env = {**os.environ, "AIRFLOW_HOME": str(Path(os.environ["LEUKOPS_STATE_DIR"]) / "parse-home")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    import json

    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["errors"] == {}
    assert result["dags"] == ["leukops_drift", "leukops_ingest", "leukops_nightly_retrain"]
    assert all(seconds < 2.0 for seconds in result["seconds"].values()), result["seconds"]


def test_no_heavy_imports_at_parse_time(settings):
    code = (
        "import sys, runpy\n"
        f"for f in {sorted(str(p) for p in DAGS.glob('leukops_*.py'))!r}: runpy.run_path(f)\n"
        "heavy = sorted(m for m in ('torch', 'timm', 'mlflow', 'great_expectations', 'evidently', 'cv2', 'minio')"
        " if m in sys.modules)\n"
        "print(heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stderr[-2000:]


def test_retrain_structure_maps_training_on_the_gpu_queue_and_pool(settings):
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(str(DAGS))
    dag = bag.dags["leukops_nightly_retrain"]
    train = dag.get_task("train")
    assert (train.queue, train.pool) == ("gpu", "gpu")
    assert type(train).__name__.endswith("MappedOperator")  # dynamic task mapping over the grid
    assert dag.max_active_runs == 1 and dag.catchup is False
    assert {"force", "reason", "epochs", "backbones", "macro_f1_min", "class_recall_min"} <= set(dag.params)
    assert [t.task_id for t in dag.topological_sort()] == ["snapshot", "plan", "train", "explain", "gate_and_promote"]
    assert dag.get_task("explain").retries >= 1
    assert dag.get_task("gate_and_promote").trigger_rule == "all_done_min_one_success"
    ingest = bag.dags["leukops_ingest"]
    assert ingest.get_task("publish_accepted").retries == 0  # deterministic validation verdict: no retry
    assert ingest.get_task("ingest_and_validate").retries >= 1


def test_every_dag_documents_itself_and_every_task_alerts_and_has_a_timeout(settings):
    from airflow.dag_processing.dagbag import DagBag

    from pipelines.orchestration.notifiers import LeukopsAlertNotifier

    for dag in DagBag(str(DAGS)).dags.values():
        assert dag.doc_md and dag.dag_id in dag.doc_md
        for task in dag.tasks:
            assert task.execution_timeout is not None, (dag.dag_id, task.task_id)
            callbacks = task.on_failure_callback or []
            assert any(isinstance(c, LeukopsAlertNotifier) for c in callbacks), (dag.dag_id, task.task_id)
            assert task.doc_md, (dag.dag_id, task.task_id)


@pytest.fixture(scope="module")
def airflow_settings(stack, settings, tmp_path_factory):
    from pipelines.data.sources import Source, save_source
    from pipelines.devstack.synthetic import write_synthetic

    # Own sources registry and registered model: other modules' sources and champions stay out of it.
    isolation = {
        "LEUKOPS_SOURCES_DIR": str(tmp_path_factory.mktemp("dag-sources")),
        "LEUKOPS_REGISTERED_MODEL_PREFIX": "dagtest",
    }
    with pytest.MonkeyPatch.context() as env:
        for key, value in isolation.items():
            env.setenv(key, value)
        get_settings.cache_clear()
        local = get_settings()
        synth = tmp_path_factory.mktemp("synth-dag")
        write_synthetic(synth, TASK, per_class=12, size=64, seed=3)
        identity = {c: c for c in ("Benign", "Early", "Pre", "Pro")}
        save_source(Source("dag-synth", str(synth / "images"), "folders", identity, (TASK,)), local)
        airflow_local.init(local, DAGS)
        yield local
    get_settings.cache_clear()


@pytest.fixture(scope="module")
def retrain_runs(airflow_settings):
    ingest = airflow_local.dags_test(airflow_settings, DAGS, "leukops_ingest")
    first = airflow_local.dags_test(airflow_settings, DAGS, "leukops_nightly_retrain", RETRAIN_CONF)
    second = airflow_local.dags_test(airflow_settings, DAGS, "leukops_nightly_retrain", RETRAIN_CONF)
    return ingest, first, second


def test_ingest_dag_publishes_the_accepted_asset(retrain_runs, airflow_settings):
    ingest, _, _ = retrain_runs
    assert ingest.state == "success", ingest.log_path.read_text()[-3000:]
    events = airflow_local.asset_events(airflow_settings, "leukops_accepted_images", "leukops_ingest")
    assert events and events[-1]["extra"]["action"] == "accepted"
    assert events[-1]["extra"]["accepted"] == 48


def test_retrain_dag_registers_a_champion_with_gate_report(retrain_runs, airflow_settings):
    from pipelines.io.registry import Registry

    _, first, _ = retrain_runs
    assert first.state == "success", first.log_path.read_text()[-3000:]
    assert sorted(first.task_states["train"]) == ["failed", "success"], first.task_states  # only the bad cell failed
    assert "unknown backbone 'no_such_backbone'" in first.log_path.read_text()
    outcome = airflow_local.task_return(airflow_settings, "leukops_nightly_retrain", first.run_id, "gate_and_promote")
    promoted = outcome[0][TASK]
    assert promoted["promoted"] is True
    assert promoted["failed_candidates"] == [f"{first.run_id}/{TASK}/no_such_backbone/none"]
    registry = Registry.from_settings(airflow_settings)
    champion = registry.aliases(TASK)["champion"]
    assert str(champion) == str(promoted["version"])
    artifacts = registry.list_artifacts(promoted["selected_run_id"], "gate")
    assert "gate/report.json" in artifacts and "gate/report.md" in artifacts, artifacts


def test_unchanged_snapshot_skips_training(retrain_runs):
    _, _, second = retrain_runs
    assert second.state == "success", second.log_path.read_text()[-3000:]
    assert second.task_states["train"] == ["skipped"]
    assert second.task_states["gate_and_promote"] == ["skipped"]


def _shifted_copy(source_dir: Path, target: Path) -> Path:
    """Same smears, other stain: a bluer, darker lab."""
    for path in source_dir.rglob("*.png"):
        rgb = cv2.imread(str(path))
        shifted = np.clip(rgb.astype(np.float32) * np.array([1.25, 0.8, 0.7]) - 15, 0, 255).astype(np.uint8)
        out = target / path.relative_to(source_dir)
        out.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(out), shifted)
    return target


def test_drift_with_new_labels_emits_the_retrain_request(retrain_runs, airflow_settings, tmp_path):
    from pipelines.data.ingest import ingest_source
    from pipelines.data.sources import Source, load_source, save_source
    from pipelines.io.storage import ObjectStore

    synth = Path(load_source("dag-synth", airflow_settings).location)
    shifted = _shifted_copy(synth, tmp_path / "shifted")
    identity = {c: c for c in ("Benign", "Early", "Pre", "Pro")}
    source = Source("dag-shifted-lab", str(shifted), "folders", identity, (TASK,))
    save_source(source, airflow_settings)
    store = ObjectStore.from_settings(airflow_settings)
    report = ingest_source(source, airflow_settings, store, run_date=time.strftime("%Y-%m-%d"))
    assert report.status == "accepted"
    before = airflow_local.asset_events(airflow_settings, "leukops_retrain_request", "leukops_drift")
    drift = airflow_local.dags_test(airflow_settings, DAGS, "leukops_drift")
    assert drift.state == "success", drift.log_path.read_text()[-3000:]
    events = airflow_local.asset_events(airflow_settings, "leukops_retrain_request", "leukops_drift")
    assert len(events) == len(before) + 1
    assert events[-1]["extra"]["action"] == "retrain" and events[-1]["extra"]["tasks"] == [TASK]
    verdicts = airflow_local.task_return(airflow_settings, "leukops_drift", drift.run_id, "check_drift")
    drifted = [r for r in verdicts[0]["reports"] if r["retrain_recommended"]]
    assert drifted and drifted[0]["report_html"].startswith("s3://")
