"""Files that must not stall or abort a source: each one is listed as one row with the reason it is not read."""

from __future__ import annotations

import io
import os
import socket
import stat
import threading
from pathlib import Path

import pytest

from pipelines.core.settings import Settings
from pipelines.data.manifests import manifest_frame
from pipelines.data.scan import HashedFile, scan_files
from pipelines.data.sources import (
    DEFAULT_MAX_FILE_BYTES,
    LocalReader,
    Source,
    SourceError,
    csv_entries,
    folder_entries,
    list_files,
    reader_for,
)

SCAN_TIMEOUT_S = 20


def folder_source(root: Path, layout: str = "folders") -> Source:
    return Source(
        name="lab-h",
        location=str(root),
        layout=layout,
        tasks=("all_subtypes",),
        label_map={"Early": "Early"},
    )


def scan_folder(root: Path, reader: LocalReader | None = None, layout: str = "folders") -> dict[str, HashedFile]:
    """Every file of the folder scanned in a worker thread, which must finish within SCAN_TIMEOUT_S."""
    from concurrent.futures import ThreadPoolExecutor

    reader = reader or LocalReader(root)
    found: dict[str, HashedFile] = {}

    def scan() -> None:
        with ThreadPoolExecutor(max_workers=2) as pool:
            entries = list_files(folder_source(root, layout), reader)
            found.update((h.entry.path, h) for h in scan_files(reader, entries, pool, set()))

    worker = threading.Thread(target=scan, daemon=True)  # daemon: a stuck read must not hang pytest
    worker.start()
    worker.join(SCAN_TIMEOUT_S)
    assert not worker.is_alive(), f"the scan of {root} did not finish within {SCAN_TIMEOUT_S} s"
    return found


@pytest.fixture
def labelled(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    (root / "Early").mkdir(parents=True)
    (root / "Early" / "good.png").write_bytes(b"not decoded here, only hashed")
    return root


def unblock(fifo: Path) -> None:
    """Open the FIFO's write end, so a reader blocked in open() (the bug) returns and the thread ends."""
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass  # nobody is blocked on it: the scan never opened it


def test_a_fifo_is_never_opened_and_the_scan_finishes(labelled: Path) -> None:
    fifo = labelled / "Early" / "pipe.jpg"
    os.mkfifo(fifo)
    try:
        found = scan_folder(labelled)
    finally:
        unblock(fifo)
    assert found["Early/good.png"].sha256 is not None
    assert found["Early/pipe.jpg"].sha256 is None
    assert "not a regular file (FIFO)" in found["Early/pipe.jpg"].read_error


def test_device_and_socket_files_are_never_opened(labelled: Path) -> None:
    try:
        os.mknod(labelled / "Early" / "null.jpg", stat.S_IFCHR | 0o600, os.makedev(1, 3))  # like /dev/null
    except PermissionError:
        pytest.skip("creating a device node needs root")
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(labelled / "Early" / "sock.jpg"))
        found = scan_folder(labelled)
    assert "not a regular file (character device)" in found["Early/null.jpg"].read_error
    assert "not a regular file (socket)" in found["Early/sock.jpg"].read_error
    assert found["Early/good.png"].sha256 is not None


def test_a_symlink_to_a_fifo_inside_the_source_is_not_opened(labelled: Path) -> None:
    fifo = labelled / "pipe"
    os.mkfifo(fifo)
    (labelled / "Early" / "link.jpg").symlink_to(fifo)
    try:
        found = scan_folder(labelled)
    finally:
        unblock(fifo)
    assert "not a regular file (FIFO)" in found["Early/link.jpg"].read_error


def test_files_above_max_file_bytes_are_refused_from_stat_before_reading(labelled: Path) -> None:
    (labelled / "Early" / "big.jpg").write_bytes(b"x" * 101)
    (labelled / "Early" / "edge.jpg").write_bytes(b"x" * 100)
    found = scan_folder(labelled, LocalReader(labelled, max_file_bytes=100))
    assert "larger than max_file_bytes (101 bytes > 100)" in found["Early/big.jpg"].read_error
    assert found["Early/edge.jpg"].read_error is None and found["Early/edge.jpg"].sha256 is not None


def test_the_read_is_bounded_when_a_file_grew_after_its_stat(labelled: Path, monkeypatch) -> None:
    small = labelled / "small"
    small.write_bytes(b"x" * 10)
    (labelled / "Early" / "growing.jpg").write_bytes(b"x" * 500)
    real_stat = os.stat

    def stat_before_growth(path, *args, **kwargs):
        return real_stat(small) if os.fspath(path).endswith("growing.jpg") else real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat_before_growth)
    with pytest.raises(SourceError, match=r"changed while it was being read \(grew past its 10 bytes\)"):
        LocalReader(labelled, max_file_bytes=50).read("Early/growing.jpg")


def test_max_file_bytes_is_a_setting_with_a_64_mib_default(labelled: Path) -> None:
    assert DEFAULT_MAX_FILE_BYTES == 64 * 1024 * 1024
    assert Settings(profile="dev").max_file_bytes == DEFAULT_MAX_FILE_BYTES
    reader = reader_for(folder_source(labelled), Settings(profile="dev", max_file_bytes=1234))
    assert reader.max_file_bytes == 1234


def test_a_name_that_is_not_utf8_is_rejected_with_an_escaped_path_parquet_can_store(labelled: Path) -> None:
    raw = os.fsencode(labelled / "Early") + b"/bad-\xff-name.jpg"
    with open(raw, "wb") as out:
        out.write(b"bytes")
    found = scan_folder(labelled)
    bad = found["Early/bad-\\xff-name.jpg"]
    assert bad.sha256 is None and bad.read_error == "file name is not valid UTF-8 (shown escaped)"
    rows = [
        {"row": i, "path": h.entry.path, "source_label": h.entry.source_label} for i, h in enumerate(found.values())
    ]
    manifest_frame(rows).to_parquet(io.BytesIO())  # raised UnicodeEncodeError on the surrogate-escaped name


def test_a_label_folder_that_is_not_utf8_escapes_the_label_too(tmp_path: Path) -> None:
    (entry,) = folder_entries([os.fsdecode(b"Ear\xe9ly/a.jpg")])
    assert (entry.path, entry.source_label) == ("Ear\\xe9ly/a.jpg", "Ear\\xe9ly")
    assert entry.not_read == "file name is not valid UTF-8 (shown escaped)"


def test_hidden_and_top_level_files_are_counted_as_rows_with_a_reason() -> None:
    listed = ["README.md", "Early/a.jpg", "Early/.DS_Store", ".git/", "Pre/.thumbs/", "Pre/sub/b.png"]
    entries = {e.path: e for e in folder_entries(listed)}
    assert sorted(entries) == [".git", "Early/.DS_Store", "Early/a.jpg", "Pre/.thumbs", "Pre/sub/b.png", "README.md"]
    assert entries["Early/a.jpg"].not_read is None and entries["Pre/sub/b.png"].not_read is None
    assert entries["Early/.DS_Store"].not_read == "hidden file (name starts with '.'): not read"
    assert entries["Pre/.thumbs"].not_read == "hidden folder (name starts with '.'): not entered"
    assert entries[".git"].not_read == "hidden folder (name starts with '.'): not entered"
    assert entries["README.md"].not_read.startswith("top-level file: the folders layout reads <label>/")


def test_a_hidden_folder_in_s3_is_one_row_not_one_per_key() -> None:
    entries = folder_entries(["Early/.git/a", "Early/.git/b/c", "Early/x.jpg"])
    assert [e.path for e in entries] == ["Early/.git", "Early/x.jpg"]


def test_a_local_hidden_folder_is_not_entered(labelled: Path) -> None:
    (labelled / "Early" / ".cache" / "deep").mkdir(parents=True)
    (labelled / "Early" / ".cache" / "deep" / "x.jpg").write_bytes(b"x")
    (labelled / "notes.txt").write_text("lab notes")
    found = scan_folder(labelled)
    assert sorted(found) == ["Early/.cache", "Early/good.png", "notes.txt"]
    assert found["Early/.cache"].read_error == "hidden folder (name starts with '.'): not entered"
    assert found["notes.txt"].read_error.startswith("top-level file")


def test_a_folder_that_cannot_be_listed_is_a_row_with_the_error(labelled: Path, monkeypatch) -> None:
    (labelled / "Pre").mkdir()
    (labelled / "Pre" / "p.jpg").write_bytes(b"p")
    real_scandir = os.scandir

    def scandir(path):
        if os.fspath(path).endswith("Pre"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)  # as root, chmod 000 would not stop the listing
    found = scan_folder(labelled)
    assert sorted(found) == ["Early/good.png", "Pre"]
    assert found["Pre"].sha256 is None and found["Pre"].entry.source_label == "Pre"
    assert found["Pre"].read_error.startswith("folder could not be listed: ") and "Permission denied" in (
        found["Pre"].read_error
    )


def test_a_nul_byte_in_a_csv_path_is_a_rejected_row_not_a_raise(labelled: Path) -> None:
    (labelled / "manifest.csv").write_text("path,label\nEarly/good.png,Early\nEarly/a\x00b.jpg,Early\n")
    found = scan_folder(labelled, layout="csv")
    assert found["Early/good.png"].sha256 is not None
    bad = found["Early/a\\x00b.jpg"]
    assert bad.sha256 is None and bad.read_error == "path contains a NUL byte (shown escaped)"


def test_a_csv_path_with_a_nul_byte_is_escaped_in_the_entry() -> None:
    (entry,) = csv_entries("path,label\na\x00.jpg,Early\n", "m.csv")
    assert entry.path == "a\\x00.jpg" and entry.path_error is None


def test_a_manifest_that_is_not_utf8_is_a_clear_error_naming_the_file(labelled: Path) -> None:
    (labelled / "manifest.csv").write_bytes(b"path,label\nEarly/\xff.png,Early\n")
    with pytest.raises(SourceError, match=r"manifest.csv is not valid UTF-8"):
        list_files(folder_source(labelled, "csv"), LocalReader(labelled))


class OneObjectStore:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def get_bytes(self, key: str) -> bytes:
        return self.data

    def size(self, key: str) -> int:
        return len(self.data)


def test_an_s3_object_above_max_file_bytes_is_refused() -> None:
    from pipelines.data.sources import S3Reader

    assert S3Reader(OneObjectStore(b"x" * 8), "landing", max_file_bytes=8).read("Early/a.jpg") == b"x" * 8
    with pytest.raises(SourceError, match=r"larger than max_file_bytes \(9 bytes > 8\)"):
        S3Reader(OneObjectStore(b"x" * 9), "landing", max_file_bytes=8).read("Early/a.jpg")
