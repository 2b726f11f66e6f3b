"""Serving app on a real tiny timm model (custom_cnn, 64 px) built through the backbone factory.

The model source here is an in-memory registry of real ``LoadedModel`` versions with a movable alias (the
registry-backed source is exercised against the real MLflow server in tests/integration/test_serving.py).
Requests go through the real ASGI app with Starlette's TestClient (lifespan included).
"""

from __future__ import annotations

import base64
import io
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from pydantic import SecretStr

from pipelines.core.settings import ServingSettings, Settings, SettingsError
from pipelines.core.taxonomy import get_task
from pipelines.data.imagefacts import FACT_COLUMNS
from pipelines.io.layout import request_log_part_key
from pipelines.model.backbones import create_backbone
from pipelines.model.bundle import LoadedModel, ModelBundle
from pipelines.model.preprocess import preprocessing_from
from pipelines.trust.attestation import UNATTESTED
from serving.app import create_app
from serving.explain import heatmap_on_input, roi_box
from serving.model import BatchPredictor, ModelHolder, ModelVersion, ServedModel, forward
from serving.requestlog import CONTRACT_COLUMNS, LoggedRequest, rows_by_date, to_row

TASK = "all_subtypes"
TOKEN = "unit-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def tiny_model(seed: int, size: int = 64) -> LoadedModel:
    torch.manual_seed(seed)
    classes = get_task(TASK).classes
    backbone = create_backbone("custom_cnn", len(classes), pretrained=False, image_size=size)
    preprocessing = preprocessing_from(backbone.data_config, mask_corner=True)
    bundle = ModelBundle.for_backbone(TASK, classes, backbone, preprocessing)
    backbone.model.eval()
    return LoadedModel(backbone, bundle, f"run-{seed}")


class AliasSource:
    """Versions held in memory and one alias that tests move (``broken`` versions fail to load)."""

    name = f"leukops-{TASK}"
    task = TASK

    def __init__(self) -> None:
        self.models: dict[str, LoadedModel] = {}
        self.broken: set[str] = set()
        self.alias: str | None = None
        self.loads = 0

    def resolve(self) -> str:
        if self.alias is None:
            raise LookupError(f"{self.name} has no @champion")
        return self.alias

    def describe(self, version: str) -> ModelVersion:
        tags = {"gate.passed": "true", "gate.macro_f1": "0.91", "dataset_version": "ds1"}
        aliases = ("champion",) if version == self.alias else ()
        return ModelVersion(self.name, version, aliases, tags, f"run-{version}")

    def load(self, version: str) -> LoadedModel:
        self.loads += 1
        if version in self.broken:
            raise RuntimeError(f"weights of version {version} are unreadable")
        return self.models[version]

    def attestation(self, version: str) -> dict:
        return dict(UNATTESTED)  # the registry source's verification is tested in tests/*/trust/test_attestation.py


@pytest.fixture(scope="module")
def source() -> AliasSource:
    src = AliasSource()
    src.models = {"1": tiny_model(1), "2": tiny_model(2), "3": tiny_model(3)}
    src.alias = "1"
    return src


def with_serving(settings: Settings, **changes) -> Settings:
    return settings.model_copy(update={"serving": settings.serving.model_copy(update=changes)})


@pytest.fixture(scope="module")
def unit_settings() -> Settings:
    serving = ServingSettings(
        token=TOKEN, task=TASK, max_upload_mb=0.5, max_pixels=2_000_000, reload_interval_s=3600, batch_wait_ms=20
    )
    return Settings(profile="test", s3_access_key="k", s3_secret_key="s", serving=serving, _env_file=None)


@pytest.fixture(scope="module")
def client(unit_settings, source):
    with TestClient(create_app(unit_settings, source, log_requests=False)) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def smear(shared_data: Path) -> tuple[str, bytes]:
    path = sorted((shared_data / "all_taleqani" / "Pre").iterdir())[0]
    return path.name, path.read_bytes()


def _post(client: TestClient, name: str, data: bytes, query: str = "", headers=AUTH):
    return client.post(f"/v1/predict{query}", files={"file": (name, data, "image/jpeg")}, headers=headers)


def _png(rgb: np.ndarray) -> bytes:
    return cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes()


def _jpeg(rgb: np.ndarray) -> bytes:
    return cv2.imencode(".jpg", rgb)[1].tobytes()


def test_predict_returns_a_distribution_over_the_task_classes(client, smear, source) -> None:
    response = _post(client, *smear)
    assert response.status_code == 200, response.text
    body = response.json()
    probabilities = body["probabilities"]
    assert list(probabilities) == list(get_task(TASK).classes)
    assert all(0.0 <= p <= 1.0 for p in probabilities.values())
    assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    assert body["predicted_class"] == max(probabilities, key=probabilities.get)
    assert body["confidence"] == pytest.approx(max(probabilities.values()))
    assert body["model"] == {"name": f"leukops-{TASK}", "version": "1", "task": TASK, "run_id": "run-1"}
    assert body["latency_ms"] > 0 and body["explanation"] is None


def test_served_probabilities_equal_the_loaded_models_own(client, smear, source) -> None:
    rgb = np.asarray(Image.open(io.BytesIO(smear[1])).convert("RGB"))
    expected = source.models["1"].predict_proba([rgb])[0]
    served = np.array(list(_post(client, *smear).json()["probabilities"].values()))
    np.testing.assert_allclose(served, expected, atol=1e-5)


def test_explain_returns_a_png_overlay_of_the_input_size_and_localization(client, smear) -> None:
    response = _post(client, *smear, query="?explain=gradcam")
    assert response.status_code == 200, response.text
    explanation = response.json()["explanation"]
    overlay = Image.open(io.BytesIO(base64.b64decode(explanation["overlay_png_base64"])))
    assert overlay.format == "PNG" and overlay.size == (224, 224)
    assert (explanation["width"], explanation["height"]) == (224, 224)
    figures = explanation["localization"]
    for key in ("nucleus_mass", "nucleus_area_share", "nucleus_enrichment", "corner_mass", "artefact_mass"):
        assert 0.0 <= figures[key] <= (50.0 if key.endswith("enrichment") else 1.0), key
    assert explanation["target_class"] == response.json()["predicted_class"]


def test_missing_or_wrong_token_is_refused_with_401(client, smear) -> None:
    no_token = _post(client, *smear, headers={})
    assert no_token.status_code == 401 and no_token.headers["www-authenticate"] == "Bearer"
    assert _post(client, *smear, headers={"Authorization": "Bearer nope"}).status_code == 401
    assert client.get("/v1/model").status_code == 401


@pytest.mark.parametrize(
    ("name", "payload", "status", "words"),
    [
        ("empty.jpg", b"", 400, "empty"),
        ("notes.txt", b"this is not an image, it is a note", 415, "not_an_image"),
        ("corrupt.jpg", _jpeg(np.full((64, 64, 3), 90, np.uint8))[:200] + b"\x13" * 2000, 422, "decoded"),
        ("huge.png", _png(np.zeros((1500, 1500, 3), np.uint8)), 413, "too_many_pixels"),
        ("sliver.png", _png(np.full((1, 300, 3), 200, np.uint8)), 422, "outside 64..8192 px"),
        ("tiny.png", _png(np.full((32, 32, 3), 200, np.uint8)), 422, "32x32 px is outside"),  # ingest refuses it too
    ],
)
def test_bad_images_get_a_4xx_naming_the_reason(client, name, payload, status, words) -> None:
    response = _post(client, name, payload)
    assert response.status_code == status, response.text
    assert words in response.json()["detail"] and name in response.json()["detail"]


def test_truncated_jpeg_and_oversize_upload_and_missing_field_are_4xx(client, smear) -> None:
    truncated = _post(client, "cut.jpg", smear[1][: len(smear[1]) // 2])
    assert truncated.status_code == 422 and "truncated" in truncated.json()["detail"]
    noise = np.random.default_rng(0).integers(0, 255, (700, 700, 3), dtype=np.uint8)
    too_big = _post(client, "big.png", _png(noise))  # ~1.4 MB > the 0.5 MB cap
    assert too_big.status_code == 413 and "limit" in too_big.json()["detail"]
    wrong_field = client.post("/v1/predict", files={"image": ("a.jpg", smear[1])}, headers=AUTH)
    assert wrong_field.status_code == 422 and "'file'" in wrong_field.json()["detail"]
    raw_headers = {**AUTH, "Content-Type": "image/jpeg"}
    not_multipart = client.post("/v1/predict", content=smear[1], headers=raw_headers)
    assert not_multipart.status_code == 415


def test_model_endpoint_reports_version_aliases_preprocessing_and_gate(client, source) -> None:
    body = client.get("/v1/model", headers=AUTH).json()
    assert body["version"] == "1" and body["aliases"] == ["champion"] and body["task"] == TASK
    assert body["classes"] == list(get_task(TASK).classes)
    assert body["preprocessing"] == source.models["1"].preprocessing
    assert body["preprocessing"]["mask_corner"] is True
    assert body["gate"] == {"passed": "true", "macro_f1": "0.91"}


def test_probes_metrics_and_openapi(client, smear) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    _post(client, "empty.jpg", b"")
    text = client.get("/metrics", headers=AUTH).text
    assert 'leukops_requests_total{method="POST",route="/v1/predict",status="200"}' in text
    assert 'leukops_request_errors_total{method="POST",route="/v1/predict",status="400"}' in text
    assert 'leukops_request_latency_seconds_bucket{le="0.5",method="POST",route="/v1/predict"}' in text
    assert "leukops_model_version 1.0" in text
    assert "leukops_predictions_total " in text and "predicted_class" not in text  # per class: off by default
    schema = client.get("/openapi.json", headers=AUTH).json()
    assert "multipart/form-data" in schema["paths"]["/v1/predict"]["post"]["requestBody"]["content"]


def test_moving_the_alias_hot_reloads_and_a_broken_version_keeps_the_old_model(unit_settings, smear) -> None:
    src = AliasSource()
    src.models = {"1": tiny_model(1), "2": tiny_model(2), "3": tiny_model(3)}
    src.alias = "1"
    src.broken = {"3"}
    app = create_app(unit_settings, src, log_requests=False)
    with TestClient(app) as client:
        holder: ModelHolder = app.state.services.holder
        in_flight = holder.require()  # a request that started on version 1
        src.alias = "2"
        assert holder.check_for_update() is True
        assert _post(client, *smear).json()["model"]["version"] == "2"
        rgb = np.asarray(Image.open(io.BytesIO(smear[1])).convert("RGB"))
        old_proba, _ = forward(in_flight, in_flight.model.batch([rgb]), with_embeddings=False)
        np.testing.assert_allclose(old_proba[0], src.models["1"].predict_proba([rgb])[0], atol=1e-5)
        src.alias = "3"
        assert holder.check_for_update() is False
        ready = client.get("/readyz").json()
        assert ready["version"] == "2" and ready["failed_version"] == "3"
        assert ready["reload"] == "failed" and "unreadable" not in str(ready)  # state only; the log has why
        assert _post(client, *smear).json()["model"]["version"] == "2"
        loads = src.loads
        holder.check_for_update()
        assert src.loads == loads  # a version that failed is not retried until the alias moves again
        src.alias = "1"
        holder.check_for_update()
        assert client.get("/readyz").json()["reload"] == "ok"


def test_poller_picks_up_a_new_champion_without_restart(unit_settings, smear) -> None:
    src = AliasSource()
    src.models = {"1": tiny_model(1), "2": tiny_model(2)}
    src.alias = "1"
    fast_polling = with_serving(unit_settings, reload_interval_s=0.05)
    with TestClient(create_app(fast_polling, src, log_requests=False)) as client:
        src.alias = "2"
        for _ in range(100):
            if client.get("/readyz").json()["version"] == "2":
                break
            threading.Event().wait(0.05)
        assert _post(client, *smear).json()["model"]["version"] == "2"


def test_serving_refuses_to_start_without_its_token_naming_the_variable(unit_settings, source) -> None:
    real_keys = {"s3_access_key": SecretStr("AKIAIOSFODNN7EXAMPLE"), "s3_secret_key": SecretStr("s" * 40)}
    no_token = with_serving(unit_settings, token=None).model_copy(update={"profile": "prod", **real_keys})
    with pytest.raises(SettingsError, match="LEUKOPS_SERVING__TOKEN"):
        create_app(no_token, source, log_requests=False)


def test_no_champion_means_not_ready_and_503(unit_settings, smear) -> None:
    src = AliasSource()
    with TestClient(create_app(unit_settings, src, log_requests=False)) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["reload"] == "failed"
        response = _post(client, *smear)
        assert response.status_code == 503 and "no version" in response.json()["detail"]
        assert client.get("/healthz").status_code == 200


def test_micro_batches_match_single_image_predictions(source, shared_data) -> None:
    model = source.models["1"]
    served = ServedModel(ModelVersion("m", "1"), model, 0.0)
    files = sorted((shared_data / "all_taleqani" / "Early").iterdir())[:6]
    images = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    predictor = BatchPredictor(max_batch=8, wait_ms=200, with_embeddings=True)
    try:
        futures = [predictor.submit(served, model.batch([rgb])[0]) for rgb in images]
        results = [f.result(timeout=30) for f in futures]
    finally:
        predictor.stop()
    assert max(r.batch_size for r in results) > 1
    np.testing.assert_allclose(np.stack([r.proba for r in results]), model.predict_proba(images), atol=1e-5)
    np.testing.assert_allclose(np.stack([r.embedding for r in results]), model.embed(images), atol=1e-4)


def test_cors_is_off_by_default_and_on_for_listed_origins(unit_settings, source) -> None:
    preflight = {"Origin": "https://lab.example", "Access-Control-Request-Method": "POST"}
    with TestClient(create_app(unit_settings, source, log_requests=False)) as client:
        assert "access-control-allow-origin" not in client.options("/v1/predict", headers=preflight).headers
    allowed = with_serving(unit_settings, cors_origins=["https://lab.example"])
    with TestClient(create_app(allowed, source, log_requests=False)) as client:
        response = client.options("/v1/predict", headers=preflight)
        assert response.headers["access-control-allow-origin"] == "https://lab.example"


def test_heatmap_maps_back_onto_the_roi_of_a_bordered_image() -> None:
    rgb = np.zeros((100, 160, 3), np.uint8)
    rgb[10:90, 30:150] = 180  # field of view inside a black border
    preprocessing = {"roi_crop": True, "roi_threshold": 20}
    assert roi_box(rgb, preprocessing) == (10, 30, 80, 120)
    heat = heatmap_on_input(np.ones((64, 64), np.float32), rgb, preprocessing)
    assert heat.shape == (100, 160) and heat[:10].sum() == 0 and heat[:, :30].sum() == 0
    assert np.all(heat[10:90, 30:150] == pytest.approx(1.0))
    assert roi_box(rgb, {"roi_crop": False}) == (0, 0, 100, 160)


def test_heatmap_maps_back_onto_the_cell_square_of_a_cell_cropped_model() -> None:
    rgb = np.full((120, 200, 3), 235, np.uint8)
    cv2.circle(rgb, (20, 60), 10, (90, 40, 150), -1)  # a purple nucleus near the left edge
    preprocessing = {"roi_crop": True, "roi_threshold": 20, "cell_crop": 3.0}
    y, x, h, w = roi_box(rgb, preprocessing)
    assert h == w and x < 0 < x + w and y < 60 < y + h  # a square around the nucleus, past the left edge
    heat = heatmap_on_input(np.ones((64, 64), np.float32), rgb, preprocessing)
    assert heat.shape == (120, 200) and heat[60, 20] == pytest.approx(1.0)
    assert heat[:, x + w :].sum() == 0 and heat[: max(0, y)].sum() == 0  # nothing outside the square
    assert np.all(heat[max(0, y) : y + h, : x + w] == pytest.approx(1.0))


def test_request_log_rows_follow_the_drift_contract() -> None:
    from datetime import UTC, datetime, timedelta

    rgb = np.random.default_rng(1).integers(0, 255, (32, 48, 3), dtype=np.uint8)
    day = datetime(2026, 3, 1, 23, 59, 59, tzinfo=UTC)
    items = [
        LoggedRequest(f"r{i}", day + timedelta(seconds=i), TASK, "7", "Pre", 0.8, rgb, 3, np.arange(4.0))
        for i in range(3)
    ]
    rows = [to_row(item, None) for item in items]
    assert set(CONTRACT_COLUMNS) | {"embedding"} == set(rows[0])
    assert rows[0]["ts"] == "2026-03-01T23:59:59+00:00" and rows[0]["embedding"] == [0.0, 1.0, 2.0, 3.0]
    assert rows[0]["width"] == 48.0 and set(FACT_COLUMNS) <= set(rows[0])
    parts = rows_by_date(rows)
    assert list(parts) == ["2026-03-01", "2026-03-02"] and len(parts["2026-03-02"]) == 2
    assert request_log_part_key("2026-03-02", "abc") == "serving/requests/date=2026-03-02/part-abc.parquet"


def test_greyscale_and_rgba_uploads_are_converted_with_a_note(client, smear) -> None:
    grey = cv2.imencode(".png", np.full((96, 96), 120, np.uint8))[1].tobytes()
    rgba = cv2.imencode(".png", np.full((96, 96, 4), 120, np.uint8))[1].tobytes()
    assert _post(client, "grey.png", grey).json()["notes"] == ["converted from greyscale (1 channel) to RGB"]
    assert _post(client, "rgba.png", rgba).json()["notes"] == ["converted from RGBA (4 channels) to RGB"]
    assert _post(client, *smear).json()["notes"] == []
