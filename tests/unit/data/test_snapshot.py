"""The pure snapshot core: stable splits, near-duplicate inheritance, groups, holdout exclusion."""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipelines.data.groups import GroupSpec
from pipelines.data.imagefacts import FACT_COLUMNS, decode_image, perceptual_hash
from pipelines.data.ledger import (
    NEAR_DUPLICATE_BITS,
    assign_splits,
    empty_ledger,
    hamming_to_all,
    hash_split,
    phash_ints,
)
from pipelines.data.snapshot import (
    SnapshotError,
    build_snapshot,
    dataset_version,
    split_warnings,
    training_candidates,
)
from pipelines.io import layout
from pipelines.io.storage import sha256_hex

TASK = "all_subtypes"


def rows_from(paths: list[Path], source: str = "lab-a", label: str | None = None) -> pd.DataFrame:
    rows = []
    for path in paths:
        data = path.read_bytes()
        rows.append(_row(data, label or path.parent.name, source, decode_image(data).rgb))
    return pd.DataFrame(rows).drop_duplicates("sha256").reset_index(drop=True)  # the Pro folder has exact pairs


def _row(data: bytes, label: str, source: str, rgb: np.ndarray, patient: str | None = None) -> dict:
    sha = sha256_hex(data)
    facts = dict.fromkeys(FACT_COLUMNS, 1.0)
    return {
        "sha256": sha,
        "key": layout.raw_key(sha, "jpg"),
        "label": label,
        "source": source,
        "phash": perceptual_hash(rgb),
        "patient_id": patient,
        **facts,
    }


@pytest.fixture(scope="module")
def taleqani(shared_data: Path) -> list[Path]:
    root = shared_data / "all_taleqani"
    return [p for c in ("Benign", "Early", "Pre", "Pro") for p in sorted((root / c).iterdir())[:50]]


def test_hash_split_is_deterministic_and_close_to_80_10_10() -> None:
    splits = Counter(hash_split(f"sha-{i}") for i in range(5000))
    assert hash_split("abc") == hash_split("abc")
    assert abs(splits["train"] / 5000 - 0.8) < 0.02
    assert abs(splits["val"] / 5000 - 0.1) < 0.015 and abs(splits["test"] / 5000 - 0.1) < 0.015


def test_ledger_split_is_never_changed(taleqani: list[Path]) -> None:
    rows = rows_from(taleqani[:20])
    first, ledger = assign_splits(rows.assign(group=None), empty_ledger())
    forced = ledger.assign(split=["test" if s == "train" else "train" for s in ledger["split"]])
    again, grown = assign_splits(rows.assign(group=None), forced)
    assert list(again["split"]) == list(forced.set_index("sha256").loc[rows["sha256"], "split"])
    assert len(grown) == len(forced)


def test_reencoded_and_resized_copies_inherit_their_originals_split(taleqani: list[Path]) -> None:
    originals = rows_from(taleqani[:40])
    _, ledger = assign_splits(originals.assign(group=None), empty_ledger())
    ledger = ledger.assign(split="val")  # a split no hash would give all 40 of them
    copies = []
    for path in taleqani[:40]:
        rgb = decode_image(path.read_bytes()).rgb
        small = cv2.resize(rgb, (200, 200), interpolation=cv2.INTER_AREA)
        buffer = io.BytesIO()
        Image.fromarray(small).save(buffer, "JPEG", quality=60)
        copy_rgb = decode_image(buffer.getvalue()).rgb
        original_hash, copy_hash = phash_ints([perceptual_hash(rgb), perceptual_hash(copy_rgb)])
        assert hamming_to_all(original_hash, np.array([copy_hash]))[0] <= NEAR_DUPLICATE_BITS
        copies.append(_row(buffer.getvalue(), path.parent.name, "lab-b", copy_rgb))
    assigned, grown = assign_splits(pd.DataFrame(copies).assign(group=None), ledger)
    assert set(assigned["split"]) == {"val"}
    assert set(grown.tail(40)["assigned_by"]) == {"near_duplicate"}


def test_distinct_images_are_not_merged_but_consecutive_captures_are(taleqani: list[Path]) -> None:
    rows = rows_from(taleqani)
    hashes = phash_ints(rows["phash"])
    lonely = np.array([np.sort(hamming_to_all(h, hashes))[1] > NEAR_DUPLICATE_BITS for h in hashes])  # [0]: itself
    _, ledger = assign_splits(rows[lonely].assign(group=None), empty_ledger())
    assert len(ledger) > 150 and "near_duplicate" not in set(ledger["assigned_by"])
    assigned, _ = assign_splits(rows.assign(group=None), empty_ledger())
    captures = rows_from([p for p in taleqani if p.stem.endswith(("Pro-003", "Pro-004", "Pro-005"))])
    assert assigned.set_index("sha256").loc[captures["sha256"], "split"].nunique() == 1


def test_a_patients_images_share_one_split(taleqani: list[Path]) -> None:
    rows = rows_from(taleqani[:30]).assign(group=[f"lab:p{i % 3}" for i in range(30)])
    assigned, _ = assign_splits(rows, empty_ledger())
    assert assigned.groupby("group")["split"].nunique().max() == 1


def test_candidates_count_each_sha_once_and_drop_holdout_and_foreign_labels() -> None:
    rows = pd.DataFrame(
        {
            "sha256": ["a", "a", "b", "c", "d"],
            "label": ["Pre", "Pre", "Early", "Pre", "lymphocyte"],
            "source": ["lab-b", "lab-a", "lab-a", "lab-a", "lab-a"],
        }
    )
    kept, excluded = training_candidates(rows, ("Benign", "Early", "Pre", "Pro"), {"c"})
    assert list(kept["sha256"]) == ["a", "b"] and excluded == 1
    assert kept.set_index("sha256").loc["a", "source"] == "lab-a"


def test_snapshot_is_stable_when_a_second_source_arrives(taleqani: list[Path]) -> None:
    first_rows = rows_from(taleqani[:100])
    first = build_snapshot(TASK, first_rows, set(), empty_ledger(), {})
    more = pd.concat([first_rows, rows_from(taleqani[100:], source="lab-b")], ignore_index=True)
    second = build_snapshot(TASK, more, set(), first.ledger, {})
    before = first.snapshot.frame.set_index("sha256")["split"]
    after = second.snapshot.frame.set_index("sha256")["split"]
    assert (after.loc[before.index] == before).all()
    assert second.new_in_ledger == len(second.snapshot.frame) - len(first.snapshot.frame) > 80
    assert second.snapshot.version != first.snapshot.version
    again = build_snapshot(TASK, more, set(), second.ledger, {})
    assert again.snapshot.version == second.snapshot.version and again.new_in_ledger == 0


def test_holdout_shas_never_enter_and_the_output_says_so(taleqani: list[Path]) -> None:
    rows = rows_from(taleqani[:60])
    holdout = set(rows["sha256"][:5])
    result = build_snapshot(TASK, rows, holdout, empty_ledger(), {})
    assert not holdout & set(result.snapshot.frame["sha256"])
    assert result.excluded_holdout == 5
    assert any("holdout" in w for w in result.warnings)


def test_reencoded_copies_of_holdout_images_stay_out_of_training_and_are_counted(taleqani: list[Path]) -> None:
    rows = rows_from(taleqani[:60])
    holdout_hashes = []
    for path in taleqani[:4]:  # the holdout lab sent re-encoded, resized copies of four training images
        small = cv2.resize(decode_image(path.read_bytes()).rgb, (200, 200), interpolation=cv2.INTER_AREA)
        buffer = io.BytesIO()
        Image.fromarray(small).save(buffer, "JPEG", quality=60)
        holdout_hashes.append(perceptual_hash(decode_image(buffer.getvalue()).rgb))
    pool = phash_ints(holdout_hashes)
    near = {r.sha256 for r in rows.itertuples() if hamming_to_all(phash_ints([r.phash])[0], pool).min() <= 6}
    result = build_snapshot(TASK, rows, set(), empty_ledger(), {}, holdout_phashes=holdout_hashes)
    assert set(rows_from(taleqani[:4])["sha256"]) <= near and not near & set(result.snapshot.frame["sha256"])
    assert result.excluded_holdout_near_duplicates == len(near) and result.excluded_holdout == 0
    assert len(result.snapshot.frame) == len(rows) - len(near)
    assert any("near-duplicates of holdout images" in w for w in result.warnings)


def test_counts_and_version_follow_the_rows(taleqani: list[Path]) -> None:
    rows = rows_from(taleqani)
    result = build_snapshot(TASK, rows, set(), empty_ledger(), {})
    counts = result.snapshot.counts
    assert sum(counts[s]["Early"] for s in counts) == 50
    assert sum(sum(per.values()) for per in counts.values()) == len(result.snapshot.frame) == len(rows)
    flipped = result.snapshot.frame.assign(split="test")
    assert dataset_version(flipped) != result.snapshot.version


def test_warnings_for_skewed_shares_and_imbalance() -> None:
    counts = {"train": {"A": 100, "B": 10}, "val": {"A": 0, "B": 1}, "test": {"A": 25, "B": 1}}
    warnings = split_warnings(counts, ("A", "B"))
    assert any("class 'A': split shares" in w for w in warnings)
    assert any("class imbalance" in w for w in warnings)
    assert any("class 'B' has only 12 images" in w for w in warnings)


def test_no_candidates_is_a_clear_error() -> None:
    empty = pd.DataFrame(columns=["sha256", "label", "source"])
    with pytest.raises(SnapshotError, match="no accepted images"):
        build_snapshot(TASK, empty, set(), empty_ledger(), {})


# -- groups and ledger versions (synthetic file lists: fast, and the near-duplicates are planted) --------

ALL_PATTERN = r"regex:^([^/]+)/.*?(?P<key>\d+)\.\w+$"
CLASSES = ("Benign", "Early", "Pre", "Pro")


def synthetic_rows(numbers: range, run: int, seed: int = 0, source: str = "lab-a") -> pd.DataFrame:
    """ALL-style file names; every ``run`` consecutive numbers are near-identical captures (≤ 4 bits apart)."""
    rng = np.random.default_rng(seed)
    rows = []
    for label in CLASSES:
        base = 0
        for n in numbers:
            if n % run == 0:
                base = int(rng.integers(0, 2**63))
            flipped = base ^ (1 << int(rng.integers(0, 64))) ^ (1 << int(rng.integers(0, 64)))
            path = f"{label}/WBC-{label}-{n:03d}.jpg"
            sha = sha256_hex(f"{source}/{path}".encode())
            rows.append(
                {"sha256": sha, "key": layout.raw_key(sha, "jpg"), "label": label, "source": source, "path": path}
                | {"phash": f"{flipped:016x}", "patient_id": None, **dict.fromkeys(FACT_COLUMNS, 1.0)}
            )
    return pd.DataFrame(rows)


def test_no_group_straddles_splits_even_when_near_duplicates_cross_block_edges() -> None:
    rows = synthetic_rows(range(200), run=7)  # runs of 7 cross block edges at 20, 40, ...
    result = build_snapshot(TASK, rows, set(), empty_ledger(), {"lab-a": GroupSpec(ALL_PATTERN, 20)})
    frame = result.snapshot.frame
    assert frame["group"].notna().all() and frame.groupby("group")["split"].nunique().max() == 1
    assert result.groups["n_groups"] == 4 * 10 and result.groups["groups_straddling_splits"] == 0
    assert result.groups["near_duplicate_pairs_across_splits"] == 0
    assert result.groups["largest_group_share"] == pytest.approx(20 / 800)
    assert sum(result.groups["groups_per_split"].values()) == 40
    per_image = build_snapshot(TASK, rows, set(), empty_ledger(), {})
    assert per_image.groups["n_groups"] == 800  # an ungrouped image is a group of its own


def test_new_groups_give_every_class_a_val_and_a_test_part() -> None:
    rows = synthetic_rows(range(100), run=1)  # no near-duplicates: the balance alone places groups
    result = build_snapshot(TASK, rows, set(), empty_ledger(), {"lab-a": GroupSpec(ALL_PATTERN, 10)})
    groups = result.snapshot.frame.groupby(["label", "split"])["group"].nunique().unstack(fill_value=0)
    assert (groups[["val", "test"]] >= 1).all().all(), groups
    assert all(abs(share["train"] - 0.8) <= 0.1 for share in result.shares.values())
    assert set(result.ledger["assigned_by"]) == {"group_balance"}


def test_groups_win_over_per_image_near_duplicate_inheritance() -> None:
    rows = synthetic_rows(range(40), run=1)
    spec = {"lab-a": GroupSpec(ALL_PATTERN, 20)}
    first = build_snapshot(TASK, rows[rows["path"].str.endswith("-000.jpg")], set(), empty_ledger(), spec)
    group_split = first.snapshot.frame.set_index("group")["split"]
    elsewhere = "test" if group_split["lab-a:Pro/0"] != "test" else "val"
    planted = rows[rows["path"] == "Pro/WBC-Pro-005.jpg"].assign(
        sha256="planted", source="lab-b", path="x.jpg", label="Pro"
    )  # bytes of another source, pHash identical to Pro 005, placed in another split
    ledger = pd.concat([first.ledger, planted.assign(split=elsewhere, group=None)[list(first.ledger.columns[:6])]])
    second = build_snapshot(TASK, rows, set(), ledger.reset_index(drop=True), spec)
    pro_005 = rows.set_index("path").loc["Pro/WBC-Pro-005.jpg", "sha256"]
    assert second.snapshot.frame.set_index("sha256").loc[pro_005, "split"] == group_split["lab-a:Pro/0"] != elsewhere
    assert second.ledger.set_index("sha256").loc[pro_005, "assigned_by"] == "group"


def test_a_new_group_follows_the_split_its_near_duplicates_have() -> None:
    rows = synthetic_rows(range(20), run=20)  # one run per class: all near-duplicates of each other
    old = rows[rows["path"].str.endswith("-003.jpg")].assign(
        source="lab-old", path="old.jpg", sha256=lambda f: "o" + f["sha256"]
    )
    first = build_snapshot(TASK, old, set(), empty_ledger(), {})
    forced = first.ledger.assign(split="test")
    second = build_snapshot(TASK, pd.concat([old, rows]), set(), forced, {"lab-a": GroupSpec(ALL_PATTERN, 20)})
    fresh = second.snapshot.frame[second.snapshot.frame["source"] == "lab-a"]
    assert set(fresh["split"]) == {"test"}


def test_a_changed_grouping_starts_a_new_ledger_version_and_keeps_the_old_rows() -> None:
    a, b = synthetic_rows(range(60), run=1), synthetic_rows(range(60), run=1, seed=1, source="lab-b")
    rows = pd.concat([a, b], ignore_index=True)
    ungrouped = {"lab-a": GroupSpec(), "lab-b": GroupSpec()}
    first = build_snapshot(TASK, rows, set(), empty_ledger(), ungrouped)
    assert first.ledger_version == 1 and not first.regrouped
    by_block = {**ungrouped, "lab-a": GroupSpec(ALL_PATTERN, 20)}
    second = build_snapshot(TASK, rows, set(), first.ledger, by_block)
    assert second.ledger_version == 2 and set(second.regrouped) == {"lab-a"}
    assert second.regrouped["lab-a"]["to"] == by_block["lab-a"].spec
    versions = second.ledger["ledger_version"].value_counts()
    assert versions[1] == versions[2] == len(rows)  # old rows kept for audit, every image in the new one
    old, new = (second.ledger[second.ledger["ledger_version"] == v].set_index("sha256") for v in (1, 2))
    b_shas = b["sha256"]
    assert (new.loc[b_shas, "split"] == old.loc[b_shas, "split"]).all()  # untouched source keeps its splits
    assert second.snapshot.frame.groupby("group")["split"].nunique().max() == 1
    assert second.snapshot.version != first.snapshot.version
    again = build_snapshot(TASK, rows, set(), second.ledger, by_block)
    assert again.ledger_version == 2 and again.new_in_ledger == 0 and not again.ledger_changed
    assert again.snapshot.version == second.snapshot.version and set(again.regrouped) == {"lab-a"}


def test_a_ledger_without_recorded_groupings_adopts_the_current_ones() -> None:
    rows = synthetic_rows(range(30), run=1)
    first = build_snapshot(TASK, rows, set(), empty_ledger(), {})
    legacy = first.ledger.drop(columns=["grouping", "ledger_version"])
    spec = {"lab-a": GroupSpec(ALL_PATTERN, 20)}
    upgraded_once = build_snapshot(TASK, rows, set(), legacy, spec)
    assert upgraded_once.ledger_version == 1 and upgraded_once.ledger_changed and upgraded_once.new_in_ledger == 0
    assert set(upgraded_once.ledger["grouping"]) == {spec["lab-a"].spec}


def test_a_source_with_its_own_split_shares_is_placed_by_them_and_the_others_keep_80_10_10() -> None:
    first_lab = synthetic_rows(range(100), run=1, source="lab-a")
    new_lab = synthetic_rows(range(25), run=1, seed=1, source="lab-b")
    specs = {"lab-a": GroupSpec(), "lab-b": GroupSpec(split=(0.5, 0.1, 0.4))}
    result = build_snapshot(TASK, pd.concat([first_lab, new_lab], ignore_index=True), set(), empty_ledger(), specs)
    shares = result.snapshot.frame.groupby("source")["split"].value_counts(normalize=True).unstack(fill_value=0)
    assert shares.loc["lab-b", "test"] == pytest.approx(0.4, abs=0.1), shares
    assert shares.loc["lab-a", "test"] == pytest.approx(0.1, abs=0.05), shares
    grouped = {"lab-b": GroupSpec(ALL_PATTERN, 5, (0.5, 0.1, 0.4))}  # whole groups, balanced within the source
    by_groups = build_snapshot(TASK, new_lab, set(), empty_ledger(), grouped).snapshot.frame
    per_class = by_groups.groupby("label")["split"].value_counts().unstack(fill_value=0)
    assert (per_class["test"] == 10).all() and (per_class["train"] >= 10).all(), per_class


def test_changing_a_sources_split_shares_places_it_again_in_a_new_ledger_version() -> None:
    rows = synthetic_rows(range(40), run=1)
    first = build_snapshot(TASK, rows, set(), empty_ledger(), {"lab-a": GroupSpec()})
    second = build_snapshot(TASK, rows, set(), first.ledger, {"lab-a": GroupSpec(split=(0.5, 0.1, 0.4))})
    assert second.ledger_version == 2 and set(second.regrouped) == {"lab-a"}
    assert (second.snapshot.frame["split"] == "test").mean() > (first.snapshot.frame["split"] == "test").mean()
    unchanged = build_snapshot(TASK, rows, set(), first.ledger, {"lab-a": GroupSpec(split=(0.8, 0.1, 0.1))})
    assert unchanged.ledger_version == 1 and not unchanged.ledger_changed  # the default, spelled out
