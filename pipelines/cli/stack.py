"""`leukops stack up|down|status`: the embedded local S3 + MLflow stack."""

from __future__ import annotations

import argparse

from pipelines.cli import Output, add_command


def register(sub: argparse._SubParsersAction) -> None:
    stack = sub.add_parser("stack", help="start, stop or inspect the embedded local S3 + MLflow stack")
    actions = stack.add_subparsers(dest="action", required=True, metavar="ACTION")
    add_command(actions, "up", "start SeaweedFS S3 and the MLflow server; wait until both answer", _up)
    add_command(actions, "down", "stop the processes this state dir started", _down)
    add_command(actions, "status", "report whether S3 and MLflow answer", _status)


def _stack():
    from pipelines.core.settings import get_settings
    from pipelines.devstack.stack import LocalStack

    return LocalStack(get_settings())


def _human(status: dict) -> str:
    s3, mlflow = status["s3"], status["mlflow"]
    mark = {True: "healthy", False: "DOWN"}
    return (
        f"S3      {s3['endpoint']}  {mark[s3['healthy']]}\n"
        f"MLflow  {mlflow['uri']}  {mark[mlflow['healthy']]}  (UI: {mlflow['uri']})\n"
        f"state   {status['state_dir']}"
    )


def _up(args: argparse.Namespace) -> Output:
    status = _stack().up()
    return Output(status, _human(status))


def _down(args: argparse.Namespace) -> Output:
    stopped = _stack().down()
    listing = ", ".join(f"{name} (pid {pid})" for name, pid in stopped.items())
    text = f"stopped {listing}" if stopped else "nothing of ours was running"
    return Output({"stopped": stopped}, text)


def _status(args: argparse.Namespace) -> Output:
    status = _stack().status()
    healthy = status["s3"]["healthy"] and status["mlflow"]["healthy"]
    return Output(status, _human(status), exit_code=0 if healthy else 1)
