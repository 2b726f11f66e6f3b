"""`leukops stack up|down|status`: the embedded local stack (S3, Postgres, Redis, MLflow; Airflow on top)."""

from __future__ import annotations

import argparse

from pipelines.cli import Output, add_command, add_dev_exposure_flag

MARK = {True: "healthy", False: "DOWN"}


def register(sub: argparse._SubParsersAction) -> None:
    stack = sub.add_parser("stack", help="start, stop or inspect the embedded local stack")
    actions = stack.add_subparsers(dest="action", required=True, metavar="ACTION")
    up = add_command(actions, "up", "start SeaweedFS S3, PostgreSQL, Redis and MLflow; wait until all answer", _up)
    add_dev_exposure_flag(up)
    add_command(actions, "down", "stop every process this state dir started (Airflow's too)", _down)
    add_command(actions, "status", "report whether each component answers", _status)


def _stack():
    from pipelines.core.settings import get_settings
    from pipelines.devstack.stack import LocalStack

    return LocalStack(get_settings())


def _check_exposure(args: argparse.Namespace) -> None:
    """Real secrets only (outside dev/test); in dev, no endpoint of the stack on a non-loopback host.

    The services bind 127.0.0.1 themselves; an endpoint setting naming another host means the stack is
    meant to be reached from elsewhere, with the dev profile's public keys.
    """
    from urllib.parse import urlparse

    from pipelines.core.settings import get_settings

    settings = get_settings()
    settings.check_secrets()
    for variable, url in (
        ("LEUKOPS_S3_ENDPOINT", settings.s3_endpoint),
        ("LEUKOPS_MLFLOW_TRACKING_URI", settings.mlflow_tracking_uri),
    ):
        host = urlparse(url).hostname or ""
        settings.check_bind(host, f"the stack ({variable})", acknowledged=args.i_know_this_is_dev)


def _human(status: dict) -> str:
    s3, pg, redis, mlflow, airflow = (status[k] for k in ("s3", "postgres", "redis", "mlflow", "airflow"))
    return (
        f"S3        {s3['endpoint']}  {MARK[s3['healthy']]}\n"
        f"Postgres  {pg['socket_dir']}  {MARK[pg['healthy']]}\n"
        f"Redis     {redis['endpoint']}  {MARK[redis['healthy']]}\n"
        f"MLflow    {mlflow['uri']}  {MARK[mlflow['healthy']]}  (UI: {mlflow['uri']})\n"
        f"Airflow   {airflow['url']}  {MARK[airflow['healthy']]}\n"
        f"state     {status['state_dir']}"
    )


def _up(args: argparse.Namespace) -> Output:
    _check_exposure(args)
    status = _stack().up()
    return Output(status, _human(status))


def _down(args: argparse.Namespace) -> Output:
    stopped = _stack().down()
    listing = ", ".join(f"{name} (pid {pid})" for name, pid in stopped.items())
    text = f"stopped {listing}" if stopped else "nothing of ours was running"
    return Output({"stopped": stopped}, text)


def _status(args: argparse.Namespace) -> Output:
    """Exit 0 when the storage stack answers (Airflow is optional on top; its health is reported)."""
    status = _stack().status()
    healthy = all(status[k]["healthy"] for k in ("s3", "postgres", "redis", "mlflow"))
    return Output(status, _human(status), exit_code=0 if healthy else 1)
