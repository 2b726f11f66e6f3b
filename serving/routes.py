"""HTTP routes: thin wiring from a request to the model holder, the predictor and the request log.

Probes (/healthz, /readyz) answer anyone, so they give state only: a reload's error text goes to the
log, never into a response. /metrics and the API docs need a token (``require_operator``).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field

from serving.deps import (
    UPLOAD_FIELD,
    Services,
    ServicesDep,
    Upload,
    UploadDep,
    prediction_slot,
    require_operator,
    require_token,
)
from serving.explain import explain_image
from serving.model import Prediction
from serving.requestlog import LoggedRequest

probes = APIRouter(tags=["operations"])
operations = APIRouter(tags=["operations"], dependencies=[Depends(require_operator)])
v1 = APIRouter(prefix="/v1", tags=["inference"], dependencies=[Depends(require_token)])

MULTIPART_IMAGE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": [UPLOAD_FIELD],
                    "properties": {UPLOAD_FIELD: {"type": "string", "format": "binary"}},
                }
            }
        },
    }
}


class ModelRef(BaseModel):
    name: str
    version: str
    task: str
    run_id: str | None


class Explanation(BaseModel):
    method: Literal["gradcam"]
    target_class: str
    overlay_png_base64: str
    width: int
    height: int
    localization: dict[str, float | bool | None]


class PredictResponse(BaseModel):
    request_id: str
    predicted_class: str
    confidence: float
    probabilities: dict[str, float]
    model: ModelRef
    latency_ms: float = Field(description="preprocessing + inference (+ explanation); upload/decode excluded")
    batch_size: int = Field(description="images in the micro-batch this one was inferred with")
    explanation: Explanation | None = None
    notes: list[str] = Field(default_factory=list, description="what decoding changed, e.g. greyscale to RGB")


@probes.get("/healthz", summary="liveness: the process answers")
def healthz() -> dict:
    return {"status": "ok"}


READINESS_STATE = ("ready", "model", "version", "loaded_at", "last_check", "reloads", "failed_version")


@probes.get("/readyz", summary="readiness: a model is loaded; the last reload's state (ok, failed, refused: ...)")
def readyz(services: ServicesDep) -> JSONResponse:
    details = services.holder.readiness()
    state = {key: details.get(key) for key in READINESS_STATE} | {"reload": reload_state(details)}
    log = services.request_log
    state["request_log"] = (
        None
        if log is None
        else {
            "written_rows": log.written_rows,
            "failed_rows": log.failed_rows,
            "dropped_rows": log.dropped,
        }
    )
    return JSONResponse(state, status_code=200 if state["ready"] else 503)


def reload_state(details: dict) -> str:
    """The holder's own short public state when it gives one (e.g. "refused: not attested"), else
    "failed" or "ok": error text names hosts, buckets and keys (the holder logs it)."""
    return details.get("reload_state") or ("failed" if details.get("reload_error") else "ok")


@operations.get("/metrics", summary="Prometheus metrics", response_class=Response)
def metrics(request: Request) -> Response:
    serving_metrics = request.app.state.metrics
    return Response(serving_metrics.render(), media_type=serving_metrics.content_type)


@operations.get("/openapi.json", include_in_schema=False)
def openapi_schema(request: Request) -> JSONResponse:
    return JSONResponse(request.app.openapi())


@operations.get("/docs", include_in_schema=False)
def swagger_ui(request: Request) -> HTMLResponse:
    return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{request.app.title} - docs")


@operations.get("/redoc", include_in_schema=False)
def redoc(request: Request) -> HTMLResponse:
    return get_redoc_html(openapi_url="/openapi.json", title=f"{request.app.title} - ReDoc")


@v1.post(
    "/predict",
    response_model=PredictResponse,
    openapi_extra=MULTIPART_IMAGE_BODY,
    summary="classify one smear image; ?explain=gradcam adds a heatmap overlay and localization",
    dependencies=[Depends(prediction_slot)],  # taken before the upload is read: 429 instead of memory
)
async def predict(
    upload: UploadDep,
    services: ServicesDep,
    explain: Annotated[Literal["gradcam"] | None, Query(description="add a Grad-CAM explanation")] = None,
) -> PredictResponse:
    started = time.perf_counter()
    served = services.holder.require()  # this request's model, whatever reloads happen meanwhile
    tensor = (await run_in_threadpool(served.model.batch, [upload.image.rgb]))[0]
    prediction: Prediction = await asyncio.wrap_future(services.predictor.submit(served, tensor))
    classes = served.classes
    best = int(prediction.proba.argmax())
    explanation = None
    if explain == "gradcam":
        explanation = Explanation(**await run_in_threadpool(explain_image, served, upload.image.rgb, best))
    request_id = uuid.uuid4().hex
    services.metrics.count_prediction(classes[best])
    _log_request(services, upload, prediction, request_id, classes[best])
    return PredictResponse(
        request_id=request_id,
        predicted_class=classes[best],
        confidence=float(prediction.proba[best]),
        probabilities={c: float(p) for c, p in zip(classes, prediction.proba, strict=True)},
        model=ModelRef(
            name=served.version.name,
            version=served.version.version,
            task=served.model.task,
            run_id=served.version.run_id,
        ),
        latency_ms=round((time.perf_counter() - started) * 1000, 3),
        batch_size=prediction.batch_size,
        notes=upload.image.conversion_notes,
        explanation=explanation,
    )


def _log_request(services: Services, upload: Upload, prediction: Prediction, request_id: str, label: str) -> None:
    if services.request_log is None:
        return
    keep = services.settings.serving.log_raw_images
    services.request_log.record(
        LoggedRequest(
            request_id=request_id,
            ts=datetime.now(UTC),
            task=prediction.served.model.task,
            model_version=prediction.served.version.version,
            predicted_class=label,
            confidence=float(prediction.proba.max()),
            rgb=upload.image.rgb,
            source_channels=upload.image.source_channels,
            embedding=prediction.embedding,
            image_bytes=upload.data if keep else None,
            image_format=upload.image.format if keep else None,
        )
    )


@v1.get("/model", summary="the served version: aliases, task, classes, preprocessing, gate summary, attestation")
def model_info(services: ServicesDep) -> dict:
    served = services.holder.require()
    version = services.holder.describe_current()
    return {
        "name": version.name,
        "version": version.version,
        "aliases": list(version.aliases),
        "run_id": version.run_id,
        "task": served.model.task,
        "classes": list(served.classes),
        "preprocessing": served.model.preprocessing,
        "gate": {k.removeprefix("gate."): v for k, v in version.tags.items() if k.startswith("gate.")},
        "attestation": served.attestation,  # verified when this version was loaded
        "loaded_at": datetime.fromtimestamp(served.loaded_at, UTC).isoformat(),
    }
