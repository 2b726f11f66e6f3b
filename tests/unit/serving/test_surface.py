"""The serving surface: what answers without a token, what needs one, and the 429s of admission control.

Same real app and tiny real models as test_serving.py, through Starlette's TestClient.
"""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from pipelines.core.settings import ServingSettings, Settings
from serving.app import create_app
from serving.limits import InFlightCap, TokenBucket, retry_after
from tests.unit.serving.test_serving import AUTH, TASK, TOKEN, AliasSource, tiny_model

METRICS_TOKEN = "unit-metrics-token"
OPERATIONS = ("/metrics", "/docs", "/redoc", "/openapi.json")


def _settings(**serving) -> Settings:
    defaults = {"token": TOKEN, "task": TASK, "max_upload_mb": 0.5, "reload_interval_s": 3600, "batch_wait_ms": 1}
    return Settings(
        profile="test",
        s3_access_key="k",
        s3_secret_key="s",
        serving=ServingSettings(**(defaults | serving)),
        _env_file=None,
    )


@pytest.fixture(scope="module")
def source() -> AliasSource:
    src = AliasSource()
    src.models = {"1": tiny_model(1)}
    src.alias = "1"
    return src


@pytest.fixture(scope="module")
def smear(shared_data: Path) -> tuple[str, bytes]:
    path = sorted((shared_data / "all_taleqani" / "Pre").iterdir())[0]
    return path.name, path.read_bytes()


@pytest.fixture(scope="module")
def app(source):
    return create_app(_settings(metrics_token=METRICS_TOKEN), source, log_requests=False)


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app) as test_client:
        yield test_client


def _basic(password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"anyone:{password}".encode()).decode()}


def _predict(client: TestClient, data: bytes, headers=AUTH):
    return client.post("/v1/predict", files={"file": ("smear.jpg", data, "image/jpeg")}, headers=headers)


@pytest.mark.parametrize("path", OPERATIONS)
def test_operations_routes_need_a_token(client, path) -> None:
    anonymous = client.get(path)
    assert anonymous.status_code == 401 and anonymous.headers["www-authenticate"].startswith("Basic realm=")
    assert "LEUKOPS_SERVING__METRICS_TOKEN" in anonymous.json()["detail"]
    assert client.get(path, headers={"Authorization": "Bearer wrong-token"}).status_code == 401
    assert client.get(path, headers=_basic("wrong-token")).status_code == 401
    for headers in (AUTH, {"Authorization": f"Bearer {METRICS_TOKEN}"}, _basic(TOKEN), _basic(METRICS_TOKEN)):
        assert client.get(path, headers=headers).status_code == 200, (path, headers)


def test_the_docs_page_loads_its_schema_from_the_guarded_route(client) -> None:
    page = client.get("/docs", headers=AUTH).text
    assert "swagger-ui" in page and "'/openapi.json'" in page
    assert "/v1/predict" in client.get("/openapi.json", headers=_basic(METRICS_TOKEN)).json()["paths"]


def test_the_metrics_token_opens_no_inference_route(client, smear) -> None:
    scraper = {"Authorization": f"Bearer {METRICS_TOKEN}"}
    assert client.get("/v1/model", headers=scraper).status_code == 401
    assert _predict(client, smear[1], headers=scraper).status_code == 401


def test_probes_answer_anyone_with_state_only(client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["ready"] is True and ready["reload"] == "ok" and "reload_error" not in ready
    assert set(ready) == {
        "ready",
        "model",
        "version",
        "loaded_at",
        "last_check",
        "reloads",
        "failed_version",
        "reload",
        "request_log",
    }


def test_no_model_503_names_no_internals(source) -> None:
    src = AliasSource()  # no @champion: the holder's reason names the registry
    with TestClient(create_app(_settings(), src, log_requests=False)) as client:
        response = client.get("/v1/model", headers=AUTH)
        assert response.status_code == 503 and "@champion" not in response.text
        assert "/readyz" in response.json()["detail"]


def test_per_class_counters_only_when_enabled(source, smear) -> None:
    with TestClient(create_app(_settings(metrics_per_class=True), source, log_requests=False)) as client:
        predicted = _predict(client, smear[1]).json()["predicted_class"]
        text = client.get("/metrics", headers=AUTH).text
        assert f'leukops_predictions_total{{predicted_class="{predicted}"}} 1.0' in text


def test_a_full_in_flight_cap_answers_429_before_reading_the_upload(app, client, smear) -> None:
    cap = app.state.services.admission.predictions
    too_big = b"\xff" * (2 * 1024 * 1024)  # past the 0.5 MB cap: 413 if the body were read
    assert _predict(client, too_big).status_code == 413
    held = [cap.try_enter() for _ in range(cap.limit)]  # every slot taken by predictions in flight
    try:
        assert all(held)
        refused = _predict(client, too_big)
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        assert "LEUKOPS_SERVING__MAX_IN_FLIGHT" in refused.json()["detail"]
        assert client.get("/v1/model", headers=AUTH).status_code == 200  # only predictions take slots
    finally:
        for _ in held:
            cap.leave()
    assert _predict(client, smear[1]).status_code == 200
    assert _predict(client, b"").status_code == 400
    assert cap.in_flight == 0  # a success and an error both gave their slot back


def test_the_token_rate_limit_answers_429_with_retry_after(source) -> None:
    limited = _settings(rate_limit_per_s=0.01, rate_limit_burst=2)
    with TestClient(create_app(limited, source, log_requests=False)) as client:
        assert [client.get("/v1/model", headers=AUTH).status_code for _ in range(2)] == [200, 200]
        refused = client.get("/v1/model", headers=AUTH)
        assert refused.status_code == 429 and 90 <= int(refused.headers["retry-after"]) <= 100
        assert client.get("/v1/model").status_code == 401  # anonymous calls are refused, not rate-counted
        assert client.get("/metrics", headers=AUTH).status_code == 200  # operations routes are not limited


def test_token_bucket_refills_at_its_rate() -> None:
    now = [0.0]
    bucket = TokenBucket(rate_per_s=2.0, burst=3, clock=lambda: now[0])
    assert [bucket.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take("a") == pytest.approx(0.5)
    assert bucket.take("b") == 0.0  # buckets are per token
    now[0] = 0.5
    assert bucket.take("a") == 0.0 and bucket.take("a") == pytest.approx(0.5)
    now[0] = 100.0
    assert [bucket.take("a") for _ in range(4)][-1] > 0  # refill stops at the burst size
    assert TokenBucket(rate_per_s=0, burst=0).take("a") == 0.0  # rate 0: no limit
    assert retry_after(0.01) == "1" and retry_after(2.2) == "3"


def test_in_flight_cap_counts_holders() -> None:
    cap = InFlightCap(2)
    assert [cap.try_enter() for _ in range(3)] == [True, True, False]
    cap.leave()
    assert cap.try_enter() and cap.in_flight == 2
