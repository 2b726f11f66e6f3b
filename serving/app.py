"""The leukops serving app: ``create_app()`` wires settings, the model holder and the routers.

Settings are read once per app; the model is loaded once in the lifespan (then hot-reloaded by the
holder's poller); the request log is flushed at shutdown. CORS is off unless ``LEUKOPS_CORS_ORIGINS``
lists origins. Run with ``leukops serve`` or ``uvicorn --factory serving.app:create_app``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse

from pipelines.trust.localization import LocalizationInputError
from pipelines.model.preprocess import PreprocessError
from pipelines.trust.segmentation import SegmentationError
from pipelines.core.settings import Settings, get_settings
from pipelines.core.taxonomy import get_task
from serving.deps import Services
from serving.metrics import MetricsMiddleware, ServingMetrics
from serving.model import BatchPredictor, ModelHolder, ModelSource, ModelUnavailableError, RegistrySource
from serving.requestlog import RequestLog
from serving.routes import probes, v1


def _request_log(settings: Settings) -> RequestLog:
    from pipelines.io.storage import ObjectStore

    return RequestLog(
        ObjectStore.from_settings(settings),
        flush_rows=settings.request_log_flush_rows,
        flush_s=settings.request_log_flush_s,
        keep_images=settings.log_raw_images,
    )


def create_app(
    settings: Settings | None = None,
    model_source: ModelSource | None = None,
    log_requests: bool = True,
) -> FastAPI:
    """The ASGI app. ``model_source`` defaults to ``@champion`` of ``settings.serve_task`` in the registry;
    ``log_requests=False`` turns the S3 request log off (a model served without a data bucket)."""
    settings = settings or get_settings()
    get_task(settings.serve_task)  # an unknown task fails at start-up, not at the first request
    source = model_source or RegistrySource(settings)
    metrics = ServingMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        holder = ModelHolder(source, settings.reload_interval_s)
        log = _request_log(settings) if log_requests else None
        predictor = BatchPredictor(settings.serve_max_batch, settings.serve_batch_wait_ms,
                                   with_embeddings=settings.log_embeddings and log is not None)
        holder.start()
        metrics.bind(lambda: holder.current and holder.current.version.version,
                     lambda: holder.status.reloads, lambda: log.dropped if log else 0)
        app.state.services = Services(settings, holder, predictor, log, metrics)
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
    )
    app.state.metrics = metrics
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_exception_handler(ModelUnavailableError, _unavailable)
    for image_error in (PreprocessError, SegmentationError, LocalizationInputError):
        app.add_exception_handler(image_error, _unprocessable)
    app.include_router(probes)
    app.include_router(v1)
    return app


async def _unavailable(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": "5"})


async def _unprocessable(request: Request, exc: Exception) -> JSONResponse:
    """An image that decodes but that preprocessing or the explanation cannot use: the client's input."""
    return JSONResponse({"detail": str(exc)}, status_code=422)

