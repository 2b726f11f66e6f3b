"""An S3 source's object is refused from its HEAD, before the GET: a landing bucket may hold an object
larger than memory, and reading it whole to measure it would be the failure the cap exists to prevent."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from pipelines.data.scan import scan_files
from pipelines.data.sources import S3Reader, SourceError, SourceFile


class HeadOnlyStore:
    """A landing bucket whose HEAD reports ``head_size``; its GET returns ``data`` and counts the call."""

    def __init__(self, head_size: int, data: bytes = b"") -> None:
        self.head_size, self.data = head_size, data
        self.gets: list[str] = []

    def size(self, key: str) -> int:
        return self.head_size

    def get_bytes(self, key: str) -> bytes:
        self.gets.append(key)
        return self.data


def test_an_object_above_max_file_bytes_is_refused_from_its_head_and_never_read() -> None:
    store = HeadOnlyStore(head_size=5 * 2**30)  # 5 GiB: a GET of it would exhaust memory
    with pytest.raises(SourceError, match=r"larger than max_file_bytes \(5368709120 bytes > 64\)"):
        S3Reader(store, "landing", max_file_bytes=64).read("Early/huge.jpg")
    assert store.gets == []


def test_an_object_at_the_cap_is_read_once_from_its_key() -> None:
    store = HeadOnlyStore(head_size=64, data=b"x" * 64)
    assert S3Reader(store, "landing/", max_file_bytes=64).read("Early/a.jpg") == b"x" * 64
    assert store.gets == ["landing/Early/a.jpg"]


def test_an_object_replaced_by_a_larger_one_after_its_head_is_refused_once_read() -> None:
    store = HeadOnlyStore(head_size=10, data=b"x" * 65)
    with pytest.raises(SourceError, match=r"larger than max_file_bytes \(65 bytes > 64\)"):
        S3Reader(store, "landing", max_file_bytes=64).read("Early/a.jpg")


class TwoObjectStore:
    """A small image and a huge object whose GET fails the test; HEAD sizes only."""

    def __init__(self, small: bytes) -> None:
        self.objects = {"landing/Early/small.png": small}

    def size(self, key: str) -> int:
        return len(self.objects[key]) if key in self.objects else 2**40

    def get_bytes(self, key: str) -> bytes:
        assert key in self.objects, f"GET of {key}: its HEAD already showed it too large"
        return self.objects[key]


def test_a_scan_of_an_s3_source_rejects_the_huge_object_with_its_reason_and_keeps_the_rest(tiny_png) -> None:
    reader = S3Reader(TwoObjectStore(tiny_png), "landing", max_file_bytes=1024)
    entries = [SourceFile("Early/small.png", "Early"), SourceFile("Early/huge.tif", "Early")]
    with ThreadPoolExecutor(max_workers=2) as pool:
        small, huge = scan_files(reader, entries, pool, set())
    assert small.sha256 and small.read_error is None and "decode_error" not in small.examined
    assert huge.sha256 is None and "larger than max_file_bytes (1099511627776 bytes > 1024)" in huge.read_error


@pytest.fixture
def tiny_png() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 120, 180)).save(buffer, "PNG")
    return buffer.getvalue()
