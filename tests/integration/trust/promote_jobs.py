"""Jobs of the concurrent-promotion tests (``tests.integration.data.parallel``): each builds its registry
client in its own spawned process and returns the promotion the barrier releases."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from pipelines.core.settings import get_settings


def promote_job(prefix: str, run_id: str, reason: str, wait_s: float | None = None) -> Callable[[], dict[str, Any]]:
    """``promote_run`` of one run under the registered-model ``prefix``; ``wait_s`` shortens the lease wait."""
    from pipelines.io.registry import Registry
    from pipelines.trust import journal
    from pipelines.trust.promote import promote_run

    if wait_s is not None:
        journal.PROMOTION_WAIT_S = wait_s
    settings = get_settings().model_copy(update={"registered_model_prefix": prefix})
    Registry.from_settings(settings).read_run(run_id)  # clients built before the barrier: the race is the promote

    def act() -> dict[str, Any]:
        started = time.time()
        return {"result": promote_run(run_id, reason, settings), "started": started, "ended": time.time()}

    return act
