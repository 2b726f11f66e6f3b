"""The dependency arrows of DESIGN.md's module map, enforced on every import statement in the tree.

Arrows run one way: core <- io <- data <- model <- trust <- monitor <- orchestration/serving <- cli/dags.
``devstack`` (local servers, demo, synthetic smears) may use anything, and only ``cli`` and tests import it.
Only ``pipelines/io`` talks to S3 and MLflow client libraries; the one exception is the MLflow pyfunc
wrapper, which has to subclass ``mlflow.pyfunc.PythonModel`` around the bundle.

Every ``Import``/``ImportFrom`` node counts, including those inside function bodies: lazy imports are
this project's convention for keeping DAG parsing and CLI start-up cheap, so they are where an upward
import would hide.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHECKED_ROOTS = ("pipelines", "serving", "dags")

RANK = {
    "core": 0,
    "io": 1,
    "data": 2,
    "model": 3,
    "trust": 4,
    "monitor": 5,
    "orchestration": 6,
    "serving": 6,
    "cli": 7,
    "dags": 7,
}
ANYTHING_GOES = "devstack"
DEVSTACK_USERS = {"cli", ANYTHING_GOES}
CLIENT_LIBRARIES = {"minio", "mlflow", "boto3", "botocore"}
CLIENT_LIBRARY_OWNERS = ("pipelines/io/",)
CLIENT_LIBRARY_EXCEPTIONS = {"pipelines/model/pyfunc.py": {"mlflow"}}


def wing_of_path(rel: str) -> str | None:
    """The wing a file belongs to: pipelines/<wing>/..., or the top-level folder (serving, dags)."""
    parts = Path(rel).parts
    if parts[0] == "pipelines":
        return parts[1] if len(parts) > 2 else None  # pipelines/__init__.py belongs to no wing
    return parts[0]


def wing_of_module(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] == "pipelines":
        return parts[1] if len(parts) > 1 else None
    if parts[0] in ("serving", "dags"):
        return parts[0]
    return None


def imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) for every import anywhere in the tree, nested ones included."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "pipelines":  # `from pipelines import cli` names the wing in the alias
                found += [(node.lineno, f"pipelines.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, node.module))
    return found


def violations(rel: str, source: str) -> list[str]:
    """Every import in ``source`` (the file at repo-relative ``rel``) that breaks the arrows."""
    here = wing_of_path(rel)
    problems = []
    for line, module in imported_modules(ast.parse(source, filename=rel)):
        where = f"{rel}:{line} imports {module}"
        top = module.split(".")[0]
        if top in CLIENT_LIBRARIES and not rel.startswith(CLIENT_LIBRARY_OWNERS):
            if top not in CLIENT_LIBRARY_EXCEPTIONS.get(rel, set()):
                problems.append(f"{where}: only pipelines/io/ may import {top}")
        target = wing_of_module(module)
        if here is None or target is None or target == here or here == ANYTHING_GOES:
            continue
        if target == ANYTHING_GOES:
            if here not in DEVSTACK_USERS:
                problems.append(f"{where}: only cli/ and tests may import devstack")
        elif RANK[target] >= RANK[here]:
            problems.append(f"{where}: {here} (rank {RANK[here]}) may not import {target} (rank {RANK[target]})")
    return sorted(set(problems))


def checked_files() -> list[Path]:
    return sorted(p for root in CHECKED_ROOTS for p in (REPO / root).rglob("*.py"))


def test_every_wing_has_a_rank() -> None:
    wings = {p.name for p in (REPO / "pipelines").iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert wings - {ANYTHING_GOES} <= set(RANK), f"wings without a rank: {sorted(wings - set(RANK))}"


def test_no_import_points_upward_and_only_io_uses_client_libraries() -> None:
    files = checked_files()
    assert len(files) > 40, "the walk found too few modules: the roots moved?"
    problems = [v for p in files for v in violations(str(p.relative_to(REPO)), p.read_text())]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    ("rel", "source", "expected"),
    [
        ("pipelines/io/storage.py", "def f():\n    from pipelines.model.train import fit\n", "io (rank 1) may not"),
        ("pipelines/data/ingest.py", "import mlflow\n", "only pipelines/io/ may import mlflow"),
        ("serving/model.py", "from minio import Minio\n", "only pipelines/io/ may import minio"),
        ("pipelines/model/pyfunc.py", "import minio\n", "only pipelines/io/ may import minio"),
        ("pipelines/trust/gate.py", "from pipelines.devstack import demo\n", "only cli/ and tests may import"),
        ("dags/leukops_ingest.py", "from pipelines import cli\n", "dags (rank 7) may not import cli"),
        ("pipelines/monitor/drift.py", "from pipelines.orchestration.assets import X\n", "monitor (rank 5)"),
    ],
)
def test_the_checker_catches_planted_violations(rel: str, source: str, expected: str) -> None:
    assert any(expected in v for v in violations(rel, source)), violations(rel, source)


@pytest.mark.parametrize(
    ("rel", "source"),
    [
        ("pipelines/model/pyfunc.py", "import mlflow.pyfunc\n"),
        ("pipelines/io/tracking.py", "import mlflow\nfrom pipelines.core.settings import Settings\n"),
        ("pipelines/cli/stack.py", "from pipelines.devstack.localstack import up\n"),
        ("pipelines/devstack/demo.py", "from pipelines.cli import main\n"),
        ("serving/app.py", "from pipelines.trust.explain import gradcam\n"),
    ],
)
def test_the_checker_allows_the_documented_arrows(rel: str, source: str) -> None:
    assert violations(rel, source) == []
