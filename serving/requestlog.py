"""The serving request log that drift monitoring reads: one parquet part per flush, partitioned by date.

The contract between serving and drift monitoring: parts at ``layout.request_log_part_key`` (one folder
per UTC day) with columns ``ts`` (ISO-8601 UTC), ``request_id``, ``task``, ``model_version``,
``predicted_class``, ``confidence``, the image facts (``imagefacts.FACT_COLUMNS``, the same function
ingest uses, so the two are comparable) and ``embedding`` (list of floats) when embeddings are logged;
``image_key`` (at ``layout.request_image_key``) when raw images are kept (``serving.log_raw_images``).

Requests never wait for S3: ``record`` only enqueues; a background thread computes the facts and writes
a part every ``flush_rows`` rows or ``flush_s`` seconds, and at shutdown. When the queue holds more than
``max_queued_bytes`` of decoded pixels, new rows are dropped (counted in ``dropped``, exported as a
metric) rather than slowing predictions down or exhausting memory.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import pandas as pd

from pipelines.data.imagefacts import FACT_COLUMNS, image_facts
from pipelines.io.layout import request_image_key, request_log_part_key
from pipelines.io.storage import ObjectStore, sha256_hex

log = logging.getLogger("leukops.serving.requestlog")

CONTRACT_COLUMNS = ("ts", "request_id", "task", "model_version", "predicted_class", "confidence", *FACT_COLUMNS)


@dataclass(frozen=True)
class LoggedRequest:
    request_id: str
    ts: datetime
    task: str
    model_version: str
    predicted_class: str
    confidence: float
    rgb: np.ndarray
    source_channels: int
    embedding: np.ndarray | None = None
    image_bytes: bytes | None = None
    image_format: str | None = None


def to_row(item: LoggedRequest, image_key: str | None) -> dict:
    """The log row of one request: contract columns, facts computed from the decoded pixels."""
    row = {
        "ts": item.ts.astimezone(UTC).isoformat(),
        "request_id": item.request_id,
        "task": item.task,
        "model_version": item.model_version,
        "predicted_class": item.predicted_class,
        "confidence": float(item.confidence),
        **image_facts(item.rgb, item.source_channels),
    }
    if item.embedding is not None:
        row["embedding"] = [float(v) for v in np.ravel(item.embedding)]
    if image_key is not None:
        row["image_key"] = image_key
    return row


def rows_by_date(rows: list[dict]) -> dict[str, pd.DataFrame]:
    """Split rows into one frame per UTC date (the partition), keeping arrival order."""
    frame = pd.DataFrame(rows)
    dates = frame["ts"].str.slice(0, 10)
    return {date: part.reset_index(drop=True) for date, part in frame.groupby(dates, sort=True)}


class RequestLog:
    """Non-blocking, batched writer of request-log parts to one bucket."""

    def __init__(
        self,
        store: ObjectStore,
        *,
        flush_rows: int,
        flush_s: float,
        keep_images: bool = False,
        max_queued_bytes: int = 256 * 1024 * 1024,
    ) -> None:
        self.store = store
        self.flush_rows = max(1, flush_rows)
        self.flush_s = flush_s
        self.keep_images = keep_images
        self.dropped = 0
        self.written_rows = 0
        self.failed_rows = 0
        self.parts: list[str] = []
        self.max_queued_bytes = max_queued_bytes
        self._queued_bytes = 0  # decoded pixels waiting for their facts: the memory the queue holds
        self._bytes_lock = threading.Lock()
        self._queue: queue.Queue[LoggedRequest | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="leukops-request-log", daemon=True)
        self._thread.start()

    def record(self, item: LoggedRequest) -> None:
        """Queue one request for the log; drops it (counted) when the queue already holds too many pixels."""
        with self._bytes_lock:
            if self._queued_bytes + item.rgb.nbytes > self.max_queued_bytes:
                self.dropped += 1
                return
            self._queued_bytes += item.rgb.nbytes
        self._queue.put(item)

    def close(self, timeout_s: float = 30.0) -> None:
        """Write what is buffered and stop the writer thread."""
        self._queue.put(None)
        self._thread.join(timeout=timeout_s)

    def _run(self) -> None:
        rows: list[dict] = []
        first_at: float | None = None
        while True:
            item = self._next(first_at)
            if item is None:
                self._flush(rows)
                return
            if isinstance(item, LoggedRequest):
                rows.append(self._row(item))
                with self._bytes_lock:
                    self._queued_bytes -= item.rgb.nbytes
                first_at = time.monotonic() if first_at is None else first_at
            if rows and (len(rows) >= self.flush_rows or time.monotonic() - first_at >= self.flush_s):
                self._flush(rows)
                rows, first_at = [], None

    def _next(self, first_at: float | None) -> LoggedRequest | None | str:
        """The next queued item, or ``"tick"`` when the oldest buffered row is due to be written."""
        wait = self.flush_s if first_at is None else max(0.0, first_at + self.flush_s - time.monotonic())
        try:
            return self._queue.get(timeout=wait)
        except queue.Empty:
            return "tick"

    def _row(self, item: LoggedRequest) -> dict:
        image_key = self._store_image(item) if self.keep_images and item.image_bytes else None
        return to_row(item, image_key)

    def _store_image(self, item: LoggedRequest) -> str | None:
        sha = sha256_hex(item.image_bytes)
        ext = (item.image_format or "bin").lower().replace("jpeg", "jpg")
        key = request_image_key(sha, ext)
        try:
            if not self.store.exists(key):
                self.store.put_bytes(key, item.image_bytes)
        except Exception as err:  # noqa: BLE001 - a failed image upload must not lose the log row
            log.warning("request %s: could not store the image: %s", item.request_id, err)
            return None
        return key

    def _flush(self, rows: list[dict]) -> None:
        if not rows:
            return
        for date, frame in rows_by_date(rows).items():
            key = request_log_part_key(date, f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:12]}")
            try:
                self.store.put_parquet(key, frame)
            except Exception as err:  # noqa: BLE001 - S3 down: count the loss, keep serving
                self.failed_rows += len(frame)
                log.error("request log: writing %d rows to %s failed: %s", len(frame), key, err)
                continue
            self.written_rows += len(frame)
            self.parts.append(key)
