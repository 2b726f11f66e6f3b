"""Batch planning: ids, in-batch and cross-source duplicates, and where each file's bytes go."""

from __future__ import annotations

from pipelines.data.plan import BatchPlan, first_occurrences, label_conflict, make_batch_id, place
from pipelines.data.scan import HashedFile
from pipelines.data.sources import Source, SourceFile
from pipelines.io import layout

SOURCE = Source("lab", "/data/lab", "folders", {"Pre": "Pre", "Early": "Early"}, ("all_subtypes",))


def test_batch_id_depends_on_shas_not_order_and_on_versions() -> None:
    one = make_batch_id("lab", ["b", "a"], "map1", "1.0.0")
    assert one == make_batch_id("lab", ["a", "b"], "map1", "1.0.0")
    assert one != make_batch_id("lab", ["a", "b"], "map2", "1.0.0")
    assert one != make_batch_id("lab", ["a", "b"], "map1", "1.1.0")
    assert one != make_batch_id("lab2", ["a", "b"], "map1", "1.0.0")
    assert one != make_batch_id("lab", ["a"], "map1", "1.0.0")


def test_first_occurrence_is_the_first_row_even_when_paths_repeat() -> None:
    pairs = [("a.jpg", "s1"), ("a.jpg", "s1"), ("b.jpg", "s1"), ("c.jpg", "s2"), ("../x.jpg", None)]
    files = [HashedFile(SourceFile(p, "Pre"), sha) for p, sha in pairs]
    assert first_occurrences(files) == {"s1": (0, "a.jpg"), "s2": (3, "c.jpg")}


def test_label_conflict_names_both_labels() -> None:
    assert label_conflict("Pre", {"label": "Pre", "source": "other"}) is None
    assert label_conflict("Pre", {"label": "Early", "source": "other"}) == (
        "labelled 'Pre' here but 'Early' in source 'other'"
    )


def test_each_file_is_placed_once_and_never_uploaded_twice() -> None:
    """New originals go to their raw key; copies, stored and cross-source images are not uploaded again;
    undecodable bytes are kept under the batch's quarantine prefix."""
    other = {"label": "Early", "source": "lab-b", "key": layout.raw_key("c" * 64, "png")}
    plan = BatchPlan(
        SOURCE,
        "b1",
        files=[],
        first={"a" * 64: (0, "Pre/a.jpg"), "b" * 64: (2, "Pre/b.jpg"), "c" * 64: (3, "Pre/c.jpg")},
        elsewhere={"c" * 64: other},
        stored=frozenset({layout.raw_key("b" * 64, "jpg")}),
    )

    def placed(row: int, sha: str, **facts) -> tuple[dict, bool]:
        return place(plan, row, {"label": "Pre", "ext": "jpeg", **facts}, sha)

    new, upload = placed(0, "a" * 64, format="JPEG")
    assert (new["key"], upload, new["created"]) == (layout.raw_key("a" * 64, "jpg"), True, True)
    copy, upload = placed(1, "a" * 64, format="JPEG")
    assert copy["duplicate_of"] == "Pre/a.jpg" and not upload
    assert not placed(2, "b" * 64, format="JPEG")[1]  # already stored by an earlier batch
    elsewhere, upload = placed(3, "c" * 64, format="PNG")
    assert elsewhere["key"] == other["key"] and not upload and "'Early'" in elsewhere["label_conflict"]
    broken, upload = placed(0, "a" * 64, decode_error="truncated")
    assert broken["key"] == layout.rejected_original_key("lab", "b1", "a" * 64, "jpeg") and upload
