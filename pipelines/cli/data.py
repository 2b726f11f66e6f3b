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
    add.add_argument(
        "--group-by",
        default=None,
        metavar="SPEC",
        help="images that must share a split: 'patient' (csv patient_id), 'source', or 'regex:PATTERN' over the "
        "file's relative path (the capture groups, joined by '/', are the group key); see --group-block",
    )
    add.add_argument(
        "--group-block",
        type=int,
        default=None,
        metavar="N",
        help="with regex: the named group (?P<key>\\d+) counts in blocks of N (key // N), e.g. for the ALL set "
        "--group-by 'regex:^([^/]+)/.*?(?P<key>\\d+)\\.\\w+$' --group-block 20",
    )
    add.add_argument(
        "--split",
        default=None,
        metavar="TRAIN/VAL/TEST",
        help="this source's split shares in percent (default 80/10/10), e.g. 50/10/40 for a small new lab whose "
        "test split must carry per-site checks",
    )
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


def _split_shares(text: str | None) -> dict[str, float] | None:
    from pipelines.data.groups import SPLITS
    from pipelines.data.sources import SourceError

    if text is None:
        return None
    parts = text.split("/")
    try:
        percents = [float(p) for p in parts]
    except ValueError:
        percents = []
    if len(percents) != len(SPLITS):
        raise SourceError(f"--split {text!r}: expected three percentages TRAIN/VAL/TEST, e.g. 50/10/40")
    return {split: round(p / 100, 4) for split, p in zip(SPLITS, percents, strict=True)}


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
        group_block=args.group_block,
        split_shares=_split_shares(args.split),
        licence=args.licence,
        notes=args.notes,
    )
    settings = get_settings()
    grouping = _grouping_preview(source, settings)
    path = save_source(source, settings, replace=args.replace)
    text = f"registered source {args.name!r} in {path}"
    if grouping:
        text += (
            f"\n  grouping: {grouping['files']} files in {grouping['groups']} groups "
            f"(largest {grouping['largest_group']!r}, {grouping['largest_group_files']} files)"
        )
    return Output({"source": args.name, "file": str(path), "grouping": grouping}, text)


def _grouping_preview(source, settings) -> dict | None:
    """A regex grouping of a local folder, tried on its files now; refused when a file matches no group."""
    from pipelines.data.groups import preview
    from pipelines.data.sources import SourceError, list_files, reader_for, source_path, validate_source

    where = str(source_path(source.name, settings))
    source = validate_source(source, where)
    if not source.grouping.is_regex or source.is_s3:
        return None
    paths = [f.path for f in list_files(source, reader_for(source, settings)) if f.readable]
    found = preview(source.grouping, paths)
    if found["unmatched"]:
        raise SourceError(
            f"{where}: group_by {source.group_by!r} gives no group to {found['unmatched']} of {found['files']} "
            f"files in {source.location} (e.g. {', '.join(found['unmatched_examples'])}); such files would be split "
            "one by one, so fix the pattern"
        )
    return found


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
            "group_block": s.group_block,
            "split_shares": s.grouping.shares,
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
    per_split = "  ".join(f"{s}={n}" for s, n in data["groups_per_split"].items())
    lines.append(
        f"  groups {data['n_groups']} (largest {data['largest_group_share']:.1%} of images; per split {per_split}); "
        f"ledger version {data['ledger_version']}"
    )
    for source, change in data["regrouped_sources"].items():
        lines.append(f"  grouping of {source!r} changed ({change['from']} → {change['to']}): splits re-drawn")
    if data["champion_reevaluation_required"]:
        lines.append("  new ledger version: the champion must be re-evaluated on this dataset before gating")
    lines += [f"  warning: {w}" for w in data["warnings"]]
    return Output(data, "\n".join(lines))
