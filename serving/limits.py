"""Admission control of /v1: a cap on predictions in flight and a token bucket per API token.

Both say "no" at once (the dependencies in ``serving.deps`` answer 429 with Retry-After) rather than
queue: queued 40-Mpx uploads, each decoded in a thread-pool thread, are what runs a process out of
memory. The state is per process: with ``--workers N`` each worker admits its own share.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from pipelines.core.settings import ServingSettings


class InFlightCap:
    """At most ``limit`` holders at once; ``try_enter`` never waits."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0
        self._lock = threading.Lock()

    def try_enter(self) -> bool:
        with self._lock:
            if self.in_flight >= self.limit:
                return False
            self.in_flight += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self.in_flight -= 1


class TokenBucket:
    """Per key: ``burst`` requests at once, refilled at ``rate_per_s`` (rate 0: every request passes)."""

    def __init__(self, rate_per_s: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens left, when counted)
        self._lock = threading.Lock()

    def take(self, key: str) -> float:
        """0.0 when ``key`` may go on (one token spent), else the seconds until it may."""
        if self.rate_per_s <= 0:
            return 0.0
        with self._lock:
            now = self.clock()
            tokens, counted = self._buckets.get(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - counted) * self.rate_per_s)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate_per_s


@dataclass
class Admission:
    """The app's admission state: one in-flight cap for predictions, one bucket per accepted token."""

    predictions: InFlightCap
    rate: TokenBucket

    @classmethod
    def from_settings(cls, serving: ServingSettings) -> Admission:
        return cls(InFlightCap(serving.max_in_flight), TokenBucket(serving.rate_limit_per_s, serving.rate_limit_burst))


def retry_after(seconds: float) -> str:
    """A Retry-After header value: whole seconds, at least 1."""
    return str(max(1, math.ceil(seconds)))
