"""`leukops` command line: thin wiring from arguments to one library call and its printed result.

Each area registers its sub-commands from its own module (``pipelines/cli/<area>.py``, a ``register``
function). Every command prints human text by default and one JSON object with ``--json``; user errors
go to stderr as one line with exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipelines.core.errors import LeukopsError

COMMAND_MODULES = (
    "stack",
    "orchestration",
    "images",
    "serve",
    "models",
    "data",
    "conflicts",
    "drift",
    "train",
    "evaluate",
    "explain",
    "keys",
    "fsck",
    "suggest",
)


@dataclass
class Output:
    """What a command returns: data for --json, optional human text, and the exit code."""

    data: dict[str, Any]
    text: str | None = None
    exit_code: int = 0


Handler = Callable[[argparse.Namespace], Output]


def add_command(
    sub: argparse._SubParsersAction, name: str, help_text: str, handler: Handler
) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=help_text, description=help_text)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(handler=handler)
    return parser


def add_dev_exposure_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--i-know-this-is-dev",
        action="store_true",
        help="allow a non-loopback address with LEUKOPS_PROFILE=dev, whose built-in secrets are public",
    )


def render_human(data: dict[str, Any], indent: int = 0) -> str:
    lines = []
    for key, value in data.items():
        if isinstance(value, dict):
            lines.append(" " * indent + f"{key}:")
            lines.append(render_human(value, indent + 2))
        else:
            lines.append(" " * indent + f"{key}: {value}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="leukops", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"pipelines.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out: Output = args.handler(args)
    except LeukopsError as err:
        if os.environ.get("LEUKOPS_DEBUG"):
            raise
        print(f"leukops {args.command}: {err}", file=sys.stderr)
        return 2
    if getattr(args, "json", False):
        print(json.dumps(out.data, default=str))
    else:
        print(out.text if out.text is not None else render_human(out.data))
    return out.exit_code
