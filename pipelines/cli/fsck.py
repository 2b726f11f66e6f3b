"""`leukops fsck`: check that the bucket agrees with its manifests and split ledgers (``data/fsck``) and
that no promotion journal entry is unfinished (``trust/journal``); ``--repair`` ends those first."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from pipelines.cli import Output, add_command

if TYPE_CHECKING:
    from pipelines.io.storage import ObjectStore

SHOWN_PROBLEMS = 20  # human text lists this many; --json lists every one


def register(sub: argparse._SubParsersAction) -> None:
    parser = add_command(
        sub,
        "fsck",
        "find raw objects without a manifest row, manifest rows without an object, ledger rows without a "
        "snapshot and unfinished promotions; exit 1 when any is found",
        _fsck,
    )
    parser.add_argument(
        "--repair",
        action="store_true",
        help="first finish (or undo) every unfinished promotion journal entry, so each task's aliases are all "
        "old or all new; the other problems are only reported",
    )


def report(store: ObjectStore) -> dict[str, Any]:
    """``data.fsck.fsck`` with the promotion journal's problems (trust sits above data: joined here)."""
    from pipelines.data.fsck import fsck
    from pipelines.trust.journal import journal_problems

    found = fsck(store)
    problems, entries = journal_problems(store)
    found["problems"] += problems
    found["checked"]["promotion_journal_entries"] = entries
    return found


def _fsck(args: argparse.Namespace) -> Output:
    from pipelines.core.settings import get_settings
    from pipelines.io.registry import Registry
    from pipelines.io.storage import ObjectStore
    from pipelines.trust.journal import repair

    settings = get_settings()
    store = ObjectStore.from_settings(settings)
    repaired = repair(Registry.from_settings(settings), store) if args.repair else None
    found = report(store)
    if repaired is not None:
        found["repaired"] = repaired
    return Output(found, _human(found), exit_code=1 if found["problems"] else 0)


def _human(report: dict) -> str:
    checked = report["checked"]
    problems = report["problems"]
    lines = [
        f"{len(problems)} problem(s); checked {checked['raw_objects']} raw objects, {checked['manifest_rows']} "
        f"manifest rows in {checked['batches']} batches, ledger rows {checked['ledger_rows'] or 'none'}"
    ]
    lines += [f"  repaired {r['key']}: {r['state']}, aliases {r['aliases']}" for r in report.get("repaired", [])]
    lines += [f"  {p['kind']}: {p.get('key') or p.get('sha256')}: {p['detail']}" for p in problems[:SHOWN_PROBLEMS]]
    if len(problems) > SHOWN_PROBLEMS:
        lines.append(f"  ... and {len(problems) - SHOWN_PROBLEMS} more (--json lists them all)")
    return "\n".join(lines)
