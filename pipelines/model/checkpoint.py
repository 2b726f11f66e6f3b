"""Training checkpoints on local disk: atomic writes, a format/config check on read, deterministic keys."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def save(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` (torch.save) so that a crash mid-save leaves the previous checkpoint intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: Path, checkpoint_format: int, config: dict[str, Any]) -> dict[str, Any] | None:
    """The payload at ``path`` if it is of ``checkpoint_format`` and was written for ``config``, else None
    (a checkpoint of another configuration is not ours to continue)."""
    if not path.exists():
        return None
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if payload.get("format") != checkpoint_format or payload.get("config") != config:
        return None
    return payload


def run_key(parts: dict[str, Any]) -> str:
    """A deterministic id for a training configuration: the same inputs resume the same checkpoint."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def checkpoint_file(state_dir: Path, key: str) -> Path:
    return Path(state_dir) / "checkpoints" / f"{key}.pt"
