"""Background processes of the local stack: ports, pid files that only count while the process is ours,
readiness that fails early with the log, and stopping the whole process group."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

from pipelines.devstack.processes import ProcessDir, StackError, busy_ports, executable, port_of

SLEEPER = "import time; time.sleep(60)"


def _python(code: str, root: Path) -> list[str]:
    return [sys.executable, "-c", code, str(root)]  # the root on the command line marks the process as ours


def test_port_of_needs_an_explicit_port() -> None:
    assert port_of("http://127.0.0.1:9000") == 9000
    with pytest.raises(StackError, match="no explicit port"):
        port_of("http://localhost")


def test_busy_ports_names_the_ports_in_use() -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        taken = blocker.getsockname()[1]
        assert busy_ports({"s3": taken}) == {"s3": taken}


def test_executable_prefers_the_venv_and_names_what_is_missing() -> None:
    assert Path(executable("python")).parent == Path(sys.executable).parent
    with pytest.raises(StackError, match="not found"):
        executable("no-such-leukops-binary")


def test_spawned_process_is_ours_until_stopped(tmp_path: Path) -> None:
    processes = ProcessDir(tmp_path)
    processes.spawn("sleeper", _python(SLEEPER, tmp_path), dict(os.environ))
    processes.wait_ready("sleeper", lambda: processes.pid("sleeper") is not None, timeout_s=10)  # until exec'd
    pid = processes.pid("sleeper")
    assert pid is not None and os.getpgid(pid) == pid  # its own process group
    assert processes.stop("sleeper", timeout_s=5) == pid
    assert processes.pid("sleeper") is None and not processes.pidfile("sleeper").exists()


def test_a_recorded_pid_of_someone_else_is_not_ours(tmp_path: Path) -> None:
    processes = ProcessDir(tmp_path)
    processes.pidfile("other").parent.mkdir(parents=True)
    processes.pidfile("other").write_text(str(os.getppid()))  # alive, but not started under this root
    assert processes.pid("other") is None
    assert processes.stop("other", timeout_s=1) is None


def test_a_process_that_dies_during_start_up_fails_at_once_with_its_log(tmp_path: Path) -> None:
    processes = ProcessDir(tmp_path)
    processes.spawn("crasher", _python("print('bad config'); raise SystemExit(3)", tmp_path), dict(os.environ))
    with pytest.raises(StackError, match="exited during start-up") as err:
        processes.wait_ready("crasher", lambda: False, timeout_s=30)
    assert "bad config" in str(err.value)
