"""Shared fixtures: one real local stack (SeaweedFS S3, Postgres, Redis, MLflow server) per test session.

The session gets its own state dir and free ports, so it never touches a stack a developer already has
running, and it stops only what it started. The LEUKOPS_* environment is set for the whole session so
CLI subprocesses (and Airflow) see the same settings.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipelines.core.settings import Settings, get_settings
from pipelines.devstack.processes import port_is_free
from pipelines.devstack.redis_server import redis_port
from pipelines.devstack.seaweedfs import seaweed_ports
from pipelines.devstack.stack import LocalStack
from pipelines.io.storage import ObjectStore

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO_ROOT.parent / "shared" / "data").resolve()


def _free_port_block() -> tuple[int, int]:
    """An S3 port whose SeaweedFS and Redis ports are all free, and free MLflow and Airflow ports (+1)."""
    rng = random.Random()
    for _ in range(200):
        s3_port = rng.randrange(20000, 40000, 20)
        mlflow_port = s3_port + 17
        ports = [*seaweed_ports(s3_port).values(), redis_port(s3_port), mlflow_port, mlflow_port + 1]
        if all(port_is_free(p) for p in ports):
            return s3_port, mlflow_port
    raise RuntimeError("no free port block for the test stack")


def searchable(path: Path) -> Path:
    """Let other users enter ``path`` (not list it): the stack's Postgres runs as its own system user when
    we are root, and pytest makes its temp dirs 0700."""
    path.chmod(path.stat().st_mode | 0o111)
    return path


@pytest.fixture(scope="session")
def session_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    searchable(tmp_path_factory.getbasetemp())  # pytest recreates a given --basetemp as 0700
    state_dir = searchable(tmp_path_factory.mktemp("leukops-state"))
    sources_dir = tmp_path_factory.mktemp("sources")
    s3_port, mlflow_port = _free_port_block()
    env = {
        "LEUKOPS_PROFILE": "dev",
        "LEUKOPS_STATE_DIR": str(state_dir),
        "LEUKOPS_SOURCES_DIR": str(sources_dir),
        "LEUKOPS_S3_ENDPOINT": f"http://127.0.0.1:{s3_port}",
        "LEUKOPS_MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}",
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}",
        "LEUKOPS_AIRFLOW_URL": f"http://127.0.0.1:{mlflow_port + 1}",
        "HF_HUB_OFFLINE": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    get_settings.cache_clear()
    yield env
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def settings(session_env: dict[str, str]) -> Settings:
    return get_settings()


@pytest.fixture(scope="session")
def stack(settings: Settings) -> Iterator[LocalStack]:
    """The real local S3, Postgres, Redis and MLflow servers, started once per session, stopped at the end."""
    local = LocalStack(settings)
    try:
        local.up()
        yield local
    finally:
        local.down()  # also after a failed start: never leave a half-started stack behind


@pytest.fixture(scope="session")
def store(stack: LocalStack, settings: Settings) -> ObjectStore:
    return ObjectStore.from_settings(settings)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real images in ../shared/data (CI has them); tests that read them fail loudly if absent."""
    if not SHARED_DATA.is_dir():
        raise FileNotFoundError(f"{SHARED_DATA} is missing: the real-data tests need ../shared/data")
    return SHARED_DATA


@pytest.fixture
def sample_images(shared_data: Path, tmp_path: Path):
    """Copy ``n`` real images per class of a shared set into a temp folder tree (label sub-folders)."""

    def copy(dataset: str, per_class: int, classes: list[str] | None = None, offset: int = 0) -> Path:
        root = tmp_path / f"{dataset}-{per_class}-{offset}"
        for class_dir in sorted(p for p in (shared_data / dataset).iterdir() if p.is_dir()):
            if classes and class_dir.name not in classes:
                continue
            files = sorted(class_dir.iterdir())[offset : offset + per_class]
            (root / class_dir.name).mkdir(parents=True, exist_ok=True)
            for f in files:
                shutil.copyfile(f, root / class_dir.name / f.name)
        return root

    return copy


def pytest_configure(config: pytest.Config) -> None:
    # A private temp root per run: pytest's shared numbered dirs are rotated (deleted) by concurrent runs,
    # which would pull the state dir from under a running stack.
    if config.option.basetemp is None:
        config.option.basetemp = tempfile.mkdtemp(prefix="leukops-pytest-")
        config.add_cleanup(lambda: shutil.rmtree(config.option.basetemp, ignore_errors=True))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "/integration/" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def bad_inputs(shared_data: Path) -> dict[str, bytes]:
    """Planted bad files (name → bytes) built from one real smear: each must be rejected with a reason."""
    import io

    from PIL import Image

    good = (shared_data / "all_taleqani" / "Early" / "WBC-Malignant-Early-001.jpg").read_bytes()
    image = Image.open(io.BytesIO(good)).convert("RGB")

    def encoded(img: Image.Image, fmt: str) -> bytes:
        buffer = io.BytesIO()
        img.save(buffer, fmt)
        return buffer.getvalue()

    bomb = Image.new("L", (9000, 9000))  # 81 Mpx of zeros: a few hundred KB as PNG
    return {
        "empty.jpg": b"",
        "notes.jpg": b"these are lab notes, not an image\n",
        "corrupt.jpg": good[:200] + bytes(range(256)) * 20,
        "truncated.jpg": good[: len(good) // 2],
        "bomb.png": encoded(bomb, "PNG"),
        "grey.png": encoded(image.convert("L"), "PNG"),
        "rgba.png": encoded(image.convert("RGBA"), "PNG"),
    }
