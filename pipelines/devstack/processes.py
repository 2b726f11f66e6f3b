"""Background processes of the embedded stack: ports, executables, pid files, readiness, stopping.

Each service runs in its own process group, started under one stack root with its pid recorded in
``<root>/pids/<name>.pid`` (with the process's start time) and its output in ``<root>/logs/<name>.log``.
A recorded pid counts as ours only while a process with that pid and that start time is alive, so a
reused pid is never signalled (process titles are no guide: Celery, Redis and Postgres rewrite theirs).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

from pipelines.core.errors import LeukopsError

POLL_INTERVAL_S = 0.5


class StackError(LeukopsError):
    pass


def port_of(url: str) -> int:
    parsed = urlparse(url)
    if parsed.port is None:
        raise StackError(f"{url!r} has no explicit port; the embedded stack needs one")
    return parsed.port


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def busy_ports(ports: dict[str, int]) -> dict[str, int]:
    return {name: port for name, port in ports.items() if not port_is_free(port)}


def venv_bin_dir() -> Path:
    """The bin directory of this interpreter's environment (the venv), activated or not."""
    return Path(sys.executable).parent


def executable(name: str) -> str:
    """An executable from this interpreter's environment (the venv), else from PATH."""
    candidate = venv_bin_dir() / name
    found = str(candidate) if candidate.exists() else shutil.which(name)
    if not found:
        raise StackError(f"{name!r} not found; install the project (`make install`)")
    return found


class ProcessDir:
    """The processes one stack root started: spawn, find, wait for, stop."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._started: dict[str, subprocess.Popen] = {}

    def pidfile(self, name: str) -> Path:
        return self.root / "pids" / f"{name}.pid"

    def logfile(self, name: str) -> Path:
        return self.root / "logs" / f"{name}.log"

    def pid(self, name: str) -> int | None:
        """The pid recorded for ``name`` if that process is still ours (guards against pid reuse)."""
        pidfile = self.pidfile(name)
        if not pidfile.exists():
            return None
        pid, _, started = pidfile.read_text().strip().partition(" ")
        alive = _state_and_start_time(int(pid))
        return int(pid) if alive and alive[0] != "Z" and alive[1] == started else None

    def spawn(self, name: str, command: list[str], env: dict[str, str]) -> None:
        for sub in ("pids", "logs"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        with self.logfile(name).open("ab") as log:
            process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=self.root,
                start_new_session=True,
            )
        self.pidfile(name).write_text(f"{process.pid} {_state_and_start_time(process.pid)[1]}")
        self._started[name] = process

    def wait_ready(self, name: str, ready: Callable[[], bool], timeout_s: float) -> None:
        """Poll ``ready`` until it holds; fail early, with the log tail, when the process has exited."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if ready():
                return
            started = self._started.get(name)
            exited = started.poll() is not None if started else self.pid(name) is None
            if exited:
                raise StackError(f"{name} exited during start-up; last log lines:\n{self.log_tail(name)}")
            time.sleep(POLL_INTERVAL_S)
        raise StackError(f"{name} not ready after {timeout_s:.0f}s; last log lines:\n{self.log_tail(name)}")

    def log_tail(self, name: str, lines: int = 20) -> str:
        path = self.logfile(name)
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else "(no log)"

    def stop(self, name: str, timeout_s: float) -> int | None:
        """Stop ``name``'s whole process group if it is ours; return the pid that was stopped."""
        pid = self.pid(name)
        if pid is not None:
            terminate_group(pid, timeout_s)
        if name in self._started:
            self._started.pop(name).wait(timeout=5)  # reap our own child so no zombie is left
        self.pidfile(name).unlink(missing_ok=True)
        return pid


def _state_and_start_time(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks since boot) from /proc/<pid>/stat; None when there is no such pid."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0], fields[19]


def terminate_group(pid: int, timeout_s: float) -> None:
    """SIGTERM the process group of ``pid``; SIGKILL what is still alive after ``timeout_s``."""
    try:
        pgid = os.getpgid(pid)
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _group_alive(pgid):
            return
        time.sleep(0.2)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    # zombies of our own children still count as members until reaped
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[2]) == pgid and stat[0] != "Z":
                return True
    return False
