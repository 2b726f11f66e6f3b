"""The gate's view of a grid with failed cells: survivors are gated, no survivor at all is an error."""

from __future__ import annotations

import pytest

from pipelines.orchestration.airflow_tasks import FlowError, survivors

PLANNED = [{"candidate_key": f"run/all_subtypes/{b}/none", "task": "all_subtypes"} for b in ("a", "b", "c")]


def test_the_cells_that_finished_are_gated_without_the_failed_one(caplog):
    finished = [PLANNED[0] | {"run_id": "r0"}, PLANNED[2] | {"run_id": "r2"}]
    assert survivors(PLANNED, finished) == finished
    assert "1 of 3 candidate(s) failed" in caplog.text and "run/all_subtypes/b/none" in caplog.text


def test_no_survivor_fails_and_names_every_cell():
    with pytest.raises(FlowError, match=r"every candidate failed \(run/all_subtypes/a/none, .*c/none\)"):
        survivors(PLANNED, [])
