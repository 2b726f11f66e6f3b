"""Quarantine end to end: a batch the suite refuses is held, listed, released once, and never deleted."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.cli import main
from pipelines.data.manifests import accepted_rows
from pipelines.io import layout
from pipelines.io.storage import ObjectStore, StorageError
from tests.integration.data.commands import add_source, cli

pytestmark = pytest.mark.usefixtures("stack")


def test_all_bad_batch_is_quarantined_kept_and_releasable(
    capsys, store: ObjectStore, bad_inputs: dict[str, bytes], tmp_path: Path
) -> None:
    (tmp_path / "Early").mkdir()
    for name in ("empty.jpg", "notes.jpg", "truncated.jpg"):
        (tmp_path / "Early" / name).write_bytes(bad_inputs[name])
    add_source(capsys, "tq-bad", tmp_path)

    code, out = cli(capsys, "ingest", "tq-bad")
    batch = out["batch_id"]
    assert code == 1 and out["status"] == "quarantined" and out["accepted"] == 0
    held_manifest = layout.quarantined_manifest_key("tq-bad", batch)
    assert out["manifest"] == store.uri(held_manifest)
    assert store.exists(layout.validation_result_key(layout.quarantined_batch_prefix("tq-bad", batch)))
    manifest = store.get_parquet(held_manifest)
    kept = [layout.rejected_original_key("tq-bad", batch, sha, "jpg") for sha in manifest["sha256"]]
    assert list(manifest["key"]) == kept and len(set(kept)) == 3 and all(store.exists(k) for k in kept)
    with pytest.raises(StorageError, match="refusing to delete"):
        store.delete(held_manifest)
    assert accepted_rows(store, "tq-bad").empty

    _, listed = cli(capsys, "quarantine", "list")
    entry = next(b for b in listed["batches"] if b["batch_id"] == batch)
    assert entry["status"] == "quarantined" and entry["reasons"]

    code, released = cli(capsys, "quarantine", "release", batch, "--reason", "lab confirmed: test files")
    assert code == 0 and released["revalidation"]["rejected"] == 3
    assert store.exists(layout.batch_manifest_key("tq-bad", batch))
    _, listed = cli(capsys, "quarantine", "list")
    entry = next(b for b in listed["batches"] if b["batch_id"] == batch)
    assert entry["status"] == "released" and entry["release"]["reason"] == "lab confirmed: test files"
    assert main(["quarantine", "release", batch, "--reason", "again"]) == 2
    assert "already released" in capsys.readouterr().err
