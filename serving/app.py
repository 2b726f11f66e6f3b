"""The leukops serving app: ``create_app()`` wires settings, the model holder and the routers.

Settings are read once per app; the model is loaded once in the lifespan (then hot-reloaded by the
holder's poller); the request log is flushed at shutdown. CORS is off unless
``LEUKOPS_SERVING__CORS_ORIGINS`` lists origins. The API docs and /metrics need a token (see
``serving.deps``). Run with ``leukops serve`` (which refuses a non-loopback bind in the dev profile) or
``uvicorn --factory serving.app:create_app`` (which cannot know its bind address: don't expose dev).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse

from pipelines.core.settings import Settings, get_settings
from pipelines.core.taxonomy import get_task
from pipelines.model.preprocess import PreprocessError
from pipelines.model.segmentation import SegmentationError
from pipelines.trust.localization import LocalizationInputError
from serving.deps import TOKEN_SETTING, Services
from serving.limits import Admission
from serving.metrics import MetricsMiddleware, ServingMetrics
from serving.model import BatchPredictor, ChampionSource, ModelHolder, ModelSource, ModelUnavailableError
from serving.requestlog import RequestLog
from serving.routes import operations, probes, v1

log = logging.getLogger(__name__)


def check_startup(settings: Settings) -> None:
    """Refuse to start without what every request needs: a known task, the API token (named if missing)
    and, outside dev/test, real secrets only."""
    get_task(settings.serving.task)
    settings.check_secrets()  # every weak secret named at once
    settings.secret(TOKEN_SETTING)


def _request_log(settings: Settings) -> RequestLog:
    from pipelines.io.storage import ObjectStore

    return RequestLog(
        ObjectStore.for_role(settings, "serving"),  # may write only serving/ keys: never raw data or reports
        flush_rows=settings.serving.request_log_flush_rows,
        flush_s=settings.serving.request_log_flush_s,
        keep_images=settings.serving.log_raw_images,
    )


def create_app(
    settings: Settings | None = None,
    model_source: ModelSource | None = None,
    log_requests: bool = True,
) -> FastAPI:
    """The ASGI app. ``model_source`` defaults to ``@champion`` of ``settings.serving.task`` in the registry;
    ``log_requests=False`` turns the S3 request log off (a model served without a data bucket)."""
    settings = settings or get_settings()
    check_startup(settings)  # a missing token or unknown task fails here, not at the first request
    serving = settings.serving
    source = model_source or ChampionSource(settings)
    metrics = ServingMetrics(per_class=serving.metrics_per_class)
    admission = Admission.from_settings(serving)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        holder = ModelHolder(
            source, serving.reload_interval_s, on_refusal=lambda reason: metrics.model_refusals.labels(reason).inc()
        )
        log = _request_log(settings) if log_requests else None
        predictor = BatchPredictor(
            serving.max_batch, serving.batch_wait_ms, with_embeddings=serving.log_embeddings and log is not None
        )
        holder.start()
        metrics.bind(
            lambda: holder.current and holder.current.version.version,
            lambda: holder.status.reloads,
            lambda: log.dropped if log else 0,
        )
        app.state.services = Services(settings, holder, predictor, log, metrics, admission)
        try:
            yield
        finally:
            holder.stop()
            predictor.stop()
            if log is not None:
                log.close()

    app = FastAPI(
        title="leukops serving",
        summary=f"blood-smear classification by the @champion of {source.name}",
        version="1",
        lifespan=lifespan,
        docs_url=None,  # served by routes.operations, behind a token
        redoc_url=None,
        openapi_url=None,
    )
    app.state.metrics = metrics
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    if serving.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=serving.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    app.add_exception_handler(ModelUnavailableError, _unavailable)
    for image_error in (PreprocessError, SegmentationError, LocalizationInputError):
        app.add_exception_handler(image_error, _unprocessable)
    app.include_router(probes)
    app.include_router(operations)
    app.include_router(v1)
    return app


async def _unavailable(request: Request, exc: Exception) -> JSONResponse:
    log.warning("answering 503: %s", exc)  # the reason may name hosts and keys: the log, not the client
    detail = "no version of the model is loaded (yet); GET /readyz for the serving state"
    return JSONResponse({"detail": detail}, status_code=503, headers={"Retry-After": "5"})


async def _unprocessable(request: Request, exc: Exception) -> JSONResponse:
    """An image that decodes but that preprocessing or the explanation cannot use: the client's input."""
    return JSONResponse({"detail": str(exc)}, status_code=422)
