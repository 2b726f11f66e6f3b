"""The scan pass's measurement of one file's bytes (reading sources: see tests/integration/data)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.data.scan import examine


@pytest.fixture(scope="module")
def smear(shared_data: Path) -> bytes:
    return sorted((shared_data / "all_taleqani" / "Pre").iterdir())[0].read_bytes()


def test_examine_measures_a_real_smear(smear: bytes) -> None:
    facts = examine(smear)
    assert facts["format"] == "JPEG" and len(facts["phash"]) == 16
    assert facts["width"] == 224 and facts["channels"] == 3
    assert 100 < facts["brightness"] < 250 and facts["blur_var"] > 2


def test_examine_classifies_bad_bytes(bad_inputs: dict[str, bytes]) -> None:
    reasons = {name: examine(data).get("decode_error") for name, data in bad_inputs.items()}
    assert reasons["empty.jpg"] == "empty"
    assert reasons["notes.jpg"] == "not_an_image"
    assert reasons["truncated.jpg"] == "truncated"
    assert reasons["corrupt.jpg"] in {"corrupt", "truncated"}
    assert reasons["bomb.png"] == "too_many_pixels"
    assert reasons["grey.png"] is None and reasons["rgba.png"] is None
