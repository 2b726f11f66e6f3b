"""Leases: one holder at a time of a named resource (e.g. a training run key), built on S3 conditional creates.

Ticket n of lease ``name`` is ``layout.lease_ticket_key(name, n)``, created with ``If-None-Match: *``
(``ObjectStore.put_new``, atomic on SeaweedFS and MinIO). Its holder owns the lease until it creates
``layout.lease_release_key(name, n)``, or its record expires (``expires_at``; a heartbeat thread renews
it every ``ttl_s / 3``), or, on the same host, its process is gone: a SIGKILLed `leukops train` frees
its lease at once, so the next invocation resumes the checkpoint. To acquire: read the newest ticket;
when it is free, create the next one; losing that create means another process got it first, so look
again. A busy lease is waited for up to ``wait_s``, then `LeaseBusyError` names its holder. Expiry uses
the wall clocks of the hosts involved: keep them in sync (NTP) when holders run on several machines.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any

from pipelines.core.errors import LeukopsError
from pipelines.io import layout
from pipelines.io.storage import ObjectMissingError, PreconditionFailedError, StorageError

if TYPE_CHECKING:
    from pipelines.io.storage import ObjectStore

log = logging.getLogger(__name__)

DEFAULT_TTL_S = 60.0
DEFAULT_POLL_S = 1.0


class LeaseBusyError(LeukopsError):
    """The lease stayed held by another process for longer than the caller would wait."""


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def is_free(record: dict[str, Any] | None, released: bool, now: float, host: str) -> bool:
    """May the holder of this ticket be succeeded: released, expired, or a dead process on this host."""
    if record is None or released or float(record.get("expires_at", 0)) < now:
        return True
    return record.get("host") == host and not pid_alive(int(record.get("pid", -1)))


def describe(record: dict[str, Any]) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(float(record.get("acquired_at", 0))))
    return f"pid {record.get('pid')} on {record.get('host')} since {since} UTC"


class Lease:
    """``with Lease(store, name): ...``: the body runs while this process alone holds ``name``."""

    def __init__(
        self,
        store: ObjectStore,
        name: str,
        *,
        ttl_s: float = DEFAULT_TTL_S,
        wait_s: float = 6 * 3600.0,
        poll_s: float = DEFAULT_POLL_S,
    ) -> None:
        self.store, self.name = store, name
        self.ttl_s, self.wait_s, self.poll_s = ttl_s, wait_s, poll_s
        self.token = uuid.uuid4().hex
        self.host = socket.gethostname()
        self.ticket = 0
        self.acquired_at = 0.0
        self.waited_s = 0.0
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def _body(self) -> bytes:
        """The holder's record: a unique owner token (so a retried create can tell its own write), expiry."""
        import json

        record = {
            "owner": self.token,
            "host": self.host,
            "pid": os.getpid(),
            "acquired_at": self.acquired_at,
            "expires_at": time.time() + self.ttl_s,
        }
        return json.dumps(record, sort_keys=True).encode()

    def newest(self) -> tuple[int, dict[str, Any] | None, bool]:
        """(newest ticket number or 0, its holder's record, whether it was released)."""
        keys = self.store.list(layout.lease_dir(self.name))
        ticket = max((n for k in keys if (n := layout.ticket_of_lease_key(k)) is not None), default=0)
        if ticket == 0:
            return 0, None, True
        try:
            record = self.store.get_json(layout.lease_ticket_key(self.name, ticket))
        except ObjectMissingError:
            record = None
        return ticket, record, layout.lease_release_key(self.name, ticket) in keys

    def acquire(self) -> None:
        started = time.monotonic()
        while True:
            ticket, record, released = self.newest()
            if is_free(record, released, time.time(), self.host):
                self.acquired_at = time.time()
                try:
                    self.store.put_new(layout.lease_ticket_key(self.name, ticket + 1), self._body())
                except PreconditionFailedError:
                    continue  # another process took that ticket: look again
                self.ticket, self.waited_s = ticket + 1, time.monotonic() - started
                return
            if time.monotonic() - started > self.wait_s:
                raise LeaseBusyError(
                    f"{self.name} is held by {describe(record or {})}; waited {self.wait_s:.0f} s "
                    f"(its lease: {self.store.uri(layout.lease_ticket_key(self.name, ticket))})"
                )
            time.sleep(self.poll_s)

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self.store.put_bytes(layout.lease_ticket_key(self.name, self.ticket), self._body())
            except StorageError as err:  # the next beat tries again; past the ttl another may take over
                log.warning("could not renew lease %s: %s", self.name, err)

    def release(self) -> None:
        try:
            self.store.put_new(layout.lease_release_key(self.name, self.ticket), b"released\n")
        except PreconditionFailedError:
            pass  # already released
        if self.ticket > 2:  # every holder removes the ticket before its predecessor: the listing stays short
            older = self.ticket - 2
            for key in (layout.lease_ticket_key(self.name, older), layout.lease_release_key(self.name, older)):
                self.store.delete(key)

    def __enter__(self) -> Lease:
        self.acquire()
        self._heartbeat = threading.Thread(target=self._renew, name=f"lease {self.name}", daemon=True)
        self._heartbeat.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
        self.release()
