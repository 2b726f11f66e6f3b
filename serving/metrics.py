"""Prometheus metrics of one app: requests, errors, latency histogram, live model version.

Each app owns its ``CollectorRegistry`` (two apps in one process, as in tests, never collide). Requests
are counted by a pure ASGI middleware keyed by the route *template* (``/v1/predict``), never the raw
path, so label cardinality stays bounded. With ``--workers N`` each worker reports its own series.
Predictions are counted per class only when asked (``serving.metrics_per_class``): at low traffic a
per-class counter that rises by one tells a scraper what one patient's image was classified as.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

KNOWN_METHODS = frozenset({"GET", "POST", "HEAD", "OPTIONS", "PUT", "DELETE", "PATCH"})
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)


class ServingMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, per_class: bool = False) -> None:
        self.registry = CollectorRegistry()
        self.per_class = per_class
        labels = ("method", "route", "status")
        self.requests = Counter("leukops_requests", "HTTP requests", labels, registry=self.registry)
        self.errors = Counter(
            "leukops_request_errors", "HTTP requests answered 4xx/5xx", labels, registry=self.registry
        )
        self.latency = Histogram(
            "leukops_request_latency_seconds",
            "request latency",
            ("method", "route"),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.predictions = Counter(
            "leukops_predictions",
            "predictions by class" if per_class else "predictions",
            ("predicted_class",) if per_class else (),
            registry=self.registry,
        )
        self.model_version = Gauge(
            "leukops_model_version", "served registry version (NaN: none)", registry=self.registry
        )
        self.model_reloads = Gauge("leukops_model_reloads", "model versions loaded since start", registry=self.registry)
        self.model_refusals = Counter(
            "leukops_model_refusals",
            "model versions refused before loading: not attested (reason: pipelines.trust.attestation)",
            ("reason",),
            registry=self.registry,
        )
        self.request_log_dropped = Gauge(
            "leukops_request_log_dropped", "request-log rows dropped", registry=self.registry
        )

    def bind(self, version: Callable[[], str | None], reloads: Callable[[], int], dropped: Callable[[], int]) -> None:
        """Read the model version, reload count and dropped log rows at scrape time."""
        self.model_version.set_function(lambda: _as_number(version()))
        self.model_reloads.set_function(lambda: float(reloads()))
        self.request_log_dropped.set_function(lambda: float(dropped()))

    def count_prediction(self, predicted_class: str) -> None:
        (self.predictions.labels(predicted_class) if self.per_class else self.predictions).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _as_number(version: str | None) -> float:
    try:
        return float(version) if version is not None else math.nan
    except ValueError:
        return math.nan


class MetricsMiddleware:
    """Counts every HTTP request by method, route template and status, and times it."""

    def __init__(self, app: ASGIApp, metrics: ServingMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        started = time.perf_counter()

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            method = scope["method"] if scope["method"] in KNOWN_METHODS else "OTHER"  # bounded label values
            self.metrics.latency.labels(method, route).observe(time.perf_counter() - started)
            self.metrics.requests.labels(method, route, str(status)).inc()
            if status >= 400:
                self.metrics.errors.labels(method, route, str(status)).inc()
