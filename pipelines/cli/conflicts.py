"""`leukops conflict list|resolve`: images whose bytes came under two labels, and their audited resolution."""

from __future__ import annotations

import argparse

from pipelines.cli import Output, add_command


def register(sub: argparse._SubParsersAction) -> None:
    conflict = sub.add_parser("conflict", help="label conflicts: same bytes under two labels (held out of snapshots)")
    actions = conflict.add_subparsers(dest="action", required=True, metavar="ACTION")
    add_command(actions, "list", "list images with a label conflict, unresolved first", _list)
    resolve = add_command(actions, "resolve", "decide an image's label; snapshots use it from now on", _resolve)
    resolve.add_argument("sha", metavar="SHA", help="the image's sha256 (see `leukops conflict list`)")
    resolve.add_argument("--label", required=True, help="the class the image belongs to")
    resolve.add_argument("--reason", required=True, help="why (kept in the audit trail with who and when)")


def _store():
    from pipelines.core.settings import get_settings
    from pipelines.io.storage import ObjectStore

    settings = get_settings()
    return settings, ObjectStore.from_settings(settings)


def _list(args: argparse.Namespace) -> Output:
    from pipelines.data.conflicts import list_conflicts

    _, store = _store()
    conflicts = list_conflicts(store)
    lines = []
    for c in conflicts:
        labels = ", ".join(sorted({f"{r['label']} ({r['source']})" for r in c["rows"]}))
        state = f"resolved → {c['label']} ({c['resolution']})" if c["resolved"] else "UNRESOLVED"
        lines.append(f"{c['sha256']}  {state}: {labels}")
    return Output({"conflicts": conflicts}, "\n".join(lines) or "no label conflicts")


def _resolve(args: argparse.Namespace) -> Output:
    import getpass
    from datetime import UTC, datetime

    from pipelines.data.conflicts import resolve_conflict

    settings, store = _store()
    record = resolve_conflict(
        store,
        settings,
        args.sha,
        args.label,
        args.reason,
        actor=settings.actor or getpass.getuser(),
        at=datetime.now(UTC).isoformat(timespec="microseconds"),
    )
    text = f"image {args.sha} resolved to {args.label!r} by {record['resolved_by']}; audit record {record['uri']}"
    return Output(record, text)
