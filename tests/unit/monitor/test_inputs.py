"""Drift specs, the rows they name in the bucket layout, and deterministic sampling."""

from __future__ import annotations

from datetime import date

import pandas as pd
import pytest

from pipelines.io import layout
from pipelines.monitor.features import DriftError
from pipelines.monitor.inputs import (
    REFERENCE_KINDS,
    Champion,
    batch_rows,
    parse_date_window,
    parse_spec,
    sample_rows,
    serving_rows,
)

from .frames import MemoryStore


def test_parse_spec_accepts_the_documented_forms_and_names_them_on_error():
    assert str(parse_spec("champion", REFERENCE_KINDS, "reference")) == "champion"
    assert parse_spec("dataset:abc", REFERENCE_KINDS, "reference").value == "abc"
    for bad in ("serving:2026-01-01..2026-01-02", "dataset:", "champion:x", "pbc"):
        with pytest.raises(DriftError, match="--reference"):
            parse_spec(bad, REFERENCE_KINDS, "reference")


def test_parse_date_window():
    assert parse_date_window("2026-01-01..2026-01-03") == (date(2026, 1, 1), date(2026, 1, 3))
    for bad in ("2026-01-03..2026-01-01", "2026-01-01", "yesterday..today"):
        with pytest.raises(DriftError, match="serving window"):
            parse_date_window(bad)


def test_sample_rows_is_deterministic_and_bounded():
    rows = pd.DataFrame({"sha256": [f"{i:04x}" for i in range(50)], "v": range(50)})
    shuffled = rows.sample(frac=1.0, random_state=3)
    first, second = sample_rows(rows, 20), sample_rows(shuffled, 20)
    assert len(first) == 20 and set(first["sha256"]) == set(second["sha256"])
    assert len(sample_rows(rows, 100)) == 50


def test_batch_rows_find_the_accepted_rows_of_a_batch_in_any_source():
    store = MemoryStore()
    manifest = pd.DataFrame({"sha256": ["a", "b", "c"], "status": ["accepted", "rejected", "accepted"]})
    store.put_parquet(layout.batch_manifest_key("pbc", "b1"), manifest)
    store.put_parquet(layout.batch_manifest_key("pbc", "b10"), manifest)
    assert list(batch_rows(store, "b1")["sha256"]) == ["a", "c"]
    with pytest.raises(DriftError, match="no batch manifest 'b2'"):
        batch_rows(store, "b2")
    store.put_parquet(layout.batch_manifest_key("blog", "b1"), manifest)
    with pytest.raises(DriftError, match="'b1' is ambiguous"):
        batch_rows(store, "b1")


def test_serving_rows_read_the_days_of_the_window_for_one_task():
    store = MemoryStore()
    for day, task in (("2026-01-01", "wbc"), ("2026-01-02", "wbc"), ("2026-01-02", "all"), ("2026-01-04", "wbc")):
        part = pd.DataFrame({"request_id": [f"{day}-{task}"], "task": [task]})
        store.put_parquet(layout.request_log_part_key(day, task), part)
    rows = serving_rows(store, "wbc", "2026-01-01..2026-01-03")
    assert list(rows["request_id"]) == ["2026-01-01-wbc", "2026-01-02-wbc"]
    with pytest.raises(DriftError, match="no serving request logs"):
        serving_rows(store, "wbc", "2026-02-01..2026-02-02")


def test_champion_model_uri_is_its_runs_model():
    assert Champion("3", "abc", "ds1").model_uri == layout.run_model_uri("abc")
