"""The `leukops` commands as the data tests call them: in process, with --json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.cli import main

TASK = "all_subtypes"


def cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, dict]:
    code = main([*args, "--json"])
    captured = capsys.readouterr()
    assert captured.out.strip(), captured.err
    return code, json.loads(captured.out.strip().splitlines()[-1])


def add_source(capsys: pytest.CaptureFixture, name: str, path: Path | str, *extra: str) -> None:
    code, out = cli(capsys, "source", "add", name, "--path", str(path), "--task", TASK, *extra)
    assert code == 0 and out["source"] == name


def key_of(store, uri: str) -> str:
    """The key of an ``s3://`` URI the store returned."""
    return uri.removeprefix(store.uri(""))
