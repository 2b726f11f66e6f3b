"""The grouping parser: patient / source / regex over the relative path, with number blocks."""

from __future__ import annotations

import pytest

from pipelines.data.groups import GroupSpec, GroupSpecError, preview, shares_of_spec
from pipelines.data.sources import SourceError, source_from_mapping

ALL_PATTERN = r"regex:^([^/]+)/.*?(?P<key>\d+)\.\w+$"


def test_all_set_file_numbers_group_in_blocks_per_class() -> None:
    spec = GroupSpec(ALL_PATTERN, 20)
    keys = {n: spec.key("tq", f"Benign/WBC-Benign-{n:03d}.jpg", None) for n in (1, 19, 20, 39, 40)}
    assert keys == {1: "tq:Benign/0", 19: "tq:Benign/0", 20: "tq:Benign/1", 39: "tq:Benign/1", 40: "tq:Benign/2"}
    assert spec.key("tq", "Pro/WBC-Malignant-Pro-001.jpg", None) == "tq:Pro/0"  # same number, other class


def test_key_is_the_capture_groups_or_the_whole_match() -> None:
    assert GroupSpec(r"regex:P\d+").key("lab", "imgs/P17_003.png", None) == "lab:P17"
    assert GroupSpec(r"regex:(slide\d+)/(?P<key>\d+)_").key("lab", "a/slide4/12_x.jpg", None) == "lab:slide4/12"
    assert GroupSpec(r"regex:(slide\d+)/(?P<key>\d+)_", 10).key("lab", "a/slide4/12_x.jpg", None) == "lab:slide4/1"


def test_patient_and_source_groups() -> None:
    assert GroupSpec("patient").key("lab", "a.jpg", "p7") == "lab:p7"
    assert GroupSpec("patient").key("lab", "a.jpg", None) is None
    assert GroupSpec("source").key("lab", "a.jpg", None) == "lab"
    assert GroupSpec().key("lab", "a.jpg", "p7") is None


def test_a_path_the_pattern_does_not_match_has_no_group() -> None:
    spec = GroupSpec(ALL_PATTERN, 20)
    assert spec.key("tq", "notes.txt", None) is None
    found = preview(spec, ["Pre/WBC-Pre-001.jpg", "Pre/WBC-Pre-021.jpg", "Pre/extra"])
    assert (found["groups"], found["unmatched"], found["unmatched_examples"]) == (2, 1, ["Pre/extra"])


@pytest.mark.parametrize(
    ("by", "block", "message"),
    [
        (r"regex:(?P<key>\d+", None, "not a valid regular expression"),
        ("regex:", None, "empty pattern"),
        (r"regex:(\d+)", 20, r"needs a named group \(\?P<key>"),
        (ALL_PATTERN, 0, "whole number"),
        ("patient", 20, "applies to group_by 'regex"),
        ("slide", None, "group_by 'slide' is not one of"),
    ],
)
def test_bad_groupings_are_refused(by: str, block: int | None, message: str) -> None:
    with pytest.raises(GroupSpecError, match=message):
        GroupSpec(by, block)


def test_a_bad_pattern_in_a_source_file_names_the_file() -> None:
    data = {"name": "lab", "location": "/d", "layout": "folders", "tasks": ["wbc"], "group_by": r"regex:([0-9]+"}
    with pytest.raises(SourceError, match=r"sources/lab\.yaml: group_by pattern .* not a valid regular expression"):
        source_from_mapping(data, "expectations/sources/lab.yaml")


def test_the_recorded_spec_changes_with_the_pattern_or_the_block() -> None:
    specs = {
        GroupSpec().spec,
        GroupSpec(ALL_PATTERN, 20).spec,
        GroupSpec(ALL_PATTERN, 40).spec,
        GroupSpec("source").spec,
    }
    assert len(specs) == 4 and GroupSpec(ALL_PATTERN, 20).spec == GroupSpec(ALL_PATTERN, 20).spec


@pytest.mark.parametrize(
    ("split", "reason"),
    [
        ((0.5, 0.5, 0.5), "add up to 1"),
        ((0.0, 0.5, 0.5), "holdout"),
        ((0.5, 0.5), "three numbers"),
        ((1.2, -0.1, -0.1), "three numbers"),
    ],
)
def test_bad_split_shares_are_refused_with_the_reason(split, reason) -> None:
    with pytest.raises(GroupSpecError, match=reason):
        GroupSpec(split=split)


def test_split_shares_are_part_of_the_grouping_only_when_they_differ_from_80_10_10() -> None:
    assert GroupSpec(split=(0.8, 0.1, 0.1)).spec == GroupSpec().spec
    assert shares_of_spec(GroupSpec(split=(0.5, 0.1, 0.4)).spec) == {"train": 0.5, "val": 0.1, "test": 0.4}
    assert shares_of_spec(None) == {"train": 0.8, "val": 0.1, "test": 0.1}


def test_split_shares_in_a_source_file_name_the_file_and_round_trip() -> None:
    base = {"name": "new-lab", "location": "/d", "layout": "folders", "tasks": ["wbc"]}
    with pytest.raises(SourceError, match=r"sources/new-lab\.yaml: split_shares .* must map each of train, val, test"):
        source_from_mapping(base | {"split_shares": {"train": 0.6, "test": 0.4}}, "expectations/sources/new-lab.yaml")
    source = source_from_mapping(base | {"split_shares": {"train": 0.5, "val": 0.1, "test": 0.4}}, "x.yaml")
    assert source.grouping.shares == {"train": 0.5, "val": 0.1, "test": 0.4}
    import yaml

    assert source_from_mapping(yaml.safe_load(source.to_yaml()), "x.yaml") == source


def test_split_shares_that_are_not_numbers_name_the_file() -> None:
    data = {"name": "lab", "location": "/d", "layout": "folders", "tasks": ["wbc"]}
    with pytest.raises(SourceError, match=r"lab\.yaml: split_shares .* must be numbers"):
        source_from_mapping(data | {"split_shares": {"train": "half", "val": 0.1, "test": 0.4}}, "sources/lab.yaml")
