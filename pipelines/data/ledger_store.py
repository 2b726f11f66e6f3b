"""The split ledger in S3: committed one generation at a time by a conditional create, so concurrent
snapshots never lose a row and the published ``latest`` pointer never goes back.

A generation is the whole ledger after one change, at ``layout.ledger_generation_key(task, n)``, created
with ``If-None-Match: *`` (``ObjectStore.put_new``): of two writers that read generation n, exactly one
creates n+1; the other gets `LedgerConflictError`, and ``with_ledger`` re-reads and redoes its step (a
bounded number of times, then it fails with a message saying so). Generations are never rewritten (they
are the ledger's history); ``layout.ledger_key`` holds a copy of the newest for readers that want one
object. Why not ``If-Match`` on that head: SeaweedFS 4.48 lets two racing If-Match writers both win
(measured, see DESIGN.md "Concurrency"), while its If-None-Match is atomic.
"""

from __future__ import annotations

import io
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from pipelines.core.errors import LeukopsError
from pipelines.data.ledger import empty_ledger
from pipelines.io import layout
from pipelines.io.storage import ObjectMissingError, PreconditionFailedError

if TYPE_CHECKING:
    import pandas as pd

    from pipelines.io.storage import ObjectStore

T = TypeVar("T")
LEDGER_ATTEMPTS = 8  # snapshots of one task racing each other: each lost race costs one re-read
RETRY_BASE_S = 0.2  # jittered exponential backoff between attempts
POINTER_ATTEMPTS = 8


class LedgerConflictError(LeukopsError):
    """Another snapshot committed the ledger generation this one was about to write."""


@dataclass(frozen=True)
class LedgerHead:
    frame: pd.DataFrame
    generation: int  # 0: nothing committed yet (no ledger, or a head written before generations existed)


def parquet_bytes(frame: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    return buffer.getvalue()


def newest_generation(store: ObjectStore, task: str) -> int:
    keys = store.list(layout.ledger_generations_dir(task))
    return max((n for k in keys if (n := layout.generation_of_ledger_key(k)) is not None), default=0)


def read_ledger(store: ObjectStore, task: str) -> LedgerHead:
    """The newest committed generation (a ledger from before generations: generation 0)."""
    generation = newest_generation(store, task)
    if generation:
        return LedgerHead(store.get_parquet(layout.ledger_generation_key(task, generation)), generation)
    head = layout.ledger_key(task)
    return LedgerHead(store.get_parquet(head) if store.exists(head) else empty_ledger(), 0)


def commit_ledger(store: ObjectStore, task: str, head: LedgerHead, frame: pd.DataFrame) -> LedgerHead:
    """Commit ``frame`` as the generation after ``head``; `LedgerConflictError` when another writer did first."""
    generation = head.generation + 1
    data = parquet_bytes(frame)
    try:
        store.put_new(layout.ledger_generation_key(task, generation), data)
    except PreconditionFailedError as err:
        raise LedgerConflictError(
            f"ledger of task {task!r}: generation {generation} was committed by a concurrent snapshot"
        ) from err
    refresh_head_copy(store, task, generation, data)
    return LedgerHead(frame, generation)


def refresh_head_copy(store: ObjectStore, task: str, generation: int, data: bytes) -> None:
    """Copy the newest generation to ``layout.ledger_key``; a newer commit that lands meanwhile is copied
    instead, so the head copy does not stay behind."""
    for _ in range(POINTER_ATTEMPTS):
        store.put_bytes(layout.ledger_key(task), data)
        newest = newest_generation(store, task)
        if newest == generation:
            return
        generation, data = newest, store.get_bytes(layout.ledger_generation_key(task, newest))


def with_ledger(store: ObjectStore, task: str, step: Callable[[LedgerHead], T], attempts: int = LEDGER_ATTEMPTS) -> T:
    """Run ``step`` on the newest ledger; when its commit loses the race, re-read and run it again."""
    lost: LedgerConflictError | None = None
    for attempt in range(attempts):
        try:
            return step(read_ledger(store, task))
        except LedgerConflictError as err:
            lost = err
            time.sleep(random.uniform(0, RETRY_BASE_S * 2**attempt))  # jitter: racing writers spread out
    raise LedgerConflictError(
        f"ledger of task {task!r}: {attempts} attempts each lost to a concurrent snapshot; run it again ({lost})"
    )


def append_rows(store: ObjectStore, task: str, rows: pd.DataFrame) -> LedgerHead:
    """Add ``rows`` to the ledger (its read-modify-write, retried on conflict): what N writers use."""
    import pandas as pd

    def step(head: LedgerHead) -> LedgerHead:
        return commit_ledger(store, task, head, pd.concat([head.frame, rows], ignore_index=True))

    return with_ledger(store, task, step)


# -- the latest pointer ---------------------------------------------------------------------------------------


def is_older(pointer: dict[str, Any], than: dict[str, Any]) -> bool:
    """Does ``pointer`` rest on an older ledger generation than ``than`` (pointers before generations: 0)?"""
    return int(pointer.get("ledger_generation", 0)) < int(than.get("ledger_generation", 0))


def _read_pointer(store: ObjectStore, key: str) -> tuple[dict[str, Any] | None, str | None]:
    import json

    try:
        data, etag = store.get_with_etag(key)
    except ObjectMissingError:
        return None, None
    return json.loads(data), etag


def publish_pointer(store: ObjectStore, task: str, pointer: dict[str, Any]) -> bool:
    """Write the task's ``latest`` pointer unless it already rests on a newer ledger generation.

    True when ``pointer`` is what the key holds afterwards. The write is conditional (If-None-Match when
    absent, If-Match otherwise) and read back: If-Match can let a racing writer win too, and a pointer
    found older than ours is written again.
    """
    import json

    key = layout.latest_dataset_pointer_key(task)
    data = json.dumps(pointer, indent=2, sort_keys=True).encode()
    for _ in range(POINTER_ATTEMPTS):
        current, etag = _read_pointer(store, key)
        if current is not None and is_older(pointer, current):
            return False
        try:
            store.put_new(key, data) if etag is None else store.put_if_match(key, data, etag)
        except PreconditionFailedError:
            continue
        after, _ = _read_pointer(store, key)
        if after is not None and not is_older(after, pointer):
            return after == pointer
    raise LedgerConflictError(f"latest pointer of task {task!r}: {POINTER_ATTEMPTS} conditional writes lost")
