"""`leukops airflow init|up|token|test`: Airflow (CeleryExecutor) on the embedded stack's Postgres + Redis."""

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
        add_command(
            actions,
            "up",
            "api-server, scheduler, dag-processor, triggerer and the default + gpu Celery workers on the stack",
            _up,
        ),
        add_command(actions, "test", "run one DAG end to end with `airflow dags test`", _test),
    ):
        parser.add_argument("--dags-dir", type=Path, default=Path("dags"))
    actions.choices["up"].add_argument(
        "--detach", action="store_true", help="return once every component is healthy (stop: `leukops stack down`)"
    )
    add_command(actions, "token", "print a bearer token (JWT) for the local Airflow REST API", _token)
    demo = add_command(sub, "demo", "the three DAGs under the local scheduler (REST API), then a summary", _demo)
    demo.add_argument("--task", default="all_subtypes")
    demo.add_argument("--data", type=Path, default=None, help="a real image folder (one sub-folder per label)")
    demo.add_argument("--per-class", type=int, default=60, help="synthetic images per class")
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
    import time

    from pipelines.devstack.airflow_services import wait_forever
    from pipelines.devstack.stack import LocalStack

    airflow = LocalStack(_settings()).airflow
    started = time.monotonic()
    status = airflow.up(args.dags_dir)
    text = f"Airflow {status['url']} healthy after {time.monotonic() - started:.0f}s (user admin)"
    if not args.detach:
        print(text + "; Ctrl-C stops it", flush=True)
        wait_forever(airflow)
        return Output({**status, "stopped": True}, "Airflow stopped")
    return Output(status, text)


def _token(args: argparse.Namespace) -> Output:
    from pipelines.devstack.stack import LocalStack

    token = LocalStack(_settings()).airflow.token()
    return Output({"token": token}, token)


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

    from pipelines.devstack.demo import render_summary, run_demo, succeeded

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    summary = run_demo(
        _settings(), args.task, args.data, args.dags_dir, per_class=args.per_class, image_size=args.image_size, say=say
    )
    return Output(summary, render_summary(summary), exit_code=0 if succeeded(summary) else 1)
