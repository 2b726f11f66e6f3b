"""`leukops source add|list`, `ingest`, `quarantine list|release`, `snapshot`: the data commands."""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from pathlib import Path

from pipelines.cli import Output, add_command


def register(sub: argparse._SubParsersAction) -> None:
    source = sub.add_parser("source", help="register or list image sources (expectations/sources/*.yaml)")
    actions = source.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = add_command(actions, "add", "register a source: write <sources_dir>/<NAME>.yaml", _source_add)
    add.add_argument("name", metavar="NAME")
    add.add_argument("--path", required=True, help="local folder, or s3://bucket/prefix (a landing zone)")
    add.add_argument("--layout", choices=("folders", "csv"), default="folders")
    add.add_argument("--csv", default="manifest.csv", help="csv layout: manifest path relative to --path")
    add.add_argument("--task", action="append", required=True, dest="tasks", help="task fed (repeatable)")
    add.add_argument("--role", choices=("train", "holdout"), default="train")
    add.add_argument("--label-map", nargs="*", default=None, metavar="SRC=CLASS", help="default: identity")
    add.add_argument("--group-by", choices=("patient", "source"), default=None)
    add.add_argument("--licence", default="")
    add.add_argument("--notes", default="")
    add.add_argument("--replace", action="store_true", help="overwrite an existing definition")
    add_command(actions, "list", "list registered sources", _source_list)

    ingest = add_command(sub, "ingest", "ingest the files of a source that are new to it", _ingest)
    ingest.add_argument("name", metavar="NAME")
    ingest.add_argument("--date", default=None, help="report date YYYY-MM-DD (default: today, UTC)")
    ingest.add_argument("--workers", type=int, default=8)

    quarantine = sub.add_parser("quarantine", help="triage quarantined batches")
    q_actions = quarantine.add_subparsers(dest="action", required=True, metavar="ACTION")
    add_command(q_actions, "list", "list quarantined (and released) batches", _quarantine_list)
    release = add_command(q_actions, "release", "re-validate a batch with the current suite and publish it", _release)
    release.add_argument("batch_id", metavar="BATCH")
    release.add_argument("--reason", required=True, help="why it may be released (kept in the audit trail)")
    release.add_argument("--date", default=None)

    snap = add_command(sub, "snapshot", "build the task's dataset snapshot with the stable split", _snapshot)
    snap.add_argument("--task", required=True)


def _today(value: str | None) -> str:
    return value or datetime.now(UTC).date().isoformat()


def _store():
    from pipelines.core.settings import get_settings
    from pipelines.io.storage import ObjectStore

    settings = get_settings()
    return settings, ObjectStore.from_settings(settings)


def _label_map(pairs: list[str] | None, tasks: list[str]) -> dict[str, str]:
    from pipelines.data.sources import SourceError, default_label_map

    if not pairs:
        return default_label_map(tasks)
    malformed = [p for p in pairs if "=" not in p]
    if malformed:
        raise SourceError(f"--label-map entries must be SOURCE_LABEL=CLASS; got {malformed}")
    return dict(p.split("=", 1) for p in pairs)


def _source_add(args: argparse.Namespace) -> Output:
    from pipelines.core.settings import get_settings
    from pipelines.data.sources import Source, save_source

    location = args.path if args.path.startswith("s3://") else str(Path(args.path).expanduser().resolve())
    source = Source(
        name=args.name,
        location=location,
        layout=args.layout,
        label_map=_label_map(args.label_map, args.tasks),
        tasks=tuple(args.tasks),
        role=args.role,
        csv=args.csv,
        group_by=args.group_by,
        licence=args.licence,
        notes=args.notes,
    )
    path = save_source(source, get_settings(), replace=args.replace)
    return Output({"source": args.name, "file": str(path)}, f"registered source {args.name!r} in {path}")


def _source_list(args: argparse.Namespace) -> Output:
    from pipelines.core.settings import get_settings
    from pipelines.data.sources import list_sources

    sources = list_sources(get_settings())
    rows = [
        {
            "name": s.name,
            "location": s.location,
            "layout": s.layout,
            "tasks": list(s.tasks),
            "role": s.role,
            "label_map": s.label_map,
            "label_map_version": s.label_map_version,
            "group_by": s.group_by,
        }
        for s in sources
    ]
    text = "\n".join(f"{r['name']:<24} {r['role']:<8} {','.join(r['tasks']):<20} {r['location']}" for r in rows)
    return Output({"sources": rows}, text or "no sources registered")


def _ingest(args: argparse.Namespace) -> Output:
    from pipelines.data.ingest import ingest_source
    from pipelines.data.sources import load_source

    settings, store = _store()
    report = ingest_source(
        load_source(args.name, settings),
        settings,
        store,
        run_date=_today(args.date),
        progress=sys.stderr.isatty(),
        workers=args.workers,
    )
    lines = [report.message]
    lines += [f"  rejected {r['path']}: {r['reason']} ({r['detail']})" for r in report.rejections]
    if report.data_docs:
        lines.append(f"  data docs: {report.data_docs}")
    return Output(report.to_dict(), "\n".join(lines), exit_code=1 if report.status == "quarantined" else 0)


def _quarantine_list(args: argparse.Namespace) -> Output:
    from pipelines.data.quarantine import quarantined_batches

    _, store = _store()
    batches = quarantined_batches(store)
    text = "\n".join(f"{b['batch_id']}  {b['source']:<20} {b['status']:<11} {'; '.join(b['reasons'])}" for b in batches)
    return Output({"batches": batches}, text or "no quarantined batches")


def _release(args: argparse.Namespace) -> Output:
    import getpass

    from pipelines.data.quarantine import release_batch

    settings, store = _store()
    result = release_batch(
        store, settings, args.batch_id, args.reason, run_date=_today(args.date), released_by=getpass.getuser()
    )
    check = result["revalidation"]
    text = (
        f"released batch {args.batch_id} of {result['source']}: {check['accepted']} accepted, "
        f"{check['rejected']} rejected under suite {check['suite_version']}; manifest {result['manifest']}"
    )
    return Output(result, text)


def _snapshot(args: argparse.Namespace) -> Output:
    from pipelines.data.snapshot import snapshot_summary, take_snapshot

    settings, store = _store()
    result = take_snapshot(store, settings, args.task)
    data = snapshot_summary(args.task, result)
    lines = [f"dataset {data['dataset_version']} of {args.task}: {data['images']} images"]
    lines += [f"  {split:<5} " + "  ".join(f"{c}={n}" for c, n in per.items()) for split, per in data["counts"].items()]
    lines += [f"  warning: {w}" for w in data["warnings"]]
    return Output(data, "\n".join(lines))
