"""Ingest and snapshots end to end: real SeaweedFS S3, real all_taleqani images, the CLI."""

from __future__ import annotations

import hashlib
import io
import shutil
from pathlib import Path

import pytest
from PIL import Image

from pipelines.data.ingest import ingest_source
from pipelines.data.manifests import accepted_rows
from pipelines.data.snapshot import load_snapshot
from pipelines.data.sources import Source, default_label_map
from pipelines.io import layout
from pipelines.io.storage import ObjectStore
from tests.integration.data.commands import TASK, add_source, cli, key_of

pytestmark = pytest.mark.usefixtures("stack")
CLASSES = ("Benign", "Early", "Pre", "Pro")
RAW_DIR = f"{layout.RAW_SHARDS}/"


@pytest.fixture(scope="module")
def copy_real(shared_data: Path, tmp_path_factory: pytest.TempPathFactory):
    """Copy ``per_class`` all_taleqani images per class (from ``offset``) into a fresh folder tree."""

    def copy(per_class: int, offset: int = 0) -> Path:
        root = tmp_path_factory.mktemp("taleqani")
        for label in CLASSES:
            (root / label).mkdir()
            for f in sorted((shared_data / "all_taleqani" / label).iterdir())[offset : offset + per_class]:
                shutil.copyfile(f, root / label / f.name)
        return root

    return copy


def shas_in(root: Path) -> dict[str, str]:
    return {hashlib.sha256(p.read_bytes()).hexdigest(): p.parent.name for p in sorted(root.rglob("*.jpg"))}


def test_ingest_real_images_then_reingest_adds_nothing(capsys, store: ObjectStore, copy_real) -> None:
    root = copy_real(25)  # 100 files; Pro 011-025 holds exact byte-duplicate pairs
    unique = shas_in(root)
    add_source(capsys, "tq-a", root)

    code, first = cli(capsys, "ingest", "tq-a", "--date", "2026-01-02")
    assert code == 0 and first["status"] == "accepted", first
    assert first["files_seen"] == 100 and first["accepted"] == len(unique)
    assert first["rejected"] == 100 - len(unique) > 0
    assert {r["reason"] for r in first["rejections"]} == {"duplicate"}
    rows = accepted_rows(store, "tq-a")
    assert set(rows["sha256"]) == set(unique) and all(store.exists(k) for k in rows["key"])
    assert all(k == layout.raw_key(sha, "jpg") for sha, k in zip(rows["sha256"], rows["key"], strict=True))
    manifest = store.get_parquet(key_of(store, first["manifest"]))
    assert len(manifest) == 100 and manifest["phash"].str.len().eq(16).sum() == 100
    report = layout.validation_report_prefix("2026-01-02", first["batch_id"])
    assert first["data_docs"] == store.uri(layout.data_docs_key(report))
    assert b"<html" in store.get_bytes(key_of(store, first["data_docs"])).lower()

    raw_before, batches_before = store.list(RAW_DIR), store.list(layout.batches_dir("tq-a"))
    code, again = cli(capsys, "ingest", "tq-a")
    assert code == 0 and again["status"] == "nothing_new" and again["batch_id"] is None
    assert again["already_ingested"] == 100 and "no batch" in again["message"]
    assert store.list(RAW_DIR) == raw_before and store.list(layout.batches_dir("tq-a")) == batches_before


def test_planted_bad_inputs_are_rejected_with_reasons_and_the_rest_accepted(
    capsys, store: ObjectStore, copy_real, bad_inputs: dict[str, bytes], tmp_path: Path, shared_data: Path
) -> None:
    good = copy_real(6, offset=300)  # 24 good images (Benign has 384, so offset 300 exists everywhere)
    root = tmp_path / "lab"
    shutil.copytree(good, root / "imgs")
    (tmp_path / "outside.jpg").write_bytes((good / "Pre").iterdir().__next__().read_bytes())
    unicode_name = "imgs/Pre/früh ämter 01.jpg"
    shutil.copyfile(shared_data / "all_taleqani" / "Pre" / "WBC-Malignant-Pre-360.jpg", root / unicode_name)
    lines = [f"{p.relative_to(root).as_posix()},{p.parent.name}" for p in sorted((root / "imgs").rglob("*.jpg"))]
    for name, data in bad_inputs.items():
        (root / "imgs" / name).write_bytes(data)
        lines.append(f"imgs/{name},Pre")
    lines += ["imgs/Early/../Pre/" + next((good / "Pre").iterdir()).name + ",Pre", "../outside.jpg,Pre"]
    lines += [f"imgs/Benign/{next((good / 'Benign').iterdir()).name},Leukaemia?"]
    (root / "manifest.csv").write_text("path,label\n" + "\n".join(lines) + "\n", encoding="utf-8")
    add_source(capsys, "tq-planted", root, "--layout", "csv")

    code, out = cli(capsys, "ingest", "tq-planted")
    assert code == 0 and out["status"] == "accepted", out
    reasons = {r["path"]: r["reason"] for r in out["rejections"]}
    assert reasons["imgs/empty.jpg"] == "empty"
    assert reasons["imgs/notes.jpg"] == "not_an_image"
    assert reasons["imgs/truncated.jpg"] == "truncated"
    assert reasons["imgs/corrupt.jpg"] in {"corrupt", "truncated"}
    assert reasons["imgs/bomb.png"] == "too_many_pixels"
    assert reasons["imgs/grey.png"] == reasons["imgs/rgba.png"] == "not_rgb"
    assert reasons["../outside.jpg"] == "path_traversal"
    assert "unknown_label" in reasons.values() and "duplicate" in reasons.values()
    assert unicode_name not in reasons and out["accepted"] == 25
    manifest = store.get_parquet(key_of(store, out["manifest"])).set_index("path")
    assert manifest.loc["../outside.jpg", "sha256"] is None  # never read
    truncated = manifest.loc["imgs/truncated.jpg"]
    kept = layout.rejected_original_key("tq-planted", out["batch_id"], truncated["sha256"], "jpg")
    assert truncated["key"] == kept and store.exists(kept)


def test_files_beyond_the_memory_budget_are_reread_verified_and_stored(
    settings, store: ObjectStore, shared_data: Path, bad_inputs: dict[str, bytes], tmp_path: Path
) -> None:
    """keep_bytes=0: no file's bytes stay in memory after the scan, so every upload re-reads its file."""
    pro = sorted((shared_data / "all_taleqani" / "Pro").iterdir())[500:503]
    (tmp_path / "Pro").mkdir()
    for f in pro:
        shutil.copyfile(f, tmp_path / "Pro" / f.name)
    shutil.copyfile(pro[0], tmp_path / "Pro" / "zz-copy.jpg")
    (tmp_path / "Pro" / "truncated.jpg").write_bytes(bad_inputs["truncated.jpg"])
    source = Source("tq-spill", str(tmp_path), "folders", default_label_map([TASK]), (TASK,))
    raw_before = set(store.list(RAW_DIR))
    report = ingest_source(source, settings, store, run_date="2026-01-03", keep_bytes=0)
    assert report.status == "accepted" and report.accepted == 3
    assert report.new_objects == len(set(store.list(RAW_DIR)) - raw_before) > 0
    assert {r["reason"] for r in report.rejections} == {"duplicate", "truncated"}
    manifest = store.get_parquet(key_of(store, report.manifest)).set_index("path")
    for f in pro:
        assert store.get_bytes(manifest.loc[f"Pro/{f.name}", "key"]) == f.read_bytes()
    assert store.get_bytes(manifest.loc["Pro/truncated.jpg", "key"]) == bad_inputs["truncated.jpg"]


def test_cross_source_duplicates_are_not_reuploaded_and_conflicts_name_both_labels(
    capsys, store: ObjectStore, shared_data: Path, tmp_path: Path
) -> None:
    early = sorted((shared_data / "all_taleqani" / "Early").iterdir())  # tq-a holds Early 001-025
    for label, files in {"Early": early[:2], "Pre": early[2:3]}.items():
        (tmp_path / label).mkdir()
        for f in files:
            shutil.copyfile(f, tmp_path / label / f.name)
    add_source(capsys, "tq-dup", tmp_path)
    _, out = cli(capsys, "ingest", "tq-dup")
    assert out["accepted"] == 2 and out["cross_source_duplicates"] == 3 and out["new_objects"] == 0
    (conflict,) = out["rejections"]
    assert conflict["reason"] == "label_conflict"
    assert "'Pre'" in conflict["detail"] and "'Early'" in conflict["detail"] and "in source" in conflict["detail"]


def test_s3_landing_zone_source(capsys, settings, store: ObjectStore, shared_data: Path) -> None:
    landing = ObjectStore.from_settings(settings, bucket="leukops-landing")
    landing.ensure_bucket()
    for label in ("Pre", "Pro"):
        for f in sorted((shared_data / "all_taleqani" / label).iterdir())[400:402]:
            landing.put_bytes(f"lab-7/{label}/{f.name}", f.read_bytes())
    add_source(capsys, "tq-landing", "s3://leukops-landing/lab-7")
    _, out = cli(capsys, "ingest", "tq-landing")
    assert out["status"] == "accepted" and out["accepted"] == 4
    assert set(accepted_rows(store, "tq-landing")["label"]) == {"Pre", "Pro"}


def reencoded(data: bytes, quality: int, size: int) -> bytes:
    image = Image.open(io.BytesIO(data)).convert("RGB").resize((size, size), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def test_snapshot_split_is_stable_copies_follow_originals_and_holdout_stays_out(
    capsys, store: ObjectStore, copy_real, tmp_path: Path
) -> None:
    code, first = cli(capsys, "snapshot", "--task", TASK)
    assert code == 0 and first["dataset_version"] and set(first["counts"]) == {"train", "val", "test"}
    before = load_snapshot(store, TASK).frame.set_index("sha256")["split"]
    assert load_snapshot(store, TASK).version == first["dataset_version"] and len(before) == first["images"]

    add_source(capsys, "tq-b", copy_real(15, offset=200))
    assert cli(capsys, "ingest", "tq-b")[1]["status"] == "accepted"
    _, second = cli(capsys, "snapshot", "--task", TASK)
    after = load_snapshot(store, TASK, second["dataset_version"]).frame.set_index("sha256")["split"]
    assert second["images"] == len(after) > len(before)
    assert (after.loc[before.index] == before).all(), "an image changed split when a source was added"

    originals = accepted_rows(store, "tq-a").drop_duplicates("sha256").head(24)
    copies = tmp_path / "copies"
    expected = {}
    for i, row in enumerate(originals.itertuples()):
        data = reencoded(store.get_bytes(row.key), quality=(60, 75, 90)[i % 3], size=(224, 216, 200)[i % 3])
        (copies / row.label).mkdir(parents=True, exist_ok=True)
        (copies / row.label / f"copy-{i}.jpg").write_bytes(data)
        expected[hashlib.sha256(data).hexdigest()] = after[row.sha256]
    add_source(capsys, "tq-reencoded", copies)
    assert cli(capsys, "ingest", "tq-reencoded")[1]["accepted"] == 24
    _, third = cli(capsys, "snapshot", "--task", TASK)
    splits = load_snapshot(store, TASK).frame.set_index("sha256")["split"]
    assert {sha: splits[sha] for sha in expected} == expected

    holdout = copy_real(5, offset=200)  # bytes tq-b already brought into training
    add_source(capsys, "tq-holdout", holdout, "--role", "holdout")
    assert cli(capsys, "ingest", "tq-holdout")[1]["status"] == "accepted"
    _, fourth = cli(capsys, "snapshot", "--task", TASK)
    final = load_snapshot(store, TASK).frame
    assert not set(shas_in(holdout)) & set(final["sha256"])
    assert fourth["excluded_holdout"] - third["excluded_holdout"] == len(shas_in(holdout)) == 20
    assert any("holdout" in w and "excluded from training" in w for w in fourth["warnings"])
    assert fourth["images"] == third["images"] - 20
