"""Structural checks of the deployment files (no Docker engine needed)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
ENV_EXAMPLE = {
    line.split("=", 1)[0]
    for line in (ROOT / ".env.example").read_text().splitlines()
    if line and not line.startswith("#")
}
SECRET_NAME = re.compile(r"(SECRET|PASSWORD|TOKEN|FERNET|ACCESS_KEY)", re.IGNORECASE)


def _walk_strings(node):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk_strings(key)
            yield from _walk_strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk_strings(value)
    elif isinstance(node, str):
        yield node


def _env(service: dict) -> dict:
    env = service.get("environment", {})
    return env if isinstance(env, dict) else dict(item.split("=", 1) for item in env)


def test_compose_has_the_full_stack():
    expected = set(
        "postgres redis minio minio-init mlflow airflow-init airflow-apiserver airflow-scheduler"
        " airflow-dag-processor airflow-triggerer airflow-worker airflow-worker-gpu serving".split()
    )
    assert expected <= set(SERVICES)


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_every_service_has_a_healthcheck_or_a_reason(name):
    service = SERVICES[name]
    reason = service.get("labels", {}).get("leukops.healthcheck-exempt")
    assert "healthcheck" in service or reason, f"{name}: no healthcheck and no stated reason"
    if reason:
        assert service.get("restart") == "no", f"{name}: an exempt one-shot job must not restart"


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_dependencies_wait_for_health_or_completion(name):
    for dependency, condition in (SERVICES[name].get("depends_on") or {}).items():
        wanted = "service_healthy" if "healthcheck" in SERVICES[dependency] else "service_completed_successfully"
        assert condition["condition"] == wanted, f"{name} -> {dependency}"


def test_gpu_worker_reserves_nvidia_and_listens_on_gpu_queue():
    worker = SERVICES["airflow-worker-gpu"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    command = worker["command"]
    assert command[command.index("-q") + 1] == "gpu"
    cpu = SERVICES["airflow-worker"]["command"]
    assert cpu[cpu.index("-q") + 1] != "gpu"


def test_no_literal_secrets_in_compose():
    for name, service in SERVICES.items():
        for key, value in _env(service).items():
            if SECRET_NAME.search(key):
                assert isinstance(value, str) and value.startswith("${"), f"{name}.{key} is a literal"


def test_every_referenced_variable_is_in_env_example():
    text = (ROOT / "docker-compose.yml").read_text()
    referenced = set(re.findall(r"(?<!\$)\$\{([A-Z_][A-Z0-9_]*)", text))
    missing = referenced - ENV_EXAMPLE
    assert not missing, f"missing from .env.example: {sorted(missing)}"


def test_env_example_holds_only_placeholders_for_secrets():
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line and not line.startswith("#") and SECRET_NAME.search(line.split("=", 1)[0]):
            assert "change-me" in line, line


def test_minio_image_is_pinned_and_volumes_are_named():
    for service in SERVICES.values():
        image = service.get("image", "")
        assert not image.endswith(":latest") and (":" in image or "build" in service), image
    assert SERVICES["minio"]["image"].startswith("minio/minio:RELEASE.")
    assert {"postgres-data", "minio-data"} <= set(COMPOSE["volumes"])


def _dockerfile_sources(dockerfile: Path) -> list[str]:
    sources = []
    for line in dockerfile.read_text().splitlines():
        parts = line.split()
        if parts[:1] == ["COPY"] and not any(p.startswith("--from") for p in parts):
            sources += [p for p in parts[1:-1] if not p.startswith("--")]
    return sources


@pytest.mark.parametrize("dockerfile", sorted((ROOT / "infra").glob("*.Dockerfile")), ids=lambda p: p.name)
def test_dockerfiles_copy_files_that_exist_and_pin_bases(dockerfile):
    for source in _dockerfile_sources(dockerfile):
        assert (ROOT / source).exists(), f"{dockerfile.name} copies missing {source}"
    stages: set[str] = set()
    for line in dockerfile.read_text().splitlines():
        parts = line.split()
        if parts[:1] == ["FROM"]:
            image = parts[1]
            assert image in stages or (":" in image and not image.endswith(":latest")), image
            if len(parts) == 4 and parts[2].upper() == "AS":
                stages.add(parts[3])


def test_compose_build_files_exist():
    for name, service in SERVICES.items():
        if "build" in service:
            assert (ROOT / service["build"]["dockerfile"]).exists(), name
    for service in SERVICES.values():
        for volume in service.get("volumes", []):
            host = volume.split(":", 1)[0]
            if host.startswith("./"):
                assert (ROOT / host).exists(), volume


def _literal(node: ast.expr):
    if isinstance(node, ast.Name):
        return node.id
    try:
        return ast.literal_eval(node)
    except ValueError:
        return ast.unparse(node)


def _dag_task_kwargs(path: Path, task_name: str) -> dict:
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == task_name:
            for decorator in node.decorator_list:
                if isinstance(decorator, ast.Call):
                    return {k.arg: _literal(k.value) for k in decorator.keywords}
    raise AssertionError(f"{task_name} not found in {path}")


def test_dag_queue_and_pool_match_compose_and_helm():
    kwargs = _dag_task_kwargs(ROOT / "dags" / "leukops_nightly_retrain.py", "train")
    assert kwargs["queue"] == "gpu" and kwargs["pool"] == "GPU_POOL"
    assert 'GPU_POOL = "gpu"' in (ROOT / "dags" / "leukops_nightly_retrain.py").read_text()
    init_script = (ROOT / "infra" / "airflow" / "init.sh").read_text()
    assert "airflow pools set gpu" in init_script
    helm_worker = list(yaml.safe_load_all((ROOT / "infra" / "helm" / "gpu-worker.yaml").read_text()))
    deployment = next(d for d in helm_worker if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert "-q gpu" in " ".join(container["args"])
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert deployment["spec"]["template"]["spec"]["tolerations"]


def test_helm_values_parse_and_use_the_project_image():
    values = yaml.safe_load((ROOT / "infra" / "helm" / "values.yaml").read_text())
    assert values["executor"] in {"CeleryExecutor", "KubernetesExecutor", "CeleryExecutor,KubernetesExecutor"}
    assert values["images"]["airflow"]["repository"].endswith("leukops-airflow")
    secrets_in_values = [s for s in _walk_strings(values) if SECRET_NAME.search(s) and "=" in s]
    assert not secrets_in_values


def _settings_env_names(model=None, prefix: str = "") -> set[str]:
    """LEUKOPS_<FIELD> of every setting, and LEUKOPS_<SECTION>__<KEY>[__<KEY>] of every key of a nested section."""
    from pydantic import BaseModel

    from pipelines.core.settings import Settings, env_name

    names = set()
    for name, field in (model or Settings).model_fields.items():
        section = field.annotation if isinstance(field.annotation, type) else None
        if section is not None and issubclass(section, BaseModel):
            names |= _settings_env_names(section, f"{prefix}{name}.")
        else:
            names.add(env_name(prefix + name))
    return names


def test_compose_and_embedded_stack_use_the_same_settings_names():
    compose_vars = {key for s in SERVICES.values() for key in _env(s) if key.startswith("LEUKOPS_")}
    compose_vars -= {"LEUKOPS_GPU_POOL_SLOTS"}  # read by infra/airflow/init.sh, not by the settings
    assert compose_vars <= _settings_env_names(), compose_vars - _settings_env_names()


def test_env_example_names_only_real_settings():
    example_vars = {name for name in ENV_EXAMPLE if name.startswith("LEUKOPS_")}
    example_vars -= {"LEUKOPS_VERSION", "LEUKOPS_GPU_COUNT", "LEUKOPS_GPU_POOL_SLOTS"}  # compose / init.sh only
    assert example_vars <= _settings_env_names(), example_vars - _settings_env_names()


def test_only_serving_gets_the_api_token():
    holders = {name for name, service in SERVICES.items() if "LEUKOPS_SERVING__TOKEN" in _env(service)}
    assert holders == {"serving"}
