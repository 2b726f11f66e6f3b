"""The GX suite on manifest frames: accepted / rejected rows with reasons, quarantined batches, Data Docs
(no S3: see tests/integration/data)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from pipelines.core.settings import Settings
from pipelines.data.manifests import manifest_frame
from pipelines.data.plan import safe_ext
from pipelines.data.scan import examine
from pipelines.data.validation import SuiteError, load_suite, validate_manifest
from pipelines.io.storage import sha256_hex

REPO = Path(__file__).resolve().parents[3]
CLASSES = ["Benign", "Early", "Pre", "Pro"]


@pytest.fixture(scope="module")
def suite():
    return load_suite(Settings(profile="dev", suite_dir=REPO / "expectations"))


@pytest.fixture(scope="module")
def smears(shared_data: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted((shared_data / "all_taleqani" / "Pre").iterdir())[:12]]


def record(row: int, path: str, data: bytes | None, label: str | None = "Pre", **extra) -> dict:
    base = {
        "row": row,
        "source": "lab",
        "batch_id": "b1",
        "role": "train",
        "path": path,
        "source_label": label,
        "label": label,
        "sha256": sha256_hex(data) if data is not None else None,
        "ext": safe_ext(path),
    }
    return {**base, **(examine(data) if data is not None else {}), **extra}


def test_good_rows_are_accepted_and_each_bad_row_gets_its_reason(suite, smears, bad_inputs) -> None:
    rows = [record(i, f"Pre/good {i} é.jpg", data) for i, data in enumerate(smears)]
    n = len(rows)
    bad = [
        *[
            record(n + i, f"Pre/{name}", data)
            for i, name_data in enumerate(bad_inputs.items())
            for name, data in [name_data]
        ],
        record(n + 7, "Weird/x.jpg", smears[0], label=None, source_label="Weird"),
        record(n + 8, "Pre/copy.jpg", smears[1], duplicate_of="Pre/good 1 é.jpg"),
        record(
            n + 9,
            "Pre/conflict.jpg",
            smears[2],
            label_conflict="labelled 'Pre' here but 'Early' in source 'x'",
        ),
        record(n + 10, "../outside.jpg", None, path_error="path '../outside.jpg' leaves the source folder"),
    ]
    validation = validate_manifest(manifest_frame(rows + bad), suite, CLASSES)
    judged = validation.frame.set_index("path")
    assert (judged.loc[[r["path"] for r in rows], "status"] == "accepted").all()
    expected = {
        "Pre/empty.jpg": "empty",
        "Pre/notes.jpg": "not_an_image",
        "Pre/truncated.jpg": "truncated",
        "Pre/bomb.png": "too_many_pixels",
        "Pre/grey.png": "not_rgb",
        "Pre/rgba.png": "not_rgb",
        "Weird/x.jpg": "unknown_label",
        "Pre/copy.jpg": "duplicate",
        "Pre/conflict.jpg": "label_conflict",
        "../outside.jpg": "path_traversal",
    }
    for path, reason in expected.items():
        assert (judged.loc[path, "status"], judged.loc[path, "reason"]) == ("rejected", reason), path
    assert judged.loc["Pre/corrupt.jpg", "status"] == "rejected"
    assert "Weird" in judged.loc["Weird/x.jpg", "detail"]
    assert "good 1 é.jpg" in judged.loc["Pre/copy.jpg", "detail"]
    assert "1 channel" in judged.loc["Pre/grey.png", "detail"]
    assert not validation.quarantined  # 11 of 23 rejected: under the suite's 50 % limit


def test_batch_with_mostly_bad_files_is_quarantined(suite, smears, bad_inputs) -> None:
    rows = [record(i, name, data) for i, (name, data) in enumerate(bad_inputs.items())]
    rows.append(record(len(rows), "Pre/good.jpg", smears[0]))
    validation = validate_manifest(manifest_frame(rows), suite, CLASSES)
    assert validation.quarantined
    assert any(r.startswith("rejected_share") for r in validation.quarantine_reasons)
    assert validation.frame.set_index("path").loc["Pre/good.jpg", "status"] == "accepted"


def test_single_class_batch_is_not_quarantined(suite, smears) -> None:
    rows = [record(i, f"Pre/{i}.jpg", data) for i, data in enumerate(smears[:3])]
    assert not validate_manifest(manifest_frame(rows), suite, CLASSES).quarantined


def test_missing_manifest_column_fails_the_batch(suite, smears) -> None:
    frame = manifest_frame([record(0, "Pre/a.jpg", smears[0])]).drop(columns=["duplicate_of"])
    validation = validate_manifest(frame, suite, CLASSES)
    assert validation.quarantined and any("schema" in r or "could not run" in r for r in validation.quarantine_reasons)


def test_gx_data_docs_are_rendered(suite, smears, tmp_path: Path) -> None:
    validate_manifest(manifest_frame([record(0, "Pre/a.jpg", smears[0])]), suite, CLASSES, docs_dir=tmp_path)
    assert (tmp_path / "index.html").is_file()
    assert list(tmp_path.glob("validations/**/*.html"))


def test_image_metadata_never_reaches_the_manifest(suite, smears) -> None:
    image = Image.open(io.BytesIO(smears[0]))
    exif = Image.Exif()
    exif[0x010E] = "PATIENT Jane Roe 1970-01-01"  # ImageDescription
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif.tobytes())
    assert b"Jane Roe" in buffer.getvalue()
    frame = validate_manifest(manifest_frame([record(0, "Pre/exif.jpg", buffer.getvalue())]), suite, CLASSES).frame
    parquet = io.BytesIO()
    frame.to_parquet(parquet)
    assert frame.loc[0, "status"] == "accepted"
    assert b"Jane Roe" not in parquet.getvalue()


def test_invalid_expectation_in_suite_is_refused(tmp_path: Path) -> None:
    (tmp_path / "suites").mkdir()
    (tmp_path / "suites" / "image_batch.json").write_text(
        '{"name": "image_batch", "meta": {"version": "9"}, "expectations": [{"type": "expect_nonsense", "kwargs": {}}]}'
    )
    broken = load_suite(Settings(profile="dev", suite_dir=tmp_path))
    with pytest.raises(SuiteError, match="invalid expectation"):
        validate_manifest(manifest_frame([]), broken, CLASSES)
