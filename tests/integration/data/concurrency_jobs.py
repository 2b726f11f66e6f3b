"""Jobs of the concurrency tests (``parallel.run_parallel``): each builds its store in its own process
and returns the action the barrier releases."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from pipelines.core.settings import get_settings
from pipelines.data.ledger import LEDGER_COLUMNS
from pipelines.io.storage import ObjectStore, PreconditionFailedError


def store_of(bucket: str) -> ObjectStore:
    store = ObjectStore.from_settings(get_settings(), bucket)
    store._boto_client()  # built before the barrier, so the race is between the requests themselves
    return store


def put_new_job(bucket: str, keys: list[str], payload: bytes) -> Callable[[], list[str]]:
    """Create each key in turn: processes released together race on every one of them."""
    store = store_of(bucket)

    def act() -> list[str]:
        outcomes = []
        for key in keys:
            try:
                store.put_new(key, payload)
                outcomes.append("created")
            except PreconditionFailedError:
                outcomes.append("refused")
        return outcomes

    return act


def put_if_match_job(bucket: str, tagged: list[tuple[str, str]], payload: bytes) -> Callable[[], list[str]]:
    """Replace each (key, etag) in turn, racing the other processes on each."""
    store = store_of(bucket)

    def act() -> list[str]:
        outcomes = []
        for key, etag in tagged:
            try:
                store.put_if_match(key, payload, etag)
                outcomes.append("replaced")
            except PreconditionFailedError:
                outcomes.append("refused")
        return outcomes

    return act


def append_rows_job(bucket: str, task: str, shas: list[str]) -> Callable[[], int]:
    import pandas as pd

    from pipelines.data.ledger_store import append_rows

    store = store_of(bucket)
    row = {"split": "train", "phash": None, "label": "ALL", "group": None, "source": f"writer-{os.getpid()}"}
    row |= {"assigned_by": "hash", "grouping": None, "ledger_version": 1}
    rows = pd.DataFrame([{"sha256": sha, **row} for sha in shas], columns=list(LEDGER_COLUMNS))
    return lambda: append_rows(store, task, rows).generation


def lease_job(bucket: str, name: str, hold_s: float) -> Callable[[], tuple[float, float]]:
    from pipelines.io.lease import Lease

    store = store_of(bucket)

    def act() -> tuple[float, float]:
        with Lease(store, name, poll_s=0.1):
            entered = time.time()
            time.sleep(hold_s)
            return entered, time.time()

    return act


def lease_and_hang_job(bucket: str, name: str) -> Callable[[], None]:
    """Take the lease and never give it back (the test SIGKILLs this process)."""
    from pipelines.io.lease import Lease

    store = store_of(bucket)

    def act() -> None:
        Lease(store, name).acquire()
        time.sleep(600)

    return act


def ingest_job(bucket: str, source: str, run_date: str) -> Callable[[], dict[str, Any]]:
    from pipelines.data.ingest import ingest_source
    from pipelines.data.sources import load_source

    settings, store = get_settings(), store_of(bucket)
    spec = load_source(source, settings)
    return lambda: ingest_source(spec, settings, store, run_date=run_date, workers=2).to_dict()


def snapshot_job(bucket: str, task: str) -> Callable[[], dict[str, Any]]:
    from pipelines.data.snapshot import take_snapshot

    settings, store = get_settings(), store_of(bucket)

    def act() -> dict[str, Any]:
        result = take_snapshot(store, settings, task)
        return {"version": result.snapshot.version, "images": len(result.snapshot.frame)}

    return act
