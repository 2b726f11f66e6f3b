"""Split groups end to end on real all_taleqani images: the CLI, real SeaweedFS S3, the stored ledger.

Task ``binary_all`` keeps this ledger apart from the ``all_subtypes`` one the ingest tests check.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pipelines.data.snapshot import load_snapshot
from pipelines.io import layout
from pipelines.io.storage import ObjectStore
from tests.integration.data.commands import cli

pytestmark = pytest.mark.usefixtures("stack")
TASK = "binary_all"
LABELS = ("Benign=Healthy", "Early=ALL", "Pre=ALL", "Pro=ALL")
PATTERN = r"regex:^([^/]+)/.*?(?P<key>\d+)\.\w+$"


def add_grouped(capsys, root: Path, block: int, *extra: str) -> dict:
    args = ["source", "add", "tq-groups", "--path", str(root), "--task", TASK, "--label-map", *LABELS]
    code, out = cli(capsys, *args, "--group-by", PATTERN, "--group-block", str(block), *extra)
    assert code == 0, out
    return out


def test_groups_never_straddle_splits_and_a_regrouping_starts_a_new_ledger_version(
    capsys, store: ObjectStore, shared_data: Path, tmp_path: Path
) -> None:
    for label in ("Benign", "Early", "Pre", "Pro"):  # numbers 101-139 (blocks 5, 6 of 20): unused by test_ingest
        (tmp_path / label).mkdir()
        for f in sorted((shared_data / "all_taleqani" / label).iterdir())[100:139]:
            shutil.copyfile(f, tmp_path / label / f.name)
    added = add_grouped(capsys, tmp_path, 20)
    assert added["grouping"]["groups"] == 8 and added["grouping"]["unmatched"] == 0
    assert cli(capsys, "ingest", "tq-groups")[1]["status"] == "accepted"

    code, first = cli(capsys, "snapshot", "--task", TASK)
    assert code == 0 and first["ledger_version"] == 1 and not first["champion_reevaluation_required"]
    frame = load_snapshot(store, TASK).frame
    assert frame["group"].str.fullmatch(r"tq-groups:(Benign|Early|Pre|Pro)/[56]").all()
    assert frame.groupby("group")["split"].nunique().max() == 1
    assert first["n_groups"] == 8 and sum(first["groups_per_split"].values()) == 8
    assert first["groups_straddling_splits"] == 0 and first["near_duplicate_pairs_across_splits"] == 0
    assert first["largest_group_share"] == pytest.approx(20 / first["images"], abs=1e-4)

    add_grouped(capsys, tmp_path, 10, "--replace")
    _, second = cli(capsys, "snapshot", "--task", TASK)
    assert second["ledger_version"] == 2 and second["champion_reevaluation_required"]
    assert list(second["regrouped_sources"]) == ["tq-groups"] and second["n_groups"] == 16
    assert second["dataset_version"] != first["dataset_version"]
    regrouped = load_snapshot(store, TASK).frame
    assert regrouped.groupby("group")["split"].nunique().max() == 1
    ledger = store.get_parquet(layout.ledger_key(TASK))
    assert (ledger["ledger_version"].value_counts() == first["images"]).all()  # version 1 kept for audit

    _, again = cli(capsys, "snapshot", "--task", TASK)  # a rerun: same objects, the flag kept
    assert again["dataset_version"] == second["dataset_version"] and again["new_in_ledger"] == 0
    assert again["champion_reevaluation_required"]
    assert store.get_json(layout.latest_dataset_pointer_key(TASK))["ledger_version"] == 2
