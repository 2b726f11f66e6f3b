"""The ledger's commits: one writer per generation, a lost race redone on a fresh read, a pointer that
never goes back (over the in-memory bucket; real parallel processes: tests/integration/data)."""

from __future__ import annotations

import pandas as pd
import pytest

from pipelines.data import ledger_store
from pipelines.data.ledger import empty_ledger
from pipelines.data.ledger_store import (
    LedgerConflictError,
    append_rows,
    commit_ledger,
    is_older,
    publish_pointer,
    read_ledger,
    with_ledger,
)
from pipelines.io import layout
from tests.unit.io.memory_bucket import MemoryBucket

TASK = "wbc"


def rows(*shas: str) -> pd.DataFrame:
    return pd.DataFrame({"sha256": list(shas), "split": ["train"] * len(shas)})


def test_a_commit_on_a_stale_generation_is_refused_and_nothing_is_overwritten() -> None:
    bucket = MemoryBucket()
    start = read_ledger(bucket, TASK)
    assert start.generation == 0 and start.frame.empty
    first = commit_ledger(bucket, TASK, start, rows("a"))
    with pytest.raises(LedgerConflictError, match="generation 1 was committed by a concurrent snapshot"):
        commit_ledger(bucket, TASK, start, rows("b"))  # read before the first commit
    newest = read_ledger(bucket, TASK)
    assert first.generation == newest.generation == 1 and list(newest.frame["sha256"]) == ["a"]
    assert bucket.get_parquet(layout.ledger_key(TASK))["sha256"].tolist() == ["a"]  # the head copy


def test_a_lost_race_is_redone_on_the_newer_ledger_so_no_row_is_lost(monkeypatch) -> None:
    bucket = MemoryBucket()
    monkeypatch.setattr(ledger_store, "RETRY_BASE_S", 0.0)
    calls = []

    def step(head):
        calls.append(head.generation)
        if len(calls) == 1:  # a concurrent writer commits between our read and our commit
            commit_ledger(bucket, TASK, head, pd.concat([head.frame, rows("theirs")]))
        return commit_ledger(bucket, TASK, head, pd.concat([head.frame, rows("ours")], ignore_index=True))

    result = with_ledger(bucket, TASK, step)
    assert calls == [0, 1] and result.generation == 2
    assert sorted(read_ledger(bucket, TASK).frame["sha256"]) == ["ours", "theirs"]


def test_after_its_attempts_the_writer_fails_with_a_clear_message(monkeypatch) -> None:
    monkeypatch.setattr(ledger_store, "RETRY_BASE_S", 0.0)

    def always_loses(head):
        raise LedgerConflictError("lost")

    with pytest.raises(LedgerConflictError, match="3 attempts each lost to a concurrent snapshot; run it again"):
        with_ledger(MemoryBucket(), TASK, always_loses, attempts=3)


def test_a_ledger_written_before_generations_is_generation_zero_and_grows_from_it() -> None:
    bucket = MemoryBucket()
    bucket.put_parquet(layout.ledger_key(TASK), rows("old"))
    head = read_ledger(bucket, TASK)
    assert head.generation == 0 and list(head.frame["sha256"]) == ["old"]
    grown = append_rows(bucket, TASK, rows("new"))
    assert grown.generation == 1 and list(read_ledger(bucket, TASK).frame["sha256"]) == ["old", "new"]


def test_the_pointer_never_goes_back_to_an_older_generation() -> None:
    bucket = MemoryBucket()
    key = layout.latest_dataset_pointer_key(TASK)
    assert publish_pointer(bucket, TASK, {"version": "v3", "ledger_generation": 3})
    assert not publish_pointer(bucket, TASK, {"version": "v2", "ledger_generation": 2})
    assert bucket.get_json(key)["version"] == "v3"
    assert publish_pointer(bucket, TASK, {"version": "v3b", "ledger_generation": 3})  # same ledger: newest wins
    assert publish_pointer(bucket, TASK, {"version": "v4", "ledger_generation": 4})
    assert bucket.get_json(key) == {"version": "v4", "ledger_generation": 4}


def test_a_pointer_from_before_generations_is_older_than_any_committed_one() -> None:
    assert is_older({"version": "legacy"}, {"ledger_generation": 1})
    assert not is_older({"ledger_generation": 1}, {"version": "legacy"})


def test_empty_ledger_round_trips_through_a_generation() -> None:
    bucket = MemoryBucket()
    commit_ledger(bucket, TASK, read_ledger(bucket, TASK), empty_ledger())
    assert read_ledger(bucket, TASK).generation == 1
