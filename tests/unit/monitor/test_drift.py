"""The wiring's own logic: report ids that make a rerun overwrite its report."""

from __future__ import annotations

from pipelines.monitor.drift import default_report_id
from pipelines.monitor.inputs import Champion


def test_default_report_id_is_stable_for_the_same_inputs_and_changes_with_the_champion():
    champion = Champion("3", "run-a", "ds1")
    first = default_report_id("wbc", "champion", "batch:b1", champion, ["b", "a"])
    assert first == default_report_id("wbc", "champion", "batch:b1", champion, ["a", "b"])
    assert first.startswith("wbc-")
    assert first != default_report_id("wbc", "champion", "batch:b1", Champion("4", "run-b", "ds1"), ["a", "b"])
    assert first != default_report_id("wbc", "champion", "batch:b2", champion, ["a", "b"])
