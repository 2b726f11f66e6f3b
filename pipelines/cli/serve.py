"""`leukops serve`: the champion model's REST API under uvicorn."""

from __future__ import annotations

import argparse
import os

from pipelines.cli import Output, add_command, add_dev_exposure_flag


def register(sub: argparse._SubParsersAction) -> None:
    help_text = "serve the task's @champion model over HTTP (FastAPI + uvicorn)"
    parser = add_command(sub, "serve", help_text, _serve)
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (0.0.0.0 for all)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=1, help="worker processes (each loads the model)")
    parser.add_argument("--task", help="task to serve (default: LEUKOPS_SERVING__TASK)")
    levels = ["critical", "error", "warning", "info", "debug"]
    parser.add_argument("--log-level", default="info", choices=levels, help="uvicorn log level")
    add_dev_exposure_flag(parser)


def _serve(args: argparse.Namespace) -> Output:
    import uvicorn

    from pipelines.core.settings import get_settings
    from serving.app import check_startup

    os.environ["LEUKOPS_MLFLOW_ROLE"] = "serving"  # MLflow READ only, never the dev default (promotion)
    if args.task:
        os.environ["LEUKOPS_SERVING__TASK"] = args.task  # workers are fresh processes: pass it through the env
    get_settings.cache_clear()
    settings = get_settings()
    settings.check_bind(args.host, "serving", acknowledged=args.i_know_this_is_dev)
    check_startup(settings)  # fail here, with the variable named, rather than inside each worker
    uvicorn.run(
        "serving.app:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level=args.log_level,
    )
    return Output({"stopped": True, "task": settings.serving.task}, "server stopped")
