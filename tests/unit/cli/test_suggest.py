"""`leukops suggest-labels` on a small synthetic folder with a tiny model: the CSV the lab gets."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pipelines.cli import main
from pipelines.cli import suggest as suggest_cli
from pipelines.core.taxonomy import get_task
from pipelines.model.backbones import create_backbone
from pipelines.model.bundle import ModelBundle, read_bundle, save_bundle
from pipelines.model.preprocess import preprocessing_from

TASK = "wbc"


@pytest.fixture
def tiny_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    torch.manual_seed(0)
    classes = get_task(TASK).classes
    backbone = create_backbone("custom_cnn", len(classes), pretrained=False, image_size=32, head_hidden=16)
    bundle = ModelBundle.for_backbone(TASK, classes, backbone, preprocessing_from(backbone.data_config))
    save_bundle(bundle, backbone.model.state_dict(), tmp_path / "bundle")
    loaded = read_bundle(tmp_path / "bundle", run_id="run-tiny")
    asked = []

    def load(settings, model, task):
        asked.append((model, task))
        return loaded, None

    monkeypatch.setattr(suggest_cli, "load_ranking_model", load)
    return asked


def _png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def lab_folder(tmp_path: Path) -> Path:
    root = tmp_path / "new-lab"
    (root / "day1").mkdir(parents=True)
    for i in range(6):
        (root / "day1" / f"cell{i}.png").write_bytes(_png(i))
    (root / "copy-of-cell0.png").write_bytes(_png(0))
    (root / "empty.jpg").write_bytes(b"")
    (root / "notes.jpg").write_text("not an image")
    (root / ".thumbs.png").write_bytes(_png(9))
    return root


def test_suggest_labels_writes_one_row_per_file_with_ranks_and_reasons(
    tiny_model, lab_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "lab" / "to-label.csv"
    code = main(["suggest-labels", "--folder", str(lab_folder), "--n", "3", "--task", TASK, "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0 and f"wrote {out.resolve()}" in printed
    assert tiny_model == [("champion", TASK)]

    frame = pd.read_csv(out)
    assert list(frame.columns) == list(suggest_cli.CSV_COLUMNS)
    assert len(frame) == 10  # every file, good or bad, is one row
    suggested = frame[frame["status"] == "suggested"]
    assert suggested["rank"].tolist() == [1, 2, 3]
    assert suggested["predicted_class"].isin(get_task(TASK).classes).all()
    assert (suggested["entropy"] > 0).all() and suggested["margin"].between(0, 1).all()
    assert suggested["top2"].str.contains(r"\|").all()
    assert suggested["why"].iloc[0].startswith("most uncertain image")
    assert (frame["status"] == "ranked lower").sum() == 3

    why = frame.set_index("item")["why"]
    duplicate = {"copy-of-cell0.png", "day1/cell0.png"}
    assert sum("same bytes as" in str(why[item]) for item in duplicate) == 1
    assert why["empty.jpg"].startswith("not read: empty")
    assert why["notes.jpg"].startswith("not read:")
    assert why[".thumbs.png"] == "hidden file or folder: not read"
    assert set(frame.loc[frame["status"] == "skipped", "item"]) == {
        "empty.jpg",
        "notes.jpg",
        ".thumbs.png",
        *(duplicate - set(frame.loc[frame["status"] != "skipped", "item"])),
    }


def test_json_summary_counts_what_the_csv_holds(tiny_model, lab_folder: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "s.csv"
    args = ["suggest-labels", "--folder", str(lab_folder), "--n", "20", "--task", TASK, "--out", str(out), "--json"]
    assert main(args) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["files"], data["suggested"], data["ranked_lower"], data["skipped"]) == (10, 6, 0, 4)
    assert data["csv"] == str(out.resolve()) and data["run_id"] == "run-tiny"


def test_a_folder_with_no_image_writes_the_reasons_and_suggests_nothing(tiny_model, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"\xff\xd8 truncated")
    out = tmp_path / "none.csv"
    assert main(["suggest-labels", "--folder", str(folder), "--task", TASK, "--out", str(out)]) == 0
    frame = pd.read_csv(out)
    assert frame["status"].tolist() == ["skipped"] and frame["why"].iloc[0].startswith("not read:")


def test_bad_arguments_are_one_line_on_stderr(tiny_model, tmp_path: Path, capsys) -> None:
    assert main(["suggest-labels", "--folder", str(tmp_path), "--n", "0", "--task", TASK]) == 2
    assert "--n must be at least 1" in capsys.readouterr().err
    assert main(["suggest-labels", "--requests", "2026-01-01..2026-01-02"]) == 2
    assert "pass --task" in capsys.readouterr().err
    assert main(["suggest-labels", "--folder", str(tmp_path / "missing"), "--task", TASK]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_registered_source_skips_the_images_it_already_labelled(
    tiny_model, lab_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    import hashlib

    from pipelines.core.settings import get_settings
    from pipelines.data.manifests import manifest_frame
    from pipelines.data.sources import Source, default_label_map, save_source
    from pipelines.io import layout
    from pipelines.io.storage import ObjectStore
    from tests.unit.io.memory_bucket import MemoryBucket

    monkeypatch.setenv("LEUKOPS_SOURCES_DIR", str(tmp_path / "sources"))
    get_settings.cache_clear()  # settings are read once: read them again with this sources dir
    try:
        save_source(Source("lab-c", str(lab_folder), "folders", default_label_map([TASK]), (TASK,)), get_settings())
        bucket = MemoryBucket()
        sha = hashlib.sha256(_png(1)).hexdigest()
        row = {"row": 0, "source": "lab-c", "sha256": sha, "label": "monocyte", "status": "accepted", "revision": 0}
        bucket.put_parquet(layout.batch_manifest_key("lab-c", "b1"), manifest_frame([row]))
        monkeypatch.setattr(ObjectStore, "from_settings", classmethod(lambda cls, settings, **_: bucket))
        out = tmp_path / "c.csv"
        assert main(["suggest-labels", "--source", "lab-c", "--n", "2", "--out", str(out)]) == 0
    finally:
        get_settings.cache_clear()
    assert tiny_model[-1] == ("champion", TASK)  # the source's only task
    why = pd.read_csv(out).set_index("item")["why"]
    assert why["day1/cell1.png"] == "already labelled 'monocyte' in the source's accepted batches"
