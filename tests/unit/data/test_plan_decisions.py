"""Which files form a batch: decision keys (sha, label, label-map version), relabels, in-batch label
conflicts, retried read errors and failures recorded once."""

from __future__ import annotations

import pandas as pd

from pipelines.data.decisions import decision_key, failure_key, newest_decisions, source_history
from pipelines.data.manifests import manifest_frame
from pipelines.data.plan import BatchPlan, labels_in_batch, make_batch_id, place, select_files
from pipelines.data.scan import HashedFile
from pipelines.data.sources import Source, SourceFile
from pipelines.io import layout

SOURCE = Source("lab", "/data/lab", "folders", {"Pro": "Pro", "Benign": "Benign"}, ("all_subtypes",))
MAP = SOURCE.label_map_version
A, B, C = "a" * 64, "b" * 64, "c" * 64


def manifest(*rows: dict) -> pd.DataFrame:
    base = {"source": "lab", "label_map_version": MAP, "status": "accepted", "revision": 1, "format": "JPEG"}
    return manifest_frame([{"row": i, **base, **r} for i, r in enumerate(rows)])


def hashed(path: str, sha: str | None, **kw) -> HashedFile:
    return HashedFile(SourceFile(path, path.split("/")[0], path_error=kw.pop("path_error", None)), sha, **kw)


def test_same_bytes_under_two_labels_in_one_batch_reject_both_rows_and_neither_label_wins() -> None:
    files = [hashed("Pro/a.jpg", A), hashed("Pro/z.jpg", B), hashed("Pro/zz.jpg", B), hashed("Benign/x.jpg", A)]
    files = sorted(files, key=lambda h: h.entry.path)
    first = {A: (0, "Benign/x.jpg"), B: (2, "Pro/z.jpg")}
    plan = BatchPlan(SOURCE, "b1", files, first, {}, frozenset(), labels_in_batch(files, SOURCE.label_map))

    def placed(row: int, sha: str, label: str) -> tuple[dict, bool]:
        return place(plan, row, {"label": label, "ext": "jpg", "format": "JPEG"}, sha)

    benign, benign_upload = placed(0, A, "Benign")
    pro, pro_upload = placed(1, A, "Pro")
    for record in (benign, pro):
        assert record["label_conflict"].startswith("label conflict: Benign vs Pro")
        assert "'Pro/a.jpg'" in record["label_conflict"] and "duplicate_of" not in record
    assert benign_upload and not pro_upload  # the bytes are stored once, by the sha's first row
    copy, _ = placed(3, B, "Pro")  # same bytes, same label: still a plain duplicate
    assert copy["duplicate_of"] == "Pro/z.jpg" and copy.get("label_conflict") is None


def test_a_file_counts_as_ingested_by_its_decision_key_not_its_sha() -> None:
    history = source_history(manifest({"sha256": A, "label": "Pro", "batch_id": "b1", "path": "Pro/a.jpg"}))
    assert history.is_known(decision_key(A, "Pro", MAP), A)
    unchanged, _ = select_files([hashed("Pro/a.jpg", A)], history, SOURCE)
    assert unchanged == []
    moved, keys = select_files([hashed("Benign/a.jpg", A)], history, SOURCE)  # moved to the right folder
    assert [h.entry.path for h in moved] == ["Benign/a.jpg"] and keys == [decision_key(A, "Benign", MAP)]
    assert history.replaced(A) == {"revision": 2, "relabel_of": "b1", "previous_label": "Pro"}
    assert history.replaced(B) == {"revision": 1, "relabel_of": None, "previous_label": None}
    remapped = Source("lab", "/data/lab", "folders", {"Pro": "Pro", "Benign": "Benign", "x": "Pro"}, SOURCE.tasks)
    assert remapped.label_map_version != MAP
    assert [h.entry.path for h in select_files([hashed("Pro/a.jpg", A)], history, remapped)[0]] == ["Pro/a.jpg"]


def test_a_new_label_for_known_bytes_brings_every_file_of_them_into_the_batch() -> None:
    history = source_history(manifest({"sha256": A, "label": "Pro", "batch_id": "b1", "path": "Pro/a.jpg"}))
    files, _ = select_files([hashed("Pro/a.jpg", A), hashed("Benign/copy.jpg", A)], history, SOURCE)
    assert [h.entry.path for h in files] == ["Benign/copy.jpg", "Pro/a.jpg"]  # both labels seen together


def test_transient_read_errors_are_retried_and_recorded_failures_are_not_added_again() -> None:
    rows = manifest(
        {"sha256": A, "label": "Pro", "batch_id": "b1", "path": "Pro/a.jpg", "read_error": "changed while read"},
        {"sha256": None, "label": "Pro", "batch_id": "b1", "path": "Pro/gone.jpg", "read_error": "could not read"},
        {"sha256": None, "label": "Pro", "batch_id": "b1", "path": "../x.jpg", "path_error": "outside the source"},
    )
    history = source_history(rows)
    assert not history.is_known(decision_key(A, "Pro", MAP), A) and A not in history.examined()
    scanned = [
        hashed("Pro/a.jpg", A),  # its re-read failed last time: a decision was never made
        hashed("Pro/gone.jpg", None, read_error="could not read"),
        hashed("../x.jpg", None, path_error="outside the source"),
        hashed("Pro/new-failure.jpg", None, read_error="could not read"),
    ]
    files, keys = select_files(scanned, history, SOURCE)
    assert [h.entry.path for h in files] == ["Pro/a.jpg", "Pro/new-failure.jpg"]
    assert keys[1] == failure_key("Pro/new-failure.jpg", "could not read")
    assert select_files(scanned[1:3], history, SOURCE) == ([], [])  # nothing new: no batch


def test_a_relabel_gets_its_own_batch_id_and_the_newest_revision_wins() -> None:
    pro = make_batch_id("lab", [decision_key(A, "Pro", MAP)], MAP, "1")
    benign = make_batch_id("lab", [decision_key(A, "Benign", MAP)], MAP, "1")
    assert pro != benign  # the old manifest is never overwritten
    rows = manifest(
        {"sha256": A, "label": "Pro", "batch_id": pro, "path": "Pro/a.jpg"},
        {"sha256": A, "label": "Benign", "batch_id": benign, "path": "Benign/a.jpg", "revision": 2},
        {"sha256": B, "label": "Pro", "batch_id": pro, "path": "Pro/b.jpg", "revision": None},  # before revisions
    )
    newest = newest_decisions(rows).set_index("sha256")
    assert newest.loc[A, "label"] == "Benign" and newest.loc[B, "label"] == "Pro"


def test_an_image_accepted_elsewhere_but_only_in_flight_is_uploaded_here() -> None:
    files = [hashed("Pro/a.jpg", A)]
    elsewhere = {A: {"label": "Benign", "source": "lab-b", "key": None}}
    plan = BatchPlan(SOURCE, "b1", files, {A: (0, "Pro/a.jpg")}, elsewhere, frozenset(), {})
    record, upload = place(plan, 0, {"label": "Pro", "ext": "jpg", "format": "JPEG"}, A)
    assert record["key"] == layout.raw_key(A, "jpg") and upload
    assert "'Benign'" in record["label_conflict"] and "'lab-b'" in record["label_conflict"]
