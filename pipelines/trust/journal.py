"""The promotion journal: an alias move is announced in S3 before it runs, so a half move can be repaired.

MLflow moves aliases one call at a time, so no server makes ``@previous`` + ``@champion`` atomic: a
process killed (or a server lost) between two calls leaves them half moved, and ``@previous`` may even
equal ``@champion`` (a rollback's first step). So every move that promote, approve and rollback make is
journaled (``layout.promotion_journal_key``):

1. the entry is written with the aliases before, the moves, the aliases intended after and the audit record;
2. the aliases move (``Registry.move_aliases``: applied, read back, the audit tag written with the
   entry's id in it);
3. the audit tag is read back (written now if the registry could not) and the entry is marked ``done``.

A move that fails and whose restore put every alias back is marked ``undone`` at once (the caller saw the
failure and may retry).

The target of a move was signed before it (``trust/attestation``: a new, newest promotion sequence), and
serving loads only the newest signed version: so whatever puts ``@champion`` back (a restore, an undo)
signs the restored champion anew (action ``undo <action>``) when a newer signature exists, else serving
would refuse the very champion the undo restored.

Every command that moves a model's aliases (promote, approve, rollback, ``fsck --repair``) holds the
model's lease (``promotion_lease``, ``io/lease``) from reading the aliases to the entry's end: two at once
run in turn, and a second that waits longer than ``PROMOTION_WAIT_S`` fails naming the holder. So an entry
found ``moving`` under the lease is never a live move of another process.

An entry still ``moving`` is unfinished. The next promote, approve or rollback of that task, and
``leukops fsck --repair``, finish it first: when every version it names is still READY the aliases are
moved on to the intended ones (the target was gated and attested before its entry was written; serving
accepts only the newest attestation, so going back would leave serving nothing it may load); otherwise
they go back to the versions of before that still exist (``undone``). Either way they end all old or all
new, never between, and the audit tag of the move is on the versions.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from pipelines.io import layout
from pipelines.io.lease import Lease
from pipelines.io.registry import ALIASES, RegistryError

if TYPE_CHECKING:
    from pipelines.io.registry import Registry
    from pipelines.io.storage import ObjectStore

MOVING, DONE, UNDONE = "moving", "done", "undone"
PROMOTION_WAIT_S = 1800.0  # a gate takes minutes at most: longer means a stuck holder, named in the error
UNFINISHED_PROMOTION = "unfinished_promotion"  # the fsck problem kind
Moves = list[tuple[str, str | None]]


@dataclass(frozen=True)
class Entry:
    """One journaled alias move of a task; ``state`` is MOVING until it is DONE or UNDONE."""

    entry_id: str
    task: str
    model: str  # the registered model whose aliases move
    before: dict[str, str]
    after: dict[str, str]
    moves: list[tuple[str, str | None]]
    audit: dict[str, str]
    state: str
    started: str
    finished: str | None = None
    finished_by: str | None = None
    ended: dict[str, str] | None = None  # the aliases it ended with (``after`` when DONE)

    @property
    def key(self) -> str:
        return layout.promotion_journal_key(self.task, self.entry_id)

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"moves": [list(m) for m in self.moves]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Entry:
        return cls(**data | {"moves": [(alias, version) for alias, version in data["moves"]]})


# --- pure pieces ------------------------------------------------------------------------------------


def aliases_after(before: dict[str, str], moves: Moves) -> dict[str, str]:
    """The aliases once ``moves`` (alias, version or None to delete) are applied in order."""
    after = dict(before)
    for alias, version in moves:
        if version is None:
            after.pop(alias, None)
        else:
            after[alias] = str(version)
    return after


def moves_towards(current: dict[str, str], target: dict[str, str]) -> Moves:
    """The moves that turn ``current`` into ``target`` (champion first: it is what serving reads)."""
    return [(a, target.get(a)) for a in ALIASES if current.get(a) != target.get(a)]


def recovery(entry: Entry, current: dict[str, str], ready: set[str]) -> tuple[str, dict[str, str]]:
    """How an unfinished entry ends: DONE at its intended aliases when every version they name is READY,
    else UNDONE at the aliases of before whose versions still exist."""
    if set(entry.after.values()) <= ready:
        return DONE, entry.after
    return UNDONE, {alias: v for alias, v in entry.before.items() if v in ready}


def new_entry(task: str, model: str, before: dict[str, str], moves: Moves, audit: dict[str, str]) -> Entry:
    now = datetime.now(UTC)
    entry_id = f"{now:%Y%m%dT%H%M%S%fZ}-{uuid.uuid4().hex[:8]}"  # sorts by start
    after = aliases_after(before, moves)
    return Entry(entry_id, task, model, before, after, moves, audit, MOVING, now.isoformat(timespec="seconds"))


def problem(entry: Entry) -> dict[str, Any]:
    """The fsck problem an unfinished entry is."""
    return {
        "kind": UNFINISHED_PROMOTION,
        "key": entry.key,
        "task": entry.task,
        "detail": (
            f"{entry.audit.get('action', 'alias move')} of {entry.model} started {entry.started} "
            f"({entry.before} -> {entry.after}) never finished; `leukops fsck --repair` finishes or undoes it"
        ),
    }


# --- S3 + registry edge ---------------------------------------------------------------------------------


def entries(store: ObjectStore, task: str | None = None) -> list[Entry]:
    """Every journal entry (of one task, or of all), oldest first."""
    keys = sorted(store.list(layout.promotion_journal_dir(task)), key=lambda k: k.rsplit("/", 1)[-1])
    return [Entry.from_json(store.get_json(key)) for key in keys if key.endswith(".json")]


def unfinished(
    store: ObjectStore, task: str | None = None, model_of: Callable[[str], str] | None = None
) -> list[Entry]:
    """Entries still MOVING (only those of the models ``model_of(task)`` names, when given)."""
    found = [e for e in entries(store, task) if e.state == MOVING]
    return [e for e in found if model_of is None or e.model == model_of(e.task)]


def journal_problems(store: ObjectStore) -> tuple[list[dict[str, Any]], int]:
    """For ``leukops fsck``: one problem per unfinished entry, and how many entries were checked."""
    found = entries(store)
    return [problem(e) for e in found if e.state == MOVING], len(found)


def _ready(registry: Registry, task: str, versions: set[str]) -> set[str]:
    ready = set()
    for version in versions:
        try:
            if registry.version(task, version).status == "READY":
                ready.add(version)
        except RegistryError:  # deleted since: neither finished towards nor restored to
            continue
    return ready


def changed_versions(before: dict[str, str], after: dict[str, str]) -> set[str]:
    """Versions an alias left or reached between ``before`` and ``after`` (they carry the audit tag)."""
    return {v for a in ALIASES if before.get(a) != after.get(a) for v in (before.get(a), after.get(a)) if v}


def _audited(registry: Registry, entry: Entry, aliases: dict[str, str]) -> bool:
    """Whether a version the move changed carries the entry's audit tag (True when nothing changed)."""
    changed = changed_versions(entry.before, aliases)
    return not changed or any(
        record.get("journal") == entry.entry_id for v in changed for record in registry.version(entry.task, v).audit
    )


def _close(store: ObjectStore, entry: Entry, state: str, by: str, ended: dict[str, str]) -> Entry:
    finished = datetime.now(UTC).isoformat(timespec="seconds")
    closed = replace(entry, state=state, finished=finished, finished_by=by, ended=ended)
    store.put_json(closed.key, closed.to_json())
    return closed


def finish(registry: Registry, store: ObjectStore, entry: Entry, by: str) -> Entry:
    """End one unfinished entry (see the module doc); its audit tag is on the versions when it returns."""
    current = registry.aliases(entry.task)
    versions = set(entry.before.values()) | set(entry.after.values())
    state, target = recovery(entry, current, _ready(registry, entry.task, versions))
    audit = entry.audit | {"journal": entry.entry_id, "completed_by": by}
    if state == UNDONE:
        audit |= {"action": f"undo {entry.audit.get('action', 'move')}"}
    if current != target:
        registry.move_aliases(entry.task, moves_towards(current, target), audit)
    if not _audited(registry, entry, target):
        registry.write_audit(entry.task, entry.before, target, audit)
    closed = _close(store, entry, state, by, target)
    if state == UNDONE:
        sign_restored(registry, entry, target.get("champion"), audit)  # audit's action: "undo <action>"
    return closed


def finish_unfinished(registry: Registry, store: ObjectStore, task: str, by: str) -> list[Entry]:
    """Finish every unfinished entry of ``task``, oldest first (before a new move of its aliases)."""
    return [finish(registry, store, entry, by) for entry in unfinished(store, task, registry.model_name)]


def promotion_lease(store: ObjectStore, model: str) -> Lease:
    """``with promotion_lease(store, model):`` the body alone moves ``model``'s aliases."""
    return Lease(store, layout.promotion_lease_name(model), wait_s=PROMOTION_WAIT_S)


def repair(registry: Registry, store: ObjectStore, by: str = "fsck --repair") -> list[dict[str, Any]]:
    """``leukops fsck --repair``: every unfinished entry of this registry's models finished or undone,
    each under its model's lease (an entry a running promote is moving is ended by that promote)."""
    repaired = []
    for found in unfinished(store, model_of=registry.model_name):
        with promotion_lease(store, found.model):
            entry = Entry.from_json(store.get_json(found.key))  # its holder may have ended it meanwhile
            if entry.state != MOVING:
                continue
            closed = finish(registry, store, entry, by)
        repaired.append({"key": closed.key, "task": closed.task, "state": closed.state, "aliases": closed.ended})
    return repaired


def journaled_move(
    registry: Registry, store: ObjectStore, task: str, moves: Moves, audit: dict[str, str]
) -> dict[str, str]:
    """``Registry.move_aliases`` announced in the journal first; the aliases after the move.

    Unfinished entries of the task are finished first. When the move fails part-way the entry stays
    unfinished (the registry's restore may itself have failed): the error says so, and the next move
    or ``fsck --repair`` ends it.
    """
    finish_unfinished(registry, store, task, by=audit.get("action", "move"))
    entry = new_entry(task, registry.model_name(task), registry.aliases(task), moves, audit)
    store.put_new(entry.key, _json_bytes(entry))
    try:
        after = registry.move_aliases(task, moves, audit | {"journal": entry.entry_id})
    except RegistryError as err:
        if _restored(registry, entry):  # nothing is half moved: the caller retries knowing it failed
            _close(store, entry, UNDONE, audit.get("action", "move"), entry.before)
            undo = {"action": f"undo {audit.get('action', 'move')}"}
            sign_restored(registry, entry, entry.before.get("champion"), audit | undo)
            raise
        raise RegistryError(
            f"{err}; promotion journal entry {entry.key} is unfinished: the next promote, approve, rollback "
            "or `leukops fsck --repair` ends it"
        ) from err
    if not _audited(registry, entry, after):  # the registry logged a failed audit tag: the move still needs it
        registry.write_audit(task, entry.before, after, audit | {"journal": entry.entry_id})
    _close(store, entry, DONE, audit.get("action", "move"), after)
    return after


def sign_restored(registry: Registry, entry: Entry, champion: str | None, audit: dict[str, str]) -> None:
    """Sign the restored ``champion`` as the newest promotion (``audit``'s action, "undo ...") when the
    undone move's target (signed before the move) holds a newer signature than it."""
    from pipelines.trust.attestation import attest, newest_sequence, signing_key

    target = entry.after.get("champion")
    if champion is None or target is None or target == champion:
        return
    try:
        signed = registry.version(entry.task, target).tags.get(layout.ATTESTATION_TAG)
    except RegistryError:  # the target was deleted, its signature with it
        return
    if signed is None:
        return
    public = signing_key(registry.settings).public_key()
    own = registry.version(entry.task, champion).tags.get(layout.ATTESTATION_TAG)
    if newest_sequence([own] if own else [], public) < newest_sequence([signed], public):
        why = f"{audit.get('why', '')} (journal {entry.entry_id}: @champion restored)".strip()
        attest(registry, registry.settings, entry.task, champion, audit["action"], why, audit.get("who") or "journal")


def _restored(registry: Registry, entry: Entry) -> bool:
    """Whether the registry's own restore after a failed move put every alias back (False: unreadable)."""
    try:
        return registry.aliases(entry.task) == entry.before
    except RegistryError:
        return False


def _json_bytes(entry: Entry) -> bytes:
    return json.dumps(entry.to_json(), sort_keys=True).encode()
