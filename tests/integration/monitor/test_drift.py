"""Drift monitoring on real images against the real local S3 + MLflow stack.

Inputs are written in the contract formats (batch manifests with image facts, a dataset snapshot, a
serving request log, a registered @champion model), so these tests exercise drift's readers, Evidently
and publishing end to end. Each module run uses its own source names and registered-model prefix.
"""

from __future__ import annotations

import io
import json
import posixpath
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from html.parser import HTMLParser
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from pipelines.cli import main
from pipelines.data.imagefacts import FACT_COLUMNS, decode_image, image_facts, perceptual_hash
from pipelines.io import layout
from pipelines.io.registry import Registry
from pipelines.io.storage import sha256_hex
from pipelines.monitor.drift import monitor
from pipelines.monitor.features import EMBEDDING_NAME, SIZE_FEATURES

TASK = "wbc"
RUN_DATE = date(2026, 1, 2)
STAIN_COLOUR = {
    "brightness",
    "contrast",
    "hue_mean",
    "saturation_mean",
    "red_mean",
    "green_mean",
    "blue_mean",
    "purple_share",
    "hematoxylin_od",
    "eosin_od",
}
UID = uuid.uuid4().hex[:8]


def _files(root: Path, per_class: int, offset: int = 0) -> list[tuple[Path, str]]:
    out = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        images = sorted(f for f in class_dir.iterdir() if f.suffix.lower() in (".jpg", ".bmp", ".png"))
        out += [(f, class_dir.name) for f in images[offset : offset + per_class]]
    return out


def _stain_shift(data: bytes) -> bytes:
    """Brighter and bluer (a paler, differently stained slide), same size, re-encoded as JPEG."""
    rgb = decode_image(data).rgb.astype(np.float32)
    rgb = rgb * np.array([0.97, 1.05, 1.12]) + 12
    bgr = cv2.cvtColor(np.clip(rgb, 0, 255).astype(np.uint8), cv2.COLOR_RGB2BGR)
    return cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()


def _manifest_row(store, source: str, path: Path, label: str, transform) -> dict:
    data = path.read_bytes() if transform is None else transform(path.read_bytes())
    ext = "jpg" if transform is not None else path.suffix.lower().lstrip(".")
    sha = sha256_hex(data)
    key = layout.raw_key(sha, ext)
    store.put_bytes(key, data)
    decoded = decode_image(data)
    return {
        "source": source,
        "path": path.name,
        "sha256": sha,
        "key": key,
        "phash": perceptual_hash(decoded.rgb),
        "ext": ext,
        "format": decoded.format,
        "label": label,
        "source_label": label,
        "status": "accepted",
        "reason": None,
        **image_facts(decoded.rgb, decoded.source_channels),
    }


def _write_batch(store, source: str, files: list[tuple[Path, str]], transform=None) -> tuple[str, pd.DataFrame]:
    """Upload images and publish an all-accepted batch manifest (the ingest contract)."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        rows = list(pool.map(lambda item: _manifest_row(store, source, *item, transform), files))
    batch_id = sha256_hex(json.dumps(sorted(r["sha256"] for r in rows)).encode())[:16]
    frame = pd.DataFrame(rows).assign(batch_id=batch_id)
    store.put_parquet(layout.batch_manifest_key(source, batch_id), frame)
    return batch_id, frame


@pytest.fixture(scope="module")
def batches(store, shared_data) -> dict[str, tuple[str, str, pd.DataFrame]]:
    """name -> (source, batch_id, manifest): two halves of pbc, a stain-shifted half, the CellaVision blog set."""
    pbc, blog = shared_data / "pbc", shared_data / "wbc_seg_cellavision"
    plan = {
        "pbc_a": (_files(pbc, 13, 0), None),
        "pbc_b": (_files(pbc, 13, 13), None),
        "pbc_b_shifted": (_files(pbc, 13, 13), _stain_shift),
        "blog": (_files(blog, 40), None),
    }
    out = {}
    for name, (files, transform) in plan.items():
        source = f"drift-{name.replace('_', '-')}-{UID}"
        batch_id, frame = _write_batch(store, source, files, transform)
        out[name] = (source, batch_id, frame)
    return out


@pytest.fixture(scope="module")
def no_champion(settings):
    """Settings whose registry has no model for the task (own prefix)."""
    return settings.model_copy(update={"registered_model_prefix": f"drift-none-{UID}"})


class _PageChecker(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.scripts = 0

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.scripts += tag == "script"


def _assert_standalone_report(store, outcome) -> str:
    key = outcome.report_html.removeprefix(store.uri(""))
    assert key == layout.drift_report_keys(RUN_DATE, outcome.report_id)[0]
    page = store.get_bytes(key).decode()
    checker = _PageChecker()
    checker.feed(page)
    checker.close()
    assert page.lstrip().startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert {"html", "head", "body", "title", "table"} <= set(checker.tags) and checker.scripts >= 1
    assert 'id="leukops-drift-summary"' in page and "Drift" in page
    assert all(f'"{c}"' in page for c in ("brightness", "hematoxylin_od")), "per-column widgets in the page"
    assert not any(s in page for s in ('src="http', "src='http")), "no external scripts: opens offline"
    body = store.get_json(outcome.report_json.removeprefix(store.uri("")))
    assert body["summary"]["drifted_features"] == outcome.summary.drifted_features
    assert any(m["config"]["type"].endswith("DriftedColumnsCount") for m in body["evidently"]["metrics"])
    return page


def test_two_halves_of_one_source_do_not_drift(store, batches, no_champion):
    source_a, _, _ = batches["pbc_a"]
    _, batch_b, _ = batches["pbc_b"]
    outcome = monitor(
        TASK, f"source:{source_a}", f"batch:{batch_b}", settings=no_champion, store=store, run_date=RUN_DATE
    )
    s = outcome.summary
    assert (s.n_reference, s.n_current) == (104, 104)
    assert not s.drift_detected and s.drifted_features == [] and s.drift_share == 0.0
    assert not outcome.retrain_recommended
    assert s.embedding_drift is None and any("no champion" in n for n in s.notes)
    _assert_standalone_report(store, outcome)
    index = store.get_bytes(layout.DRIFT_INDEX_HTML).decode()
    assert f"{RUN_DATE.isoformat()}/{outcome.report_id}.html" in index
    client = MlflowClient(no_champion.mlflow_tracking_uri)
    run = client.get_run(outcome.mlflow_run_id)
    assert run.data.tags["report_html"] == outcome.report_html and run.data.metrics["drift_share"] == 0.0
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, posixpath.dirname(layout.DRIFT_REPORT_HTML))}
    assert artifacts == {layout.DRIFT_REPORT_HTML, layout.DRIFT_REPORT_JSON}


def test_pbc_against_the_cellavision_blog_set_drifts_in_stain_and_colour(store, batches, no_champion):
    source_a, _, _ = batches["pbc_a"]
    source_blog, _, _ = batches["blog"]
    outcome = monitor(
        TASK,
        f"source:{source_a}",
        f"source:{source_blog}",
        settings=no_champion,
        store=store,
        run_date=RUN_DATE,
        log_to_mlflow=False,
    )
    drifted = set(outcome.summary.drifted_features)
    assert outcome.summary.drift_detected and outcome.retrain_recommended
    assert len(drifted & STAIN_COLOUR) >= 4, drifted
    assert {"hematoxylin_od", "eosin_od"} & drifted and not drifted <= set(SIZE_FEATURES)


def test_stain_shift_of_the_same_images_is_detected_and_named(store, batches, no_champion):
    _, batch_b, frame_b = batches["pbc_b"]
    _, batch_shifted, frame_shifted = batches["pbc_b_shifted"]
    assert (frame_b[["width", "height"]].to_numpy() == frame_shifted[["width", "height"]].to_numpy()).all()
    outcome = monitor(
        TASK,
        f"batch:{batch_b}",
        f"batch:{batch_shifted}",
        settings=no_champion,
        store=store,
        run_date=RUN_DATE,
        log_to_mlflow=False,
    )
    drifted = set(outcome.summary.drifted_features)
    assert outcome.summary.drift_detected
    assert {"brightness", "blue_mean", "hue_mean", "hematoxylin_od"} <= drifted, drifted
    assert not drifted & set(SIZE_FEATURES), "same sizes and format: size features must not drift"


def test_serving_window_reads_the_request_log(store, batches, no_champion):
    source_a, _, _ = batches["pbc_a"]
    _, _, frame_b = batches["pbc_b"]
    log = frame_b[list(FACT_COLUMNS)].assign(
        ts="2026-01-05T10:00:00+00:00",
        request_id=[f"r{i}" for i in range(len(frame_b))],
        task=TASK,
        model_version="1",
        predicted_class=frame_b["label"],
        confidence=0.9,
    )
    buffer = io.BytesIO()
    log.to_parquet(buffer, index=False)
    store.put_bytes(layout.request_log_part_key("2026-01-05", UID), buffer.getvalue())
    outcome = monitor(
        TASK,
        f"source:{source_a}",
        "serving:2026-01-04..2026-01-06",
        settings=no_champion,
        store=store,
        run_date=RUN_DATE,
        log_to_mlflow=False,
    )
    assert outcome.summary.n_current == len(frame_b) and not outcome.summary.drift_detected
    assert "file_type" not in outcome.summary.columns, "the request log carries no file type"


@pytest.fixture(scope="module")
def champion(store, settings, batches):
    """An (untrained) custom_cnn registered as @champion, trained on a snapshot of the pbc_a half."""
    from pipelines.core.taxonomy import get_task
    from pipelines.io.tracking import TrainingTracker
    from pipelines.model.backbones import create_backbone
    from pipelines.model.bundle import ModelBundle
    from pipelines.model.preprocess import preprocessing_from
    from pipelines.model.pyfunc import log_model

    fresh = settings.model_copy(update={"registered_model_prefix": f"drift-champ-{UID}"})
    _, _, frame_a = batches["pbc_a"]
    version = f"drift-test-{UID}"
    snapshot = frame_a[["sha256", "key", "label", "source", "phash", *FACT_COLUMNS]].assign(split="train")
    store.put_parquet(layout.dataset_key(TASK, version), snapshot)
    classes = list(get_task(TASK).classes)
    backbone = create_backbone("custom_cnn", len(classes), pretrained=False, image_size=32)
    bundle = ModelBundle.for_backbone(TASK, classes, backbone, preprocessing_from(backbone.data_config))
    tags = {
        "task": TASK,
        "dataset_version": version,
        "backbone": "custom_cnn",
        "augment": "none",
        "pretrained": "false",
    }
    example = cv2.imencode(".png", np.full((32, 32, 3), 200, np.uint8))[1].tobytes()
    with TrainingTracker(fresh, run_key=f"drift-{UID}", run_name="drift-champion", tags=tags) as run:
        log_model(run, bundle, backbone.model.state_dict(), example)
    registry = Registry.from_settings(fresh)
    record = registry.register(TASK, registry.read_run(run.run_id), {}, "drift test champion")
    registry.move_aliases(TASK, [("champion", record.version)], {"action": "promote", "who": "test", "why": "drift"})
    return fresh, version


def test_champion_reference_adds_embeddings_and_predictions_and_caches_the_pca(store, batches, champion):
    fresh, version = champion
    _, batch_blog, _ = batches["blog"]
    outcome = monitor(TASK, "champion", f"batch:{batch_blog}", settings=fresh, store=store, run_date=RUN_DATE)
    s = outcome.summary
    assert s.notes == [] and s.n_reference == 104 and s.prediction_drift is not None
    assert s.embedding_drift is not None and s.embedding_drift_detected and 0.5 < s.embedding_drift <= 1.0
    assert EMBEDDING_NAME in s.drifted_features and not any(f.startswith("emb_pc") for f in s.drifted_features)
    cached = store.list(f"{layout.DRIFT_REFERENCES}/")
    assert any(k.endswith("/pca.json") for k in cached) and any(k.endswith("/features.parquet") for k in cached)
    _assert_standalone_report(store, outcome)
    body = store.get_json(outcome.report_json.removeprefix(store.uri("")))
    embedding_metric = [m for m in body["evidently"]["metrics"] if m["config"]["type"].endswith(":EmbeddingsDrift")]
    assert embedding_metric[0]["value"] == pytest.approx(s.embedding_drift, abs=1e-3)
    assert embedding_metric[0]["config"]["drift_method"]["type"].endswith("ModelDriftMethod")
    assert body["meta"]["reference_dataset_version"] == version


def test_cli_prints_the_summary_as_json_and_refuses_bad_specs(store, batches, no_champion, monkeypatch, capsys):
    from pipelines.core.settings import get_settings

    monkeypatch.setenv("LEUKOPS_REGISTERED_MODEL_PREFIX", no_champion.registered_model_prefix)
    get_settings.cache_clear()
    source_a, _, _ = batches["pbc_a"]
    _, batch_b, _ = batches["pbc_b"]
    argv = ["drift", "--task", TASK, "--reference", f"source:{source_a}", "--current", f"batch:{batch_b}"]
    try:
        assert main([*argv, "--date", RUN_DATE.isoformat(), "--no-mlflow", "--json"]) == 0
        data = json.loads(capsys.readouterr().out)
        assert {
            "drift_detected",
            "drift_share",
            "drifted_features",
            "embedding_drift",
            "retrain_recommended",
            "report_html",
            "notes",
        } <= set(data)
        assert data["report_html"].startswith(f"s3://{store.bucket}/{layout.DRIFT_REPORTS}/{RUN_DATE.isoformat()}/")
        assert data["drift_detected"] is False and data["embedding_drift"] is None
        assert main(["drift", "--task", TASK, "--current", "yesterday"]) == 2
        assert "bad --current 'yesterday'" in capsys.readouterr().err
    finally:
        get_settings.cache_clear()
