"""`leukops airflow init|up|test`: Airflow on the embedded stack (sqlite metadata under the state dir)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipelines.cli import Output, add_command


def register(sub: argparse._SubParsersAction) -> None:
    airflow = sub.add_parser("airflow", help="run the leukops DAGs on a local Airflow")
    actions = airflow.add_subparsers(dest="action", required=True, metavar="ACTION")
    for parser in (
        add_command(actions, "init", "migrate the metadata DB and create the `gpu` pool", _init),
        add_command(actions, "up", "airflow standalone (UI on http://localhost:8080) with these settings", _up),
        add_command(actions, "test", "run one DAG end to end with `airflow dags test`", _test),
    ):
        parser.add_argument("--dags-dir", type=Path, default=Path("dags"))
    demo = add_command(sub, "demo", "the three DAGs end to end on the embedded stack, then a summary", _demo)
    demo.add_argument("--task", default="all_subtypes")
    demo.add_argument("--data", type=Path, default=None, help="a real image folder (one sub-folder per label)")
    demo.add_argument("--per-class", type=int, default=40, help="synthetic images per class")
    demo.add_argument("--image-size", type=int, default=128)
    demo.add_argument("--dags-dir", type=Path, default=Path("dags"))
    actions.choices["test"].add_argument("dag_id")
    actions.choices["test"].add_argument("--conf", type=json.loads, default=None, help="run conf as JSON")


def _settings():
    from pipelines.core.settings import get_settings

    return get_settings()


def _init(args: argparse.Namespace) -> Output:
    from pipelines.devstack.airflow_local import init

    home = init(_settings(), args.dags_dir)
    return Output({"airflow_home": str(home), "pool": "gpu"}, f"Airflow home {home} migrated; pool `gpu` ready")


def _up(args: argparse.Namespace) -> Output:
    from pipelines.devstack.airflow_local import standalone

    code = standalone(_settings(), args.dags_dir)
    return Output({"exit_code": code}, f"airflow standalone exited with {code}", exit_code=code)


def _test(args: argparse.Namespace) -> Output:
    from pipelines.devstack.airflow_local import dags_test, init

    settings = _settings()
    init(settings, args.dags_dir)
    result = dags_test(settings, args.dags_dir, args.dag_id, args.conf)
    data = {"dag_id": result.dag_id, "run_id": result.run_id, "state": result.state, "tasks": result.task_states}
    text = f"{result.dag_id} {result.run_id}: {result.state}\n" + "\n".join(
        f"  {task}: {', '.join(states)}" for task, states in result.task_states.items()
    )
    return Output(data, text + f"\n  log: {result.log_path}", exit_code=0 if result.state == "success" else 1)


def _demo(args: argparse.Namespace) -> Output:
    import sys

    from pipelines.devstack.demo import render_summary, run_demo

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    summary = run_demo(
        _settings(), args.task, args.data, args.dags_dir, per_class=args.per_class, image_size=args.image_size, say=say
    )
    failed = [dag for dag, run in summary["dag_runs"].items() if run["state"] != "success"]
    return Output(summary, render_summary(summary), exit_code=1 if failed else 0)
