"""Label conflicts: held out of snapshots until resolved per image, resolutions audited and scoped."""

from __future__ import annotations

import pandas as pd
import pytest

from pipelines.data.conflicts import ConflictError, conflict_status, label_decisions, make_resolution
from pipelines.data.decisions import newest_decisions
from pipelines.data.manifests import manifest_frame

A, B, C = "a" * 64, "b" * 64, "c" * 64
CONFLICT = "label conflict: Pro vs Benign (same bytes at 'Pro/a.jpg', 'Benign/a.jpg')"


def rows(*specs: dict) -> pd.DataFrame:
    base = {"source": "lab", "batch_id": "b1", "status": "accepted", "revision": 1, "label_map_version": "m"}
    return manifest_frame([{"row": i, **base, **s} for i, s in enumerate(specs)])


def conflicted() -> pd.DataFrame:
    reject = {"status": "rejected", "reason": "label_conflict", "detail": CONFLICT, "label_conflict": CONFLICT}
    return rows(
        {"sha256": A, "label": "Pro", "path": "Pro/a.jpg", **reject},
        {"sha256": A, "label": "Benign", "path": "Benign/a.jpg", **reject},
        {"sha256": B, "label": "Pro", "path": "Pro/b.jpg"},
        {"sha256": C, "label": "Early", "path": "Early/c.jpg", "relabel_of": "b0", "previous_label": "Pre"},
    )


def resolution(status: dict, label: str = "Pro", at: str = "2026-12-01T10:00:00+00:00") -> dict:
    return make_resolution(
        A, label, "re-read by two haematologists", actor="ana", at=at, status=status, classes={"Pro", "Benign"}
    )


def test_an_unresolved_conflict_keeps_the_image_out_and_the_audit_counts_it() -> None:
    frame = conflicted()
    status = conflict_status(frame, {})
    assert set(status) == {A} and not status[A]["resolved"] and len(status[A]["rows"]) == 2
    used, audit = label_decisions(newest_decisions(frame), status)
    assert set(used["sha256"]) == {B, C}
    assert audit["conflicts_held"] == 1 and audit["held_shas"] == [A]
    (relabel,) = audit["relabels"]
    assert audit["relabelled"] == 1 and (relabel["sha256"], relabel["from"], relabel["to"]) == (C, "Pre", "Early")


def test_a_resolution_labels_the_image_and_a_later_conflict_holds_it_again() -> None:
    frame = conflicted()
    record = resolution(conflict_status(frame, {})[A])
    assert record["resolved_by"] == "ana" and record["labels_seen"] == ["Benign", "Pro"]
    assert record["resolves"] == ["lab/b1/0", "lab/b1/1"] and record["resolution_id"].startswith("20261201100000")
    status = conflict_status(frame, {A: [record]})
    used, audit = label_decisions(newest_decisions(frame), status)
    resolved = used[used["sha256"] == A]
    assert set(resolved["label"]) == {"Pro"} and set(resolved["resolution"]) == {record["resolution_id"]}
    assert audit["conflicts_held"] == 0 and audit["conflicts_resolved"] == 1

    later = {"sha256": A, "label": "Benign", "path": "x.jpg", "source": "lab-2", "status": "rejected"}
    later["label_conflict"] = "labelled 'Benign' here but 'Pro' in source 'lab'"
    again = pd.concat([frame, rows(later)], ignore_index=True)
    assert not conflict_status(again, {A: [record]})[A]["resolved"]


def test_the_newest_resolution_wins_and_a_row_with_other_failures_stays_out() -> None:
    frame = conflicted()
    status = conflict_status(frame, {})[A]
    first, second = resolution(status, "Pro"), resolution(status, "Benign", at="2026-12-02T09:00:00+00:00")
    blurry = frame.assign(detail=[CONFLICT + "; Laplacian variance 1.0 below 2.0", CONFLICT, None, None])
    used, _ = label_decisions(newest_decisions(blurry), conflict_status(blurry, {A: [second, first]}))
    assert list(used.loc[used["sha256"] == A, "label"]) == ["Benign"]
    assert list(used.loc[used["sha256"] == A, "path"]) == ["Benign/a.jpg"]


def test_a_resolution_needs_a_reason_and_a_class_of_the_images_sources() -> None:
    status = conflict_status(conflicted(), {})[A]
    with pytest.raises(ConflictError, match="--reason"):
        make_resolution(A, "Pro", " ", actor="ana", at="2026-12-01T10:00:00", status=status, classes={"Pro"})
    with pytest.raises(ConflictError, match="'Lymph' is not a class"):
        make_resolution(A, "Lymph", "why", actor="ana", at="2026-12-01T10:00:00", status=status, classes={"Pro"})


def test_no_manifests_at_all_means_no_conflicts():
    """The first nightly run of a fresh install snapshots a store without one manifest."""
    from pipelines.data.conflicts import conflict_status
    from pipelines.data.manifests import manifest_frame

    assert conflict_status(manifest_frame([]), {}) == {}
