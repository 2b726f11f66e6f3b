"""The storage-key catalog: keys are spelled only in io/layout.py, and its helpers invert each other."""

from __future__ import annotations

import re
from datetime import date
from pathlib import Path

from pipelines.io import layout

REPO = Path(__file__).resolve().parents[3]
LAYOUT = REPO / "pipelines" / "io" / "layout.py"
# A string literal that starts like a key or artifact path of the catalog.
KEY_LITERAL = re.compile(
    r"""(?<![\w/.])[frb]*["'](raw/|manifests/|quarantine/|reports/|state/|serving/(requests|images)|drift/|"""
    r"""runs:/|models:/|gate/|evaluation/|explain/)"""
)


def key_literals(source: str) -> list[str]:
    return [line.strip() for line in source.splitlines() if KEY_LITERAL.search(line)]


def test_no_storage_key_literal_outside_the_catalog() -> None:
    files = [p for root in ("pipelines", "serving", "dags") for p in (REPO / root).rglob("*.py") if p != LAYOUT]
    found = {str(p.relative_to(REPO)): hits for p in files if (hits := key_literals(p.read_text()))}
    assert not found, found


def test_the_literal_check_catches_a_spelled_key() -> None:
    assert key_literals('key = f"manifests/datasets/{task}.parquet"')
    assert key_literals("uri = 'runs:/' + run_id")
    assert not key_literals('log.info("drift detected in %s", name)')


def test_batch_manifest_key_round_trips() -> None:
    key = layout.batch_manifest_key("pbc", "20261201T000000-abc")
    assert key.startswith(layout.batches_dir("pbc"))
    assert layout.batch_of_manifest_key(key) == ("pbc", "20261201T000000-abc")


def test_raw_key_is_sharded_under_its_shard_dir() -> None:
    sha = "ab" + "cd" + "0" * 60
    assert layout.raw_key(sha, "png").startswith(layout.raw_shard_dir(sha))
    assert layout.raw_key(sha, "png").startswith(layout.IMMUTABLE_PREFIXES)


def test_state_keys_make_run_ids_one_segment() -> None:
    key = layout.drift_verdict_key("wbc", "manual__2026-12-01T02:00:00+00:00")
    assert key.count("/") == 4 and ":" not in key and "+" not in key


def test_drift_report_keys_are_dated() -> None:
    html, body = layout.drift_report_keys(date(2026, 12, 1), "r1")
    assert html.endswith("2026-12-01/r1.html") and body.endswith("2026-12-01/r1.json")
