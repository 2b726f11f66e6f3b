"""The adapter's conditional writes: refusals become PreconditionFailedError, a retried write that
already landed is recognised as its own (over the in-memory bucket; the real server: integration)."""

from __future__ import annotations

import pytest

from pipelines.io.storage import ObjectMissingError, PreconditionFailedError
from tests.unit.io.memory_bucket import MemoryBucket, etag


def test_put_new_creates_once_and_refuses_other_bytes() -> None:
    bucket = MemoryBucket()
    assert bucket.put_new("state/x.json", b"first") == etag(b"first")
    with pytest.raises(PreconditionFailedError, match="precondition failed"):
        bucket.put_new("state/x.json", b"second")
    assert bucket.get_bytes("state/x.json") == b"first"


def test_put_new_whose_reply_was_lost_counts_as_its_own_write() -> None:
    bucket = MemoryBucket()
    bucket._boto.lose_replies = 1  # lands, then the connection drops: the retry meets its own object
    assert bucket.put_new("state/x.json", b"mine") == etag(b"mine")


def test_put_if_match_replaces_only_the_version_that_was_read() -> None:
    bucket = MemoryBucket()
    first = bucket.put_new("state/p.json", b"1")
    data, tag = bucket.get_with_etag("state/p.json")
    assert (data, tag) == (b"1", first)
    second = bucket.put_if_match("state/p.json", b"2", tag)
    with pytest.raises(PreconditionFailedError):
        bucket.put_if_match("state/p.json", b"3", tag)  # stale: someone wrote "2" since
    assert bucket.get_with_etag("state/p.json") == (b"2", second)


def test_put_if_match_on_a_missing_key_is_refused_and_get_names_the_key() -> None:
    bucket = MemoryBucket()
    with pytest.raises(PreconditionFailedError, match="gone"):
        bucket.put_if_match("state/none.json", b"x", '"abc"')
    with pytest.raises(ObjectMissingError, match="state/none.json"):
        bucket.get_with_etag("state/none.json")
