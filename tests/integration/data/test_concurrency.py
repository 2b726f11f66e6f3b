"""Concurrency against the real SeaweedFS of the session stack, with real parallel processes.

Each test works in a bucket of its own, so the figures (objects, rows, problems) are exactly its own.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
import uuid
from pathlib import Path

import pytest

from pipelines.data.fsck import RAW_WITHOUT_MANIFEST, fsck
from pipelines.data.ledger_store import newest_generation, read_ledger
from pipelines.io import layout
from pipelines.io.lease import Lease
from pipelines.io.storage import ObjectStore, PreconditionFailedError, StorageError
from tests.integration.data import concurrency_jobs as jobs
from tests.integration.data.commands import cli
from tests.integration.data.parallel import run_parallel, run_together, start_one

pytestmark = pytest.mark.usefixtures("stack")
WRITERS = 6
ROUNDS = 20  # keys raced on per spawned set of writers
TASK = "five_class"  # no other data test snapshots it
LABELS = ("Benign=Healthy", "Early=ALL", "Pre=ALL", "Pro=ALL")


@pytest.fixture
def bucket(settings) -> ObjectStore:
    store = ObjectStore.from_settings(settings, f"leukops-conc-{uuid.uuid4().hex[:10]}")
    store.ensure_bucket()
    return store


def test_the_server_enforces_if_none_match_and_if_match(bucket: ObjectStore) -> None:
    first = bucket.put_new("state/probe.json", b"1")
    with pytest.raises(PreconditionFailedError):
        bucket.put_new("state/probe.json", b"2")
    with pytest.raises(PreconditionFailedError):
        bucket.put_if_match("state/probe.json", b"3", '"0123456789abcdef0123456789abcdef"')
    second = bucket.put_if_match("state/probe.json", b"4", first)
    with pytest.raises(PreconditionFailedError):
        bucket.put_if_match("state/probe.json", b"5", first)  # stale etag
    assert bucket.get_with_etag("state/probe.json") == (b"4", second)
    # minio-py (the plain put) would have turned these headers into metadata: prove the plain path is not used
    assert bucket.get_bytes("state/probe.json") == b"4"


def test_of_parallel_creates_of_one_key_exactly_one_wins(bucket: ObjectStore) -> None:
    keys = [f"state/race-{i}.json" for i in range(ROUNDS)]
    per_writer = run_parallel(jobs.put_new_job, [(bucket.bucket, keys, f"{w}".encode()) for w in range(WRITERS)])
    for round_, outcomes in enumerate(zip(*per_writer, strict=True)):
        assert sorted(outcomes) == ["created"] + ["refused"] * (WRITERS - 1), (round_, outcomes)


def test_parallel_if_match_writers_measured(bucket: ObjectStore) -> None:
    """SeaweedFS 4.48 lets two racing If-Match writers both win now and then: measured here, not relied on
    (the ledger commits with If-None-Match only). At least one writer must win each round, none may error."""
    tagged = [(key, bucket.put_new(key, b"0")) for key in (f"state/match-{i}.json" for i in range(ROUNDS))]
    per_writer = run_parallel(jobs.put_if_match_job, [(bucket.bucket, tagged, f"{w}".encode()) for w in range(WRITERS)])
    winners = [list(outcomes).count("replaced") for outcomes in zip(*per_writer, strict=True)]
    print(f"If-Match winners per key, {WRITERS} racing writers: {winners}")
    assert min(winners) >= 1 and all(set(o) <= {"replaced", "refused"} for o in per_writer)


def test_concurrent_ledger_writers_lose_no_row_and_the_ledger_never_goes_back(bucket: ObjectStore) -> None:
    task = "concurrency-test"  # not a real task: fsck of the session bucket ignores it
    shas = [[f"{w:02d}-{i:02d}" for i in range(5)] for w in range(WRITERS)]
    generations = run_parallel(jobs.append_rows_job, [(bucket.bucket, task, s) for s in shas])
    assert sorted(generations) == list(range(1, WRITERS + 1)), generations  # one commit each
    ledger = read_ledger(bucket, task)
    assert ledger.generation == WRITERS and sorted(ledger.frame["sha256"]) == sorted(sum(shas, []))
    previous: set[str] = set()
    for generation in range(1, WRITERS + 1):  # each generation holds every row of the one before
        rows = set(bucket.get_parquet(layout.ledger_generation_key(task, generation))["sha256"])
        assert previous < rows and len(rows) == 5 * generation
        previous = rows
    assert set(bucket.get_parquet(layout.ledger_key(task))["sha256"]) == previous  # the head copy is the newest


def test_a_lease_has_one_holder_at_a_time_and_a_killed_holder_frees_it(bucket: ObjectStore) -> None:
    name = layout.training_lease_name("parallel")
    spans = sorted(run_parallel(jobs.lease_job, [(bucket.bucket, name, 0.5)] * 3))
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:], strict=False)), spans

    hung = layout.training_lease_name("killed")
    proc = start_one(jobs.lease_and_hang_job, (bucket.bucket, hung))
    deadline = time.time() + 180
    while not bucket.list(layout.lease_dir(hung)) and time.time() < deadline:
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(30)
    with Lease(bucket, hung, wait_s=5) as successor:  # same host, dead pid: no wait for the expiry
        assert successor.ticket == 2 and successor.waited_s < 5


def _copy(shared_data: Path, root: Path, start: int, per_class: int = 4) -> Path:
    for label in ("Benign", "Early", "Pre", "Pro"):
        (root / label).mkdir(parents=True)
        for f in sorted((shared_data / "all_taleqani" / label).iterdir())[start : start + per_class]:
            shutil.copyfile(f, root / label / f.name)
    return root


def test_two_ingests_and_two_snapshots_at_once_leave_a_consistent_store_fsck_agrees(
    capsys, bucket: ObjectStore, shared_data: Path, tmp_path: Path
) -> None:
    for name, start in (("conc-a", 340), ("conc-b", 350)):
        args = ["source", "add", name, "--path", str(_copy(shared_data, tmp_path / name, start)), "--task", TASK]
        assert cli(capsys, *args, "--label-map", *LABELS)[0] == 0
    ingests = run_parallel(jobs.ingest_job, [(bucket.bucket, s, "2026-12-01") for s in ("conc-a", "conc-b")])
    assert [r.get("status") for r in ingests] == ["accepted", "accepted"], ingests
    raw = bucket.list(f"{layout.RAW_SHARDS}/")
    assert len(raw) == sum(r["accepted"] for r in ingests) == 32  # nothing lost: objects = accepted shas

    snapshots = run_parallel(jobs.snapshot_job, [(bucket.bucket, TASK)] * 2)
    assert all("error" not in s for s in snapshots), snapshots
    assert snapshots[0] == snapshots[1] and snapshots[0]["images"] == 32  # same data, same version
    ledger = read_ledger(bucket, TASK)
    assert ledger.generation == 1 and ledger.frame["sha256"].is_unique and len(ledger.frame) == 32
    pointer = bucket.get_json(layout.latest_dataset_pointer_key(TASK))
    assert pointer["version"] == snapshots[0]["version"] and pointer["ledger_generation"] == 1
    assert newest_generation(bucket, TASK) == 1

    healthy = fsck(bucket)
    assert healthy["problems"] == [] and healthy["checked"]["raw_objects"] == 32
    assert healthy["checked"]["ledger_rows"] == {TASK: 32}
    orphan = layout.raw_key("f" * 64, "png")
    bucket.put_bytes(orphan, b"planted")
    found = fsck(bucket)["problems"]
    assert [(p["kind"], p["key"]) for p in found] == [(RAW_WITHOUT_MANIFEST, orphan)]
    code, out = _cli_on_bucket(capsys, bucket, "fsck")
    assert code == 1 and out["problems"] == found and out["checked"]["raw_objects"] == 33
    bucket.client.remove_object(bucket.bucket, orphan)  # raw/ is immutable through the adapter

    # new images, then a snapshot growing the ledger while 3 writers grow it too: every row survives
    args = ["source", "add", "conc-c", "--path", str(_copy(shared_data, tmp_path / "conc-c", 360, 2)), "--task", TASK]
    assert cli(capsys, *args, "--label-map", *LABELS)[0] == 0
    assert jobs.ingest_job(bucket.bucket, "conc-c", "2026-12-01")()["accepted"] == 8
    foreign = [[f"{w}-{i}" for i in range(5)] for w in range(3)]
    calls = [(jobs.snapshot_job, (bucket.bucket, TASK))] + [
        (jobs.append_rows_job, (bucket.bucket, TASK, shas)) for shas in foreign
    ]
    outcomes = run_together(calls)
    assert "error" not in outcomes[0] and outcomes[0]["images"] == 40, outcomes
    grown = read_ledger(bucket, TASK)
    assert grown.frame["sha256"].is_unique and len(grown.frame) == 40 + 15 and grown.generation == 5
    assert bucket.get_json(layout.latest_dataset_pointer_key(TASK))["version"] == outcomes[0]["version"]
    problems = fsck(bucket)["problems"]  # the writers' rows are in no snapshot: fsck names each
    assert sorted(p["sha256"] for p in problems) == sorted(sum(foreign, []))


def _cli_on_bucket(capsys, bucket: ObjectStore, *args: str) -> tuple[int, dict]:
    """A command against ``bucket`` instead of the session's data bucket."""
    from pipelines.core.settings import get_settings

    os.environ["LEUKOPS_DATA_BUCKET"] = bucket.bucket
    get_settings.cache_clear()
    try:
        return cli(capsys, *args)
    finally:
        del os.environ["LEUKOPS_DATA_BUCKET"]
        get_settings.cache_clear()


class FailsAfterHold(ObjectStore):
    """S3 goes away right after a quarantined batch's manifest lands: the next write or delete fails."""

    armed = False

    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> str:
        self._fail_if_armed(key)
        uri = super().put_bytes(key, data, content_type)
        self.armed = layout.batch_of_quarantined_manifest_key(key) is not None
        return uri

    def delete(self, key: str) -> None:
        self._fail_if_armed(key)
        super().delete(key)

    def _fail_if_armed(self, key: str) -> None:
        if self.armed:
            self.armed = False
            raise StorageError(f"injected: S3 unreachable writing {key}")


def test_a_retry_after_s3_failed_past_the_quarantine_returns_the_stored_verdict(
    capsys, monkeypatch, settings, bucket: ObjectStore, bad_inputs: dict[str, bytes], tmp_path: Path
) -> None:
    from pipelines.orchestration import airflow_tasks

    (tmp_path / "Early").mkdir()
    for name in ("empty.jpg", "notes.jpg", "truncated.jpg"):
        (tmp_path / "Early" / name).write_bytes(bad_inputs[name])
    assert cli(capsys, "source", "add", "conc-bad", "--path", str(tmp_path), "--task", TASK)[0] == 0
    faulty = FailsAfterHold.from_settings(settings, bucket.bucket)
    monkeypatch.setattr(airflow_tasks, "_store", lambda _settings: faulty)

    with pytest.raises(StorageError, match="injected"):
        airflow_tasks.ingest("conc-bad", "manual__2026-12-01T00:00:00+00:00", "2026-12-01")
    retry = airflow_tasks.ingest("conc-bad", "manual__2026-12-01T00:00:00+00:00", "2026-12-01")
    assert retry["status"] == "quarantined" and retry["rejected"] == 3  # not "nothing new": the alert repeats
    assert airflow_tasks.ingest_verdict(retry)["action"] == "quarantined"
    assert bucket.exists(layout.quarantined_manifest_key("conc-bad", retry["batch_id"]))
