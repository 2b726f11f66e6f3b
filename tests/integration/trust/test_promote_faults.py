"""Promotions against each other and against failures, on the session's MLflow server and SeaweedFS.

Two promotions of one registered model at once run in real parallel processes (spawned, released at one
barrier once their clients are built).

MLflow moves aliases one call at a time and the gate compares with the champion it read: without the
promotion lease both candidates were gated against the same (no) champion, and the later alias moves
either overwrote the earlier ones or failed with "@champion moved while ... being gated". With it they run
in turn: the second is gated against the first's outcome, or, after waiting longer than
``journal.PROMOTION_WAIT_S``, fails naming the holder with nothing registered.

A move that fails and is restored re-signs the restored champion: test_promote.py's rollback test.
"""

from __future__ import annotations

import os
import socket
import uuid

import pytest

from pipelines.io.registry import Registry
from pipelines.trust.attestation import verify_champion
from pipelines.trust.journal import MOVING, entries, promotion_lease
from tests.integration.data.parallel import run_together
from tests.integration.trust.promote_jobs import promote_job
from tests.integration.trust.test_promote import CANDIDATES, HITS, TASK, _log_candidate, snapshots  # noqa: F401


@pytest.fixture(scope="module")
def runs(stack, settings, snapshots) -> dict[str, str]:  # noqa: F811 - the imported fixture
    return {name: _log_candidate(settings, name, CANDIDATES[name], hits=HITS[name]) for name in ("good", "better")}


@pytest.fixture
def fresh(settings):
    """Settings whose registered model is new (own prefix)."""
    return settings.model_copy(update={"registered_model_prefix": f"c{uuid.uuid4().hex[:8]}"})


def _open_entries(store, settings) -> list:
    model = settings.registered_model_name(TASK)
    return [e for e in entries(store, TASK) if e.model == model and e.state == MOVING]


def test_two_promotions_at_once_run_in_turn_and_leave_the_aliases_consistent(runs, fresh, store) -> None:
    prefix = fresh.registered_model_prefix
    outcomes = run_together(
        [(promote_job, (prefix, runs["good"], "nightly a")), (promote_job, (prefix, runs["better"], "nightly b"))]
    )
    assert not [o for o in outcomes if "error" in o], outcomes
    earlier, later = sorted((o["result"] for o in outcomes), key=lambda r: r["version"])
    assert (earlier["version"], later["version"]) == (1, 2)
    assert earlier["champion_before"] is None and earlier["promoted"]
    gated_against = (later["champion_before"] or {}).get("version")
    assert str(gated_against) == "1", "the second must be gated against the first one's champion"

    aliases = Registry.from_settings(fresh).aliases(TASK)
    if earlier["run_id"] == runs["good"]:  # the better one came second: it wins, good is the rollback target
        assert aliases == {"champion": "2", "previous": "1"} and later["promoted"]
    else:  # the better one came first: good is worse than it, kept only as a challenger
        assert aliases == {"champion": "1", "challenger": "2"} and not later["promoted"]
    assert aliases["champion"] != aliases.get("previous")
    assert _open_entries(store, fresh) == []
    assert verify_champion(fresh, TASK).version == aliases["champion"]  # serving would load it


def test_a_promotion_that_waits_past_the_limit_fails_naming_the_holder_and_changes_nothing(runs, fresh, store) -> None:
    model = fresh.registered_model_name(TASK)
    with promotion_lease(store, model):  # held by this test process, alive on this host
        (outcome,) = run_together([(promote_job, (fresh.registered_model_prefix, runs["good"], "blocked", 3.0))])
    assert outcome.get("error", "").startswith("LeaseBusyError"), outcome
    assert f"promote/{model} is held by pid {os.getpid()} on {socket.gethostname()}" in outcome["error"]
    assert Registry.from_settings(fresh).aliases(TASK) == {}  # nothing gated, registered or moved
    assert Registry.from_settings(fresh).versions(TASK) == []
    assert _open_entries(store, fresh) == []
