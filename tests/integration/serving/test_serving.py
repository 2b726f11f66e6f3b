"""Serving against the real local stack: a champion trained in the test and promoted in the real MLflow
registry, served by the real app (registry source, S3 request log), hot-reloaded when @champion moves.

The champion is a real transfer-learned EfficientNet-Lite0 (32 real Taleqani images ingested into S3,
a snapshot, one 64 px epoch via ``pipelines.model.candidate.train_candidate``), registered and aliased with
``pipelines.io.registry``. The second version (for the alias move) is a real untrained custom_cnn logged
through ``pipelines.model.pyfunc.log_model``. Each module run uses its own registered-model prefix. Both
are signed (``pipelines.trust.attestation``, the session stack's dev key pair) over a stand-in passing gate
report before their alias moves: serving loads only attested versions (tests/integration/trust/test_attestation.py).
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from pipelines.core.taxonomy import get_task
from pipelines.data.ingest import ingest_source
from pipelines.data.snapshot import take_snapshot
from pipelines.data.sources import Source, default_label_map, load_source, save_source
from pipelines.io.layout import SERVING_REQUESTS
from pipelines.io.registry import Registry
from serving.app import create_app
from serving.requestlog import CONTRACT_COLUMNS
from tests.integration.signing import attest_version

TASK = "all_subtypes"
CLASSES = list(get_task(TASK).classes)
AUDIT = {"action": "test", "who": "tests/integration/test_serving.py", "why": "serving test"}


def _ingest_taleqani(settings, store, shared_data: Path, root: Path) -> None:
    for label in CLASSES:
        (root / label).mkdir(parents=True)
        for f in sorted((shared_data / "all_taleqani" / label).iterdir())[200:208]:
            shutil.copyfile(f, root / label / f.name)
    source = Source("serving-train", str(root), "folders", default_label_map((TASK,)), (TASK,))
    save_source(source, settings, replace=True)
    report = ingest_source(load_source("serving-train", settings), settings, store, run_date="2026-01-02")
    assert report.accepted == 4 * 8, report


def _attest(settings, registry: Registry, version: str, run_id: str) -> None:
    """Sign ``version`` as promotion does; the gate itself is tested in tests/integration/trust."""
    attest_version(settings, registry, TASK, version, run_id, "serving test")


def _log_untrained_version(settings, registry: Registry) -> str:
    from pipelines.io.tracking import TrainingTracker
    from pipelines.model.backbones import create_backbone
    from pipelines.model.bundle import ModelBundle
    from pipelines.model.preprocess import preprocessing_from
    from pipelines.model.pyfunc import log_model

    backbone = create_backbone("custom_cnn", len(CLASSES), pretrained=False, image_size=64)
    bundle = ModelBundle.for_backbone(TASK, CLASSES, backbone, preprocessing_from(backbone.data_config))
    example = cv2.imencode(".png", np.full((64, 64, 3), 200, np.uint8))[1].tobytes()
    tags = {
        "task": TASK,
        "dataset_version": "unused",
        "backbone": "custom_cnn",
        "augment": "none",
        "pretrained": "false",
    }
    with TrainingTracker(settings, run_key=f"serving-{uuid.uuid4().hex}", run_name="v2", tags=tags) as run:
        log_model(run, bundle, backbone.model.state_dict(), example)
    record = registry.register(TASK, registry.read_run(run.run_id), {"gate.passed": "true"}, "test v2")
    _attest(settings, registry, record.version, run.run_id)
    return record.version


@pytest.fixture(scope="module")
def serve_settings(settings, stack):
    serving = settings.serving.model_copy(
        update={
            "task": TASK,
            "reload_interval_s": 0.5,
            "request_log_flush_rows": 4,
            "request_log_flush_s": 1.0,
            "log_raw_images": True,
            "max_upload_mb": 1.0,
        }
    )
    return settings.model_copy(update={"registered_model_prefix": f"serving{uuid.uuid4().hex[:8]}", "serving": serving})


@pytest.fixture(scope="module")
def champion(serve_settings, store, shared_data, tmp_path_factory) -> dict:
    from pipelines.model.candidate import train_candidate

    _ingest_taleqani(serve_settings, store, shared_data, tmp_path_factory.mktemp("serving-taleqani"))
    version = take_snapshot(store, serve_settings, TASK).snapshot.version
    trained = train_candidate(
        serve_settings,
        TASK,
        "efficientnet_lite0",
        "none",
        dataset_version=version,
        image_size=64,
        max_images=32,
        batch_size=8,
        epochs=1,
        head_epochs=1,
        lr=3e-3,
    )
    registry = Registry.from_settings(serve_settings)
    record = registry.register(
        TASK,
        registry.read_run(trained.run_id),
        {"gate.passed": "true", "gate.macro_f1": f"{trained.test_f1:.3f}"},
        "test",
    )
    _attest(serve_settings, registry, record.version, trained.run_id)
    registry.move_aliases(TASK, [("champion", record.version)], AUDIT)
    return {"version": record.version, "run_id": trained.run_id, "registry": registry}


@pytest.fixture(scope="module")
def client(serve_settings, champion):
    with TestClient(create_app(serve_settings)) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def smears(shared_data: Path) -> list[tuple[str, bytes]]:
    files = [sorted((shared_data / "all_taleqani" / c).iterdir())[300] for c in CLASSES]
    return [(f.name, f.read_bytes()) for f in files]


def _auth(settings) -> dict[str, str]:
    return {"Authorization": f"Bearer {settings.secret('serving.token')}"}


def _predict(client, settings, name: str, data: bytes, query: str = ""):
    files = {"file": (name, data, "image/jpeg")}
    return client.post(f"/v1/predict{query}", files=files, headers=_auth(settings))


def test_champion_predicts_a_valid_distribution_on_real_images(client, serve_settings, champion, smears) -> None:
    for name, data in smears:
        response = _predict(client, serve_settings, name, data)
        assert response.status_code == 200, response.text
        body = response.json()
        assert list(body["probabilities"]) == CLASSES
        assert sum(body["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert body["model"]["version"] == champion["version"]
        assert body["model"]["run_id"] == champion["run_id"]
    info = client.get("/v1/model", headers=_auth(serve_settings)).json()
    assert info["aliases"] == ["champion"] and info["preprocessing"]["input_size"] == [3, 64, 64]
    assert info["gate"]["passed"] == "true"
    assert info["attestation"]["valid"] is True and info["attestation"]["sequence"] == 1


def test_explain_returns_a_decodable_png_of_the_input_size(client, serve_settings, smears) -> None:
    name, data = smears[0]
    response = _predict(client, serve_settings, name, data, "?explain=gradcam")
    assert response.status_code == 200, response.text
    explanation = response.json()["explanation"]
    png = Image.open(io.BytesIO(base64.b64decode(explanation["overlay_png_base64"])))
    assert png.format == "PNG" and png.size == Image.open(io.BytesIO(data)).size
    assert 0.0 <= explanation["localization"]["nucleus_mass"] <= 1.0


def test_auth_and_bad_inputs_are_4xx(client, serve_settings, smears) -> None:
    name, data = smears[0]
    assert client.post("/v1/predict", files={"file": (name, data)}).status_code == 401
    assert _predict(client, serve_settings, "x.txt", b"plain text, not pixels").status_code == 415
    assert _predict(client, serve_settings, "cut.jpg", data[: len(data) // 3]).status_code == 422
    oversize = b"\xff\xd8" + bytes(int(serve_settings.serving.max_upload_mb * 1024 * 1024) + 1)
    assert _predict(client, serve_settings, "big.jpg", oversize).status_code == 413


def test_request_log_lands_in_s3_and_the_drift_side_reads_it(client, serve_settings, champion, store, smears) -> None:
    from pipelines.monitor.features import serving_side_features
    from pipelines.monitor.inputs import serving_rows

    before = set(store.list(f"{SERVING_REQUESTS}/"))
    ids = {_predict(client, serve_settings, *smears[i % 4]).json()["request_id"] for i in range(8)}
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        new = [k for k in store.list(f"{SERVING_REQUESTS}/") if k not in before and k.endswith(".parquet")]
        frame = serving_rows(store, TASK, f"{datetime.now(UTC):%Y-%m-%d}..{datetime.now(UTC):%Y-%m-%d}")
        if ids <= set(frame["request_id"]):
            break
        time.sleep(0.5)
    assert ids <= set(frame["request_id"]), f"logged parts: {new}"
    assert all(k.split("/")[2].startswith("date=") and "/part-" in k for k in new)
    rows = frame[frame["request_id"].isin(ids)]
    assert set(CONTRACT_COLUMNS) <= set(rows.columns)
    assert rows["predicted_class"].isin(CLASSES).all() and rows["confidence"].between(0, 1).all()
    assert {len(e) for e in rows["embedding"]} == {1280}  # efficientnet_lite0's pooled features
    assert store.exists(rows["image_key"].iloc[0])  # log_raw_images is on in this module
    assert set(rows["model_version"]) == {champion["version"]}
    features = serving_side_features(rows, None, champion["version"]).features
    assert len(features) == len(rows) and "brightness" in features.columns


def test_drift_cli_reads_the_serving_log_against_the_champion(
    client, serve_settings, store, smears, monkeypatch, capsys
) -> None:

    from pipelines.cli import main
    from pipelines.core.settings import get_settings
    from pipelines.monitor.inputs import serving_rows

    window = f"{datetime.now(UTC):%Y-%m-%d}..{datetime.now(UTC):%Y-%m-%d}"
    for i in range(24):  # drift needs at least 20 requests on the current side
        assert _predict(client, serve_settings, *smears[i % 4]).status_code == 200
    deadline = time.monotonic() + 20
    while len(serving_rows(store, TASK, window)) < 24 and time.monotonic() < deadline:
        time.sleep(0.5)
    monkeypatch.setenv("LEUKOPS_REGISTERED_MODEL_PREFIX", serve_settings.registered_model_prefix)
    get_settings.cache_clear()
    try:
        code = main(["drift", "--task", TASK, "--current", f"serving:{window}", "--no-mlflow", "--json"])
    finally:
        get_settings.cache_clear()
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["report_html"].startswith("s3://") and out["embedding_drift"] is not None
    assert not any("embedding" in note for note in out["notes"]), out["notes"]


def test_moving_champion_is_picked_up_without_restart(client, serve_settings, champion, smears) -> None:
    registry: Registry = champion["registry"]
    new_version = _log_untrained_version(serve_settings, registry)
    registry.move_aliases(TASK, [("champion", new_version), ("previous", champion["version"])], AUDIT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and client.get("/readyz").json()["version"] != new_version:
        time.sleep(0.25)
    response = _predict(client, serve_settings, *smears[1])
    assert response.json()["model"]["version"] == new_version
    info = client.get("/v1/model", headers=_auth(serve_settings)).json()
    assert info["version"] == new_version and info["preprocessing"]["input_size"] == [3, 64, 64]
    assert client.get("/readyz").json()["reloads"] == 2
    assert client.get("/metrics").status_code == 401  # metrics need a token
    assert f"leukops_model_version {float(new_version)}" in client.get("/metrics", headers=_auth(serve_settings)).text
