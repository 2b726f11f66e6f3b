"""Leases: a held one makes the next holder wait (then fail naming the holder); a released, expired
or dead holder's ticket is succeeded at once (in-memory bucket; processes: tests/integration/data)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from pipelines.io import layout
from pipelines.io.lease import Lease, LeaseBusyError, is_free
from tests.unit.io.memory_bucket import MemoryBucket

NAME = layout.training_lease_name("abc123")
HOST = socket.gethostname()


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_ticket_is_free_when_released_expired_or_its_process_is_gone() -> None:
    now = time.time()
    alive = {"host": HOST, "pid": os.getpid(), "expires_at": now + 60}
    assert not is_free(alive, released=False, now=now, host=HOST)
    assert is_free(alive, released=True, now=now, host=HOST)
    assert is_free({**alive, "expires_at": now - 1}, released=False, now=now, host=HOST)
    assert is_free({**alive, "pid": dead_pid()}, released=False, now=now, host=HOST)
    assert not is_free({**alive, "host": "elsewhere", "pid": dead_pid()}, released=False, now=now, host=HOST)
    assert is_free(None, released=False, now=now, host=HOST)


def test_a_held_lease_makes_the_next_holder_wait_then_fail_naming_the_holder() -> None:
    bucket = MemoryBucket()
    with Lease(bucket, NAME) as first:
        assert first.ticket == 1
        with pytest.raises(LeaseBusyError, match=rf"{NAME} is held by pid {os.getpid()} on {HOST}"):
            Lease(bucket, NAME, wait_s=0.3, poll_s=0.05).acquire()
    with Lease(bucket, NAME) as second:  # released: taken at once
        assert second.ticket == 2 and second.waited_s < 1


def test_the_ticket_of_a_killed_holder_is_taken_over_at_once() -> None:
    bucket = MemoryBucket()
    record = {"owner": "x", "host": HOST, "pid": dead_pid(), "acquired_at": 0, "expires_at": time.time() + 3600}
    bucket.put_new(layout.lease_ticket_key(NAME, 1), json.dumps(record).encode())
    with Lease(bucket, NAME, wait_s=0.0) as lease:
        assert lease.ticket == 2


def test_old_tickets_are_removed_on_release_so_the_listing_stays_short() -> None:
    bucket = MemoryBucket()
    for _ in range(5):
        with Lease(bucket, NAME):
            pass
    tickets = sorted(t for k in bucket.list(layout.lease_dir(NAME)) if (t := layout.ticket_of_lease_key(k)))
    assert tickets == [4, 5]
