from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.core.settings import Settings
from pipelines.data.sources import (
    LocalReader,
    Source,
    SourceError,
    csv_entries,
    folder_entries,
    list_files,
    list_sources,
    load_source,
    safe_relative,
    save_source,
    source_from_mapping,
)


@pytest.fixture
def registry(tmp_path: Path) -> Settings:
    return Settings(profile="dev", sources_dir=tmp_path / "sources")


def a_source(**overrides) -> Source:
    fields = dict(
        name="lab-a",
        location="/data/lab-a",
        layout="folders",
        tasks=("all_subtypes",),
        label_map={"benign": "Benign", "early": "Early"},
    )
    return Source(**{**fields, **overrides})


def test_save_then_load_round_trips_and_lists(registry: Settings) -> None:
    path = save_source(a_source(role="holdout", licence="CC-BY 4.0"), registry)
    assert path == registry.sources_dir / "lab-a.yaml"
    loaded = load_source("lab-a", registry)
    assert loaded.role == "holdout"
    assert loaded.label_map == {"benign": "Benign", "early": "Early"}
    assert loaded.canonical_classes == ("Benign", "Early", "Pre", "Pro")
    assert [s.name for s in list_sources(registry)] == ["lab-a"]


def test_save_refuses_to_overwrite_unless_replace(registry: Settings) -> None:
    save_source(a_source(), registry)
    with pytest.raises(SourceError, match="already exists"):
        save_source(a_source(notes="changed"), registry)
    save_source(a_source(notes="changed"), registry, replace=True)
    assert load_source("lab-a", registry).notes == "changed"


def test_missing_source_names_the_file(registry: Settings) -> None:
    with pytest.raises(SourceError, match=r"lab-z\.yaml does not exist"):
        load_source("lab-z", registry)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"name": "Bad Name"}, "must match"),
        ({"layout": "zip"}, "layout 'zip'"),
        ({"role": "test"}, "role 'test'"),
        ({"tasks": ("nonsense",)}, "unknown task 'nonsense'"),
        ({"label_map": {"x": "Leukaemia"}}, "not classes of"),
        ({"group_by": "slide"}, "group_by 'slide'"),
    ],
)
def test_invalid_definitions_are_refused_with_the_field(registry, overrides, message) -> None:
    with pytest.raises(SourceError, match=message):
        save_source(a_source(**overrides), registry)


def test_yaml_with_unknown_or_missing_fields_is_refused() -> None:
    base = {"name": "x", "location": "/d", "layout": "folders", "tasks": ["wbc"]}
    with pytest.raises(SourceError, match="unknown field"):
        source_from_mapping({**base, "colour": "red"}, "x.yaml")
    with pytest.raises(SourceError, match="missing field"):
        source_from_mapping({"name": "x"}, "x.yaml")


def test_label_map_version_follows_the_map() -> None:
    assert a_source().label_map_version == a_source().label_map_version
    assert a_source().label_map_version != a_source(label_map={"benign": "Pre"}).label_map_version


def test_folder_layout_reads_only_labelled_visible_files() -> None:
    entries = folder_entries(["README.md", "Early/a.jpg", "Early/.DS_Store", ".git/x", "Pre/sub/b.png"])
    readable = [(e.path, e.source_label) for e in entries if e.readable]
    assert readable == [("Early/a.jpg", "Early"), ("Pre/sub/b.png", "Pre")]
    assert len(entries) == 5  # the others are rows with the reason they are not read (test_sources_hostile.py)


@pytest.mark.parametrize("path", ["../x.jpg", "a/../../x.jpg", "/etc/passwd", "C:/x.jpg", "..", ""])
def test_paths_leaving_the_root_are_unsafe(path: str) -> None:
    assert safe_relative(path) is None


def test_csv_layout_reads_labels_patients_and_flags_traversal() -> None:
    text = "path,label,patient_id\nimgs/a b é.jpg,Early,p1\n../x.jpg,Pre,\n"
    ok, bad = csv_entries(text, "m.csv")
    assert (ok.path, ok.source_label, ok.patient_id, ok.path_error) == ("imgs/a b é.jpg", "Early", "p1", None)
    assert bad.path == "../x.jpg" and "leaves the source folder" in bad.path_error


def test_csv_without_required_columns_is_refused() -> None:
    with pytest.raises(SourceError, match="path,label"):
        csv_entries("file,class\na.jpg,Early\n", "m.csv")


def test_symlink_out_of_the_folder_is_flagged(tmp_path: Path) -> None:
    root = tmp_path / "src"
    (root / "Early").mkdir(parents=True)
    (root / "Early" / "in.jpg").write_bytes(b"x")
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(b"y")
    (root / "Early" / "out.jpg").symlink_to(secret)
    files = {f.path: f for f in list_files(a_source(location=str(root)), LocalReader(root))}
    assert files["Early/in.jpg"].path_error is None
    assert "outside the source folder" in files["Early/out.jpg"].path_error


def test_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="does not exist"):
        LocalReader(tmp_path / "nope")
