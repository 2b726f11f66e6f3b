"""HTTP routes: thin wiring from a request to the model holder, the predictor and the request log."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from serving.deps import UPLOAD_FIELD, Services, ServicesDep, Upload, UploadDep, require_token
from serving.explain import explain_image
from serving.model import Prediction
from serving.requestlog import LoggedRequest

probes = APIRouter(tags=["operations"])
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


@probes.get("/healthz", summary="liveness: the process answers")
def healthz() -> dict:
    return {"status": "ok"}


@probes.get("/readyz", summary="readiness: a model is loaded; reload errors in the details")
def readyz(services: ServicesDep) -> JSONResponse:
    details = services.holder.readiness()
    log = services.request_log
    details["request_log"] = (
        None
        if log is None
        else {
            "written_rows": log.written_rows,
            "failed_rows": log.failed_rows,
            "dropped_rows": log.dropped,
        }
    )
    return JSONResponse(details, status_code=200 if details["ready"] else 503)


@probes.get("/metrics", summary="Prometheus metrics", response_class=Response)
def metrics(request: Request) -> Response:
    serving_metrics = request.app.state.metrics
    return Response(serving_metrics.render(), media_type=serving_metrics.content_type)


@v1.post(
    "/predict",
    response_model=PredictResponse,
    openapi_extra=MULTIPART_IMAGE_BODY,
    summary="classify one smear image; ?explain=gradcam adds a heatmap overlay and localization",
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
    services.metrics.predictions.labels(classes[best]).inc()
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


@v1.get("/model", summary="the served version: aliases, task, classes, preprocessing, gate summary")
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
        "loaded_at": datetime.fromtimestamp(served.loaded_at, UTC).isoformat(),
    }
