"""`leukops promote | approve | rollback | models list`: the promotion gate and the model registry."""

from __future__ import annotations

import argparse

from pipelines.cli import Output, add_command


def register(sub: argparse._SubParsersAction) -> None:
    promote = add_command(
        sub,
        "promote",
        "gate training run(s) and register them; exit 1 when nothing was promoted. Several --run-id: "
        "rank by validation macro-F1 and promote the first that passes",
        _promote,
    )
    promote.add_argument("--run-id", action="append", required=True, help="MLflow run id (repeatable)")
    promote.add_argument("--reason", default="manual promotion", help="why (recorded in the audit tags)")

    approve = add_command(sub, "approve", "human sign-off: a gated @challenger version becomes @champion", _approve)
    approve.add_argument("--task", required=True)
    approve.add_argument("--version", required=True, type=int)
    approve.add_argument("--reason", required=True)

    rollback = add_command(sub, "rollback", "move @champion back to @previous (recorded who/when/why)", _rollback)
    rollback.add_argument("--task", required=True)
    rollback.add_argument("--reason", required=True)

    models = sub.add_parser("models", help="registered model versions, aliases and gate results")
    actions = models.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = add_command(actions, "list", "versions of leukops-<task> with aliases, gate results, audit", _list)
    listing.add_argument("--task", required=True)


def _checks_text(result: dict) -> str:
    return "\n".join(f"  {'pass' if c['passed'] else 'FAIL'}  {c['name']}: {c['detail']}" for c in result["checks"])


def _promotion_text(result: dict) -> str:
    if result["promoted"]:
        head = f"run {result['run_id']} promoted: {result['task']} v{result['version']} is @champion"
    elif result["awaiting_approval"]:
        head = (
            f"run {result['run_id']} passed the gate: v{result['version']} is @challenger; "
            f"`leukops approve --task {result['task']} --version {result['version']}` makes it champion"
        )
    else:
        failed = ", ".join(result["failed"])
        head = f"run {result['run_id']} refused (failed: {failed}); registered as v{result['version']}"
    return f"{head}\n{_checks_text(result)}\ngate report: {result['gate_report']}"


def _promote(args: argparse.Namespace) -> Output:
    from pipelines.trust.promote import promote_run, select_and_promote

    if len(args.run_id) == 1:
        result = promote_run(args.run_id[0], args.reason)
        return Output(result, _promotion_text(result), exit_code=0 if result["promoted"] else 1)
    selection = select_and_promote(args.run_id, args.reason)
    chosen = next((r for r in selection["results"] if r["passed"]), selection["results"][-1])
    data = {**{k: chosen[k] for k in ("promoted", "version", "aliases", "checks")}, **selection}
    text = "\n\n".join(_promotion_text(r) for r in selection["results"])
    return Output(data, text, exit_code=0 if selection["promoted"] else 1)


def _approve(args: argparse.Namespace) -> Output:
    from pipelines.trust.promote import approve

    result = approve(args.task, args.version, args.reason)
    return Output(result, f"{args.task} v{result['version']} is @champion (aliases: {result['aliases']})")


def _rollback(args: argparse.Namespace) -> Output:
    from pipelines.trust.promote import rollback

    result = rollback(args.task, args.reason)
    text = f"{args.task}: @champion v{result['rolled_back']} -> v{result['champion']} ({result['aliases']})"
    return Output(result, text)


def _list(args: argparse.Namespace) -> Output:
    from pipelines.trust.promote import list_models

    result = list_models(args.task)
    rows = [
        f"v{v['version']:<4} {','.join(v['aliases']) or '-':<22} gate={v['gate'].get('passed', '?'):<6} "
        f"failed={v['gate'].get('failed') or '-'}  run={v['run_id']}"
        for v in result["versions"]
    ]
    return Output(result, f"{result['name']} ({len(rows)} versions)\n" + "\n".join(rows))
