"""The promotion journal: a move is announced before it runs, and a half move ends all old or all new.

The registry is a small stand-in that moves aliases one call at a time, like MLflow, and can "die" after
a given number of calls (every later call fails, the restore included), so each crash point is exact.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest

from pipelines.cli.fsck import report
from pipelines.io import layout
from pipelines.io.registry import RegistryError
from pipelines.trust.journal import (
    DONE,
    MOVING,
    UNDONE,
    UNFINISHED_PROMOTION,
    changed_versions,
    entries,
    finish_unfinished,
    journaled_move,
    moves_towards,
    repair,
    unfinished,
)
from tests.unit.io.memory_bucket import MemoryBucket

TASK = "binary_all"


@dataclass
class Version:
    status: str = "READY"
    audit: list[dict] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)


class FlakyRegistry:
    """Aliases set one call at a time; after ``calls_left`` alias calls the server is gone."""

    def __init__(self, aliases: dict[str, str], versions: tuple[str, ...] = ("1", "2", "3")) -> None:
        self._aliases = dict(aliases)
        self.versions = {v: Version() for v in versions}
        self.calls_left: int | None = None
        self.transient = False
        self.dead = False
        self.audit_fails = False

    def _call(self) -> None:
        if self.calls_left is not None:
            if self.calls_left <= 0:
                self.dead = not self.transient  # a transient failure: back at the very next call
                self.calls_left = 0 if self.dead else None
                raise RegistryError("MLflow at http://127.0.0.1:1: connection refused")
            self.calls_left -= 1

    def model_name(self, task: str) -> str:
        return f"leukops-{task}"

    def aliases(self, task: str) -> dict[str, str]:
        if self.dead:
            raise RegistryError("MLflow at http://127.0.0.1:1: connection refused")
        return dict(self._aliases)

    def version(self, task: str, version: str) -> Version:
        if version not in self.versions:
            raise RegistryError(f"leukops-{task} has no version {version}")
        return self.versions[version]

    def move_aliases(self, task, moves, audit):  # the real one: applied, verified, restore, audit (logged)
        before = dict(self._aliases)
        try:
            for alias, version in moves:
                self._call()
                if version is None:
                    self._aliases.pop(alias, None)
                else:
                    self._aliases[alias] = version
        except RegistryError as err:
            try:
                for alias in ("champion", "previous", "challenger"):
                    self._call()
                    if alias in before:
                        self._aliases[alias] = before[alias]
                    else:
                        self._aliases.pop(alias, None)
            except RegistryError:
                raise RegistryError(f"moving aliases failed ({err}); restore failed") from err
            raise RegistryError(f"moving aliases failed ({err}); restored") from err
        if not self.audit_fails:
            self.write_audit(task, before, dict(self._aliases), audit)
        return dict(self._aliases)

    def write_audit(self, task, before, after, audit):
        for version in changed_versions(before, after):
            self.versions[version].audit.append({**audit, "before": before, "after": after})

    def revive(self) -> None:
        self.calls_left, self.dead = None, False


PROMOTE = [("previous", "1"), ("champion", "2")]
ROLLBACK = [("champion", "1"), ("previous", "2")]
AUDIT = {"action": "promote", "who": "test", "why": "unit"}


def test_a_move_is_journaled_done_and_audited_with_the_entry_id() -> None:
    store, registry = MemoryBucket(), FlakyRegistry({"champion": "1"})
    after = journaled_move(registry, store, TASK, PROMOTE, AUDIT)
    assert after == {"champion": "2", "previous": "1"}
    (entry,) = entries(store, TASK)
    assert entry.state == DONE and entry.before == {"champion": "1"} and entry.after == after
    assert [r["journal"] for r in registry.versions["2"].audit] == [entry.entry_id]
    assert json.loads(store.objects[layout.promotion_journal_key(TASK, entry.entry_id)])["state"] == DONE


def test_an_audit_tag_the_registry_failed_to_write_is_written_before_the_entry_is_done() -> None:
    store, registry = MemoryBucket(), FlakyRegistry({"champion": "1"})
    registry.audit_fails = True
    journaled_move(registry, store, TASK, PROMOTE, AUDIT)
    (entry,) = entries(store, TASK)
    assert entry.state == DONE and registry.versions["2"].audit[0]["journal"] == entry.entry_id


@pytest.mark.parametrize("calls", [0, 1])
@pytest.mark.parametrize("moves", [PROMOTE, ROLLBACK], ids=["promote", "rollback"])
def test_a_move_killed_part_way_stays_unfinished_and_repair_ends_it_all_new(calls: int, moves) -> None:
    store = MemoryBucket()
    registry = FlakyRegistry({"champion": "2", "previous": "1"} if moves is ROLLBACK else {"champion": "1"})
    registry.calls_left = calls  # the server dies after this many alias calls; its restore fails too
    with pytest.raises(RegistryError, match="journal entry .* is unfinished"):
        journaled_move(registry, store, TASK, moves, AUDIT)
    half = registry._aliases
    if calls == 1 and moves is ROLLBACK:
        assert half["champion"] == half["previous"]  # the very state the journal exists for
    (open_entry,) = unfinished(store, TASK)
    found = report(store)
    assert [p["kind"] for p in found["problems"]] == [UNFINISHED_PROMOTION]
    assert found["checked"]["promotion_journal_entries"] == 1
    registry.revive()
    (done,) = repair(registry, store)
    assert done["state"] == DONE and registry.aliases(TASK) == open_entry.after
    assert registry.aliases(TASK)["champion"] != registry.aliases(TASK)["previous"]
    assert any(r.get("journal") == open_entry.entry_id for r in registry.versions[open_entry.after["champion"]].audit)
    assert unfinished(store) == [] and report(store)["problems"] == []


def test_the_next_move_finishes_a_half_move_before_its_own() -> None:
    store, registry = MemoryBucket(), FlakyRegistry({"champion": "1"})
    registry.calls_left = 1
    with pytest.raises(RegistryError):
        journaled_move(registry, store, TASK, PROMOTE, AUDIT)
    registry.revive()
    after = journaled_move(registry, store, TASK, [("previous", "2"), ("champion", "3")], AUDIT)
    assert after == {"champion": "3", "previous": "2"}
    assert [e.state for e in entries(store, TASK)] == [DONE, DONE]
    assert entries(store, TASK)[0].finished_by == "promote"


def test_a_half_move_towards_a_deleted_version_is_undone_to_before() -> None:
    store, registry = MemoryBucket(), FlakyRegistry({"champion": "1"})
    registry.calls_left = 1
    with pytest.raises(RegistryError):
        journaled_move(registry, store, TASK, PROMOTE, AUDIT)
    registry.revive()
    del registry.versions["2"]
    (entry,) = finish_unfinished(registry, store, TASK, by="fsck --repair")
    assert entry.state == UNDONE and registry.aliases(TASK) == entry.ended == {"champion": "1"}
    assert registry.versions["1"].audit[-1]["action"] == "undo promote"


def test_an_entry_is_unfinished_until_closed_and_other_tasks_are_untouched() -> None:
    store, registry = MemoryBucket(), FlakyRegistry({"champion": "1"})
    registry.calls_left = 0
    with pytest.raises(RegistryError):
        journaled_move(registry, store, TASK, PROMOTE, AUDIT)
    assert [e.state for e in entries(store)] == [MOVING]
    assert unfinished(store, "other_task") == []


def test_moves_towards_names_only_the_aliases_that_differ() -> None:
    assert moves_towards({"champion": "1", "previous": "1"}, {"champion": "1", "previous": "2"}) == [("previous", "2")]
    assert moves_towards({"champion": "2", "challenger": "2"}, {"champion": "2"}) == [("challenger", None)]


def test_a_failed_move_the_registry_restored_is_undone_at_once_and_can_be_retried() -> None:
    store, registry = MemoryBucket(), FlakyRegistry({"champion": "1"})
    registry.calls_left, registry.transient = 1, True  # the second alias call fails; the restore works
    with pytest.raises(RegistryError, match="restored") as failed:
        journaled_move(registry, store, TASK, PROMOTE, AUDIT)
    assert "unfinished" not in str(failed.value) and registry.aliases(TASK) == {"champion": "1"}
    assert [(e.state, e.ended) for e in entries(store, TASK)] == [(UNDONE, {"champion": "1"})]
    assert journaled_move(registry, store, TASK, PROMOTE, AUDIT) == {"champion": "2", "previous": "1"}
