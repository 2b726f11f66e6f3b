"""Labels never change silently, end to end on real S3: in-batch conflicts held until resolved, relabels
in new batches, failures recorded once, in-flight labels of other ingests, holdout near-duplicates."""

from __future__ import annotations

import hashlib
import io
import shutil
from pathlib import Path

import pytest
from PIL import Image

from pipelines.cli import main
from pipelines.data.snapshot import load_snapshot
from pipelines.io import layout
from pipelines.io.storage import ObjectStore
from tests.integration.data.commands import TASK, add_source, cli, key_of

pytestmark = pytest.mark.usefixtures("stack")


def images(shared_data: Path, label: str, start: int, n: int) -> list[Path]:
    """Images no other data test ingests (the classes have 384..785 files; other tests stay below 510)."""
    return sorted((shared_data / "all_taleqani" / label).iterdir())[start : start + n]


def planted(root: Path, files: dict[str, Path]) -> Path:
    for relative, original in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(original, root / relative)
    return root


def sha_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_same_bytes_under_two_labels_are_held_out_until_resolved(
    capsys, store: ObjectStore, shared_data: Path, tmp_path: Path
) -> None:
    pro, benign = images(shared_data, "Pro", 620, 3), images(shared_data, "Benign", 370, 3)
    files = {f"Pro/{p.name}": p for p in pro} | {f"Benign/{p.name}": p for p in benign}
    root = planted(tmp_path / "lab", files | {"Benign/zz-same-as-pro.jpg": pro[0]})
    add_source(capsys, "lb-conflict", root)
    code, out = cli(capsys, "ingest", "lb-conflict")
    assert code == 0 and out["status"] == "accepted" and out["accepted"] == 5, out
    conflicts = {r["path"]: r for r in out["rejections"]}
    assert set(conflicts) == {f"Pro/{pro[0].name}", "Benign/zz-same-as-pro.jpg"}
    for rejection in conflicts.values():
        assert rejection["reason"] == "label_conflict"
        assert rejection["detail"].startswith("label conflict: Benign vs Pro"), rejection

    sha = sha_of(pro[0])
    _, held = cli(capsys, "snapshot", "--task", TASK)
    assert sha not in set(load_snapshot(store, TASK).frame["sha256"])
    assert sha in held["labels"]["held_shas"] and any("label conflict" in w for w in held["warnings"])
    _, listed = cli(capsys, "conflict", "list")
    (entry,) = [c for c in listed["conflicts"] if c["sha256"] == sha]
    assert not entry["resolved"] and {r["label"] for r in entry["rows"]} == {"Pro", "Benign"}

    assert main(["conflict", "resolve", sha, "--label", "Lymph", "--reason", "x"]) == 2
    assert "'Lymph' is not a class" in capsys.readouterr().err
    code, record = cli(
        capsys, "conflict", "resolve", sha, "--label", "Pro", "--reason", "re-read by two haematologists"
    )
    assert code == 0 and record["resolved_by"] and record["labels_seen"] == ["Benign", "Pro"]
    stored = store.get_json(layout.conflict_resolution_key(sha, record["resolution_id"]))
    assert stored["reason"] == "re-read by two haematologists" and stored["label"] == "Pro"
    _, resolved = cli(capsys, "snapshot", "--task", TASK)
    frame = load_snapshot(store, TASK).frame.set_index("sha256")
    assert frame.loc[sha, "label"] == "Pro" and frame.loc[sha, "resolution"] == record["resolution_id"]
    assert sha not in resolved["labels"]["held_shas"] and resolved["images"] == held["images"] + 1


def test_a_moved_file_and_a_corrected_label_map_relabel_in_new_batches(
    capsys, store: ObjectStore, shared_data: Path, tmp_path: Path
) -> None:
    pro, early = images(shared_data, "Pro", 624, 3), images(shared_data, "Early", 760, 3)
    files = {f"Pro/{p.name}": p for p in pro} | {f"Early/{p.name}": p for p in early}
    root = planted(tmp_path / "lab", files | {f"Prog/{p.name}": p for p in images(shared_data, "Pro", 628, 2)})
    add_source(capsys, "lb-relabel", root)
    _, first = cli(capsys, "ingest", "lb-relabel")
    assert first["accepted"] == 6 and {r["reason"] for r in first["rejections"]} == {"unknown_label"}
    first_key = key_of(store, first["manifest"])
    first_manifest = store.get_bytes(first_key)

    (root / "Early").joinpath(pro[0].name).write_bytes((root / "Pro" / pro[0].name).read_bytes())
    (root / "Pro" / pro[0].name).unlink()  # a data engineer moves a mislabelled image to its class folder
    code, moved = cli(capsys, "ingest", "lb-relabel")
    assert code == 0 and moved["status"] == "accepted" and moved["accepted"] == 1, moved
    assert moved["batch_id"] != first["batch_id"] and store.get_bytes(first_key) == first_manifest
    row = store.get_parquet(key_of(store, moved["manifest"])).iloc[0]
    assert (row["label"], row["previous_label"], row["relabel_of"]) == ("Early", "Pro", first["batch_id"])
    assert row["revision"] == 2 and row["width"] > 0  # the facts of known bytes are carried over
    _, summary = cli(capsys, "snapshot", "--task", TASK)
    assert load_snapshot(store, TASK).frame.set_index("sha256").loc[sha_of(pro[0]), "label"] == "Early"
    (relabel,) = [r for r in summary["labels"]["relabels"] if r["sha256"] == sha_of(pro[0])]
    assert (relabel["from"], relabel["to"], relabel["batch_id"]) == ("Pro", "Early", moved["batch_id"])

    mapping = ["Pro=Pro", "Prog=Pro", "Early=Early", "Pre=Pre", "Benign=Benign"]
    add_source(capsys, "lb-relabel", root, "--replace", "--label-map", *mapping)
    _, remapped = cli(capsys, "ingest", "lb-relabel")
    assert remapped["status"] == "accepted" and remapped["rejected"] == 0 and remapped["accepted"] == 8, remapped
    assert cli(capsys, "ingest", "lb-relabel")[1]["status"] == "nothing_new"

    cli(capsys, "snapshot", "--task", TASK)
    frame = load_snapshot(store, TASK).frame.set_index("sha256")
    assert frame.loc[sha_of(pro[0]), "label"] == "Early"
    assert frame.loc[sha_of(images(shared_data, "Pro", 628, 1)[0]), "label"] == "Pro"


def test_a_refused_path_is_recorded_once_not_added_to_every_later_batch(
    capsys, store: ObjectStore, shared_data: Path, tmp_path: Path
) -> None:
    pre = images(shared_data, "Pre", 760, 3)
    root = planted(tmp_path / "lab", {f"imgs/{p.name}": p for p in pre[:2]})
    (root / "manifest.csv").write_text(f"path,label\nimgs/{pre[0].name},Pre\nimgs/{pre[1].name},Pre\n../x.jpg,Pre\n")
    add_source(capsys, "lb-failures", root, "--layout", "csv")
    _, first = cli(capsys, "ingest", "lb-failures")
    assert first["accepted"] == 2 and [r["reason"] for r in first["rejections"]] == ["path_traversal"]
    shutil.copyfile(pre[2], root / "imgs" / pre[2].name)
    with (root / "manifest.csv").open("a") as csv:
        csv.write(f"imgs/{pre[2].name},Pre\n")
    _, second = cli(capsys, "ingest", "lb-failures")
    assert second["accepted"] == 1 and second["rejected"] == 0 and second["already_ingested"] == 3, second


def test_a_label_another_ingest_has_in_flight_is_a_conflict(
    capsys, store: ObjectStore, shared_data: Path, tmp_path: Path
) -> None:
    pro = images(shared_data, "Pro", 631, 3)
    intent = {"source": "lb-elsewhere", "batch_id": "b-in-flight", "labels": {sha_of(pro[0]): "Benign"}}
    inflight = layout.inflight_batch_key("lb-elsewhere", "b-in-flight")
    store.put_json(inflight, intent)  # another lab's ingest between its plan and its publish
    try:
        add_source(capsys, "lb-concurrent", planted(tmp_path / "lab", {f"Pro/{p.name}": p for p in pro}))
        _, out = cli(capsys, "ingest", "lb-concurrent")
    finally:
        store.delete(inflight)
    (rejection,) = out["rejections"]
    assert rejection["reason"] == "label_conflict" and "'lb-elsewhere'" in rejection["detail"], out
    assert out["accepted"] == 2 and store.list(layout.inflight_dir()) == []  # its own intent is gone


def test_reencoded_copies_of_holdout_images_are_excluded_and_counted(
    capsys, store: ObjectStore, shared_data: Path, tmp_path: Path
) -> None:
    early = images(shared_data, "Early", 770, 4)
    add_source(capsys, "lb-train", planted(tmp_path / "train", {f"Early/{p.name}": p for p in early}))
    assert cli(capsys, "ingest", "lb-train")[1]["accepted"] == 4
    _, before = cli(capsys, "snapshot", "--task", TASK)
    copies = tmp_path / "holdout" / "Early"
    copies.mkdir(parents=True)
    for path in early[:2]:
        image = Image.open(path).convert("RGB").resize((200, 200), Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=70)
        (copies / path.name).write_bytes(buffer.getvalue())
    add_source(capsys, "lb-holdout", copies.parent, "--role", "holdout")
    assert cli(capsys, "ingest", "lb-holdout")[1]["accepted"] == 2
    _, after = cli(capsys, "snapshot", "--task", TASK)
    kept = set(load_snapshot(store, TASK).frame["sha256"])
    assert not {sha_of(p) for p in early[:2]} & kept and {sha_of(p) for p in early[2:]} <= kept
    near = after["excluded_holdout_near_duplicates"] - before["excluded_holdout_near_duplicates"]
    assert near >= 2 and after["images"] == before["images"] - near
