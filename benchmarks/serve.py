"""Serving benchmark: leukops serving vs `mlflow models serve` on the same registered MobileNetV2.

Starts a private local stack (SeaweedFS S3 + MLflow, temp state dir, free ports), logs a MobileNetV2
(random init; weights do not change the cost of a forward pass) at 224 px through ``pipelines.model.pyfunc.log_model``,
registers it as ``@champion``, then serves it twice, one server at a time so they never share the CPU:

1. ``leukops serve`` (FastAPI + uvicorn, micro-batching, request log to S3 on), multipart JPEG uploads;
2. ``mlflow models serve -m models:/<name>/<version> --env-manager local`` (MLflow's pyfunc server),
   JSON ``/invocations`` with the same images in the model's pyfunc input format.

Each gets ``--clients`` concurrent clients x ``--requests`` requests (defaults 8 x 500) of real
``all_taleqani`` images, after a warm-up; prints p50/p95/p99 latency, req/s, errors and the ratios.

    .venv/bin/python benchmarks/serve.py [--clients 8] [--requests 500] [--image-size 224]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "all_taleqani"
TASK = "all_subtypes"


@dataclass
class LoadResult:
    name: str
    latencies_s: list[float]
    errors: int
    wall_s: float

    def summary(self) -> dict:
        lat = sorted(self.latencies_s)
        q = statistics.quantiles(lat, n=100, method="inclusive") if len(lat) > 1 else lat * 99
        done = len(lat) + self.errors
        return {
            "server": self.name,
            "requests": done,
            "errors": self.errors,
            "req_per_s": round(len(lat) / self.wall_s, 2),
            "p50_ms": round(q[49] * 1000, 1),
            "p95_ms": round(q[94] * 1000, 1),
            "p99_ms": round(q[98] * 1000, 1),
        }


def free_port() -> int:
    from pipelines.devstack.processes import port_is_free

    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(40000, 50000)
        if port_is_free(port):
            return port
    raise RuntimeError("no free port")


def stack_env(state_dir: Path) -> dict[str, str]:
    from pipelines.devstack.processes import port_is_free
    from pipelines.devstack.seaweedfs import seaweed_ports

    rng = random.Random()
    for _ in range(200):
        s3_port = rng.randrange(20000, 40000, 20)
        if all(port_is_free(p) for p in [*seaweed_ports(s3_port).values(), s3_port + 17]):
            break
    return {
        "LEUKOPS_PROFILE": "dev",
        "LEUKOPS_STATE_DIR": str(state_dir),
        "LEUKOPS_S3_ENDPOINT": f"http://127.0.0.1:{s3_port}",
        "LEUKOPS_MLFLOW_TRACKING_URI": f"http://127.0.0.1:{s3_port + 17}",
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{s3_port + 17}",
        "HF_HUB_OFFLINE": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
    }


def load(
    name: str, send: Callable[[httpx.Client, bytes], httpx.Response], images: list[bytes], clients: int, requests: int
) -> LoadResult:
    """``clients`` threads, each with its own keep-alive connection, ``requests`` sequential calls each."""
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()

    def client(index: int) -> None:
        nonlocal errors
        with httpx.Client(timeout=120) as http:
            for i in range(requests):
                data = images[(index * requests + i) % len(images)]
                started = time.perf_counter()
                try:
                    ok = send(http, data).status_code == 200
                except httpx.HTTPError:
                    ok = False
                elapsed = time.perf_counter() - started
                with lock:
                    if ok:
                        latencies.append(elapsed)
                    else:
                        errors += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return LoadResult(name, latencies, errors, time.perf_counter() - started)


def wait_http(url: str, timeout_s: float, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server for {url} exited with {process.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not ready after {timeout_s:.0f}s")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def sample_images(n: int) -> list[bytes]:
    files = sorted(SHARED.glob("*/*.jpg"))
    return [f.read_bytes() for f in random.Random(0).sample(files, n)]


def log_champion(settings, image_size: int, example: bytes) -> tuple[str, str]:
    """A MobileNetV2 logged as the canonical model and made ``@champion``; returns (version, run_id)."""
    from pipelines.core.taxonomy import get_task
    from pipelines.io.registry import Registry
    from pipelines.io.tracking import TrainingTracker
    from pipelines.model.backbones import create_backbone
    from pipelines.model.bundle import ModelBundle
    from pipelines.model.preprocess import preprocessing_from
    from pipelines.model.pyfunc import log_model

    classes = get_task(TASK).classes
    backbone = create_backbone("mobilenetv2_100", len(classes), pretrained=False, image_size=image_size)
    bundle = ModelBundle.for_backbone(TASK, classes, backbone, preprocessing_from(backbone.data_config))
    tags = {
        "task": TASK,
        "dataset_version": "benchmark",
        "backbone": "mobilenetv2_100",
        "augment": "none",
        "pretrained": "false",
    }
    key = f"bench-serve-{time.time_ns()}"
    with TrainingTracker(settings, run_key=key, run_name="bench", tags=tags) as run:
        log_model(run, bundle, backbone.model.state_dict(), example)
    registry = Registry.from_settings(settings)
    record = registry.register(TASK, registry.read_run(run.run_id), {}, "serving benchmark")
    audit = {"action": "benchmark", "who": "benchmarks/serve.py", "why": "serving benchmark"}
    registry.move_aliases(TASK, [("champion", record.version)], audit)
    return record.version, run.run_id


def run_server(
    name: str,
    command: list[str],
    env: dict[str, str],
    ready_url: str,
    send: Callable[[httpx.Client, bytes], httpx.Response],
    images: list[bytes],
    clients: int,
    requests: int,
) -> LoadResult:
    log_path = Path(env["LEUKOPS_STATE_DIR"]) / f"{name.split()[0]}-{time.time_ns()}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(ready_url, 180, process)
        with httpx.Client(timeout=120) as http:  # warm-up: first requests pay lazy initialisation
            for data in images[:10]:
                response = send(http, data)
                if response.status_code != 200:
                    raise RuntimeError(f"{name}: warm-up failed: {response.status_code} {response.text}")
        return load(name, send, images, clients, requests)
    finally:
        stop(process)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=500, help="requests per client")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--no-batching", action="store_true", help="also run leukops with micro-batching off")
    args = parser.parse_args()

    state = Path(tempfile.mkdtemp(prefix="leukops-bench-serve-"))
    env = {
        **os.environ,
        **stack_env(state),
        "LEUKOPS_SERVING__TASK": TASK,
        "LEUKOPS_SERVING__RELOAD_INTERVAL_S": "3600",
    }
    os.environ.update(env)
    from pipelines.core.settings import get_settings
    from pipelines.devstack.stack import LocalStack
    from pipelines.io.layout import run_model_uri

    get_settings.cache_clear()
    settings = get_settings()
    stack = LocalStack(settings)
    stack.up()
    try:
        images = sample_images(64)
        version, run_id = log_champion(settings, args.image_size, images[0])
        auth = {"Authorization": f"Bearer {settings.secret('serving.token')}"}
        bin_dir = Path(sys.executable).parent
        env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"  # mlflow execs `uvicorn` from PATH
        results = []

        def leukops_send(http: httpx.Client, data: bytes) -> httpx.Response:
            files = {"file": ("smear.jpg", data, "image/jpeg")}
            return http.post(f"http://127.0.0.1:{port}/v1/predict", files=files, headers=auth)

        def mlflow_send(http: httpx.Client, data: bytes) -> httpx.Response:
            payload = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(data).decode()]]}}
            return http.post(f"http://127.0.0.1:{port}/invocations", json=payload)

        variants = [("leukops serve", {})]
        if args.no_batching:
            variants.append(("leukops serve (no micro-batching)", {"LEUKOPS_SERVING__MAX_BATCH": "1"}))
        for name, extra in variants:
            port = free_port()
            command = [str(bin_dir / "leukops"), "serve", "--port", str(port), "--log-level", "warning"]
            results.append(
                run_server(
                    name,
                    command,
                    {**env, **extra},
                    f"http://127.0.0.1:{port}/readyz",
                    leukops_send,
                    images,
                    args.clients,
                    args.requests,
                )
            )
        port = free_port()
        # runs:/ rather than models:/<name>/<version>: the same model; see the report on registry sources.
        command = [
            str(bin_dir / "mlflow"),
            "models",
            "serve",
            "-m",
            run_model_uri(run_id),
            "--env-manager",
            "local",
            "-p",
            str(port),
            "-h",
            "127.0.0.1",
        ]
        results.append(
            run_server(
                "mlflow models serve",
                command,
                env,
                f"http://127.0.0.1:{port}/ping",
                mlflow_send,
                images,
                args.clients,
                args.requests,
            )
        )
    finally:
        stack.down()
        shutil.rmtree(state, ignore_errors=True)

    rows = [r.summary() for r in results]
    print(
        f"MobileNetV2 @ {args.image_size}px, CPU, {args.clients} clients x {args.requests} requests, "
        f"model version {version}"
    )
    print(f"{'server':38s} {'req/s':>8s} {'p50 ms':>8s} {'p95 ms':>8s} {'p99 ms':>8s} {'errors':>7s}")
    for row in rows:
        print(
            f"{row['server']:38s} {row['req_per_s']:8.2f} {row['p50_ms']:8.1f} {row['p95_ms']:8.1f} "
            f"{row['p99_ms']:8.1f} {row['errors']:7d}"
        )
    ours, baseline = rows[0], rows[-1]
    print(
        f"throughput ratio leukops/mlflow: {ours['req_per_s'] / baseline['req_per_s']:.2f}x; "
        f"p50 latency ratio: {ours['p50_ms'] / baseline['p50_ms']:.2f}x"
    )
    print(json.dumps({"results": rows}))


if __name__ == "__main__":
    main()
