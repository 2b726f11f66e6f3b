"""Ingest throughput vs a raw ``put_object`` loop of the same files, in the same run, on the same S3.

Starts its own local stack (SeaweedFS S3 + MLflow) on free ports in a temp state dir and stops it at
the end. The baseline only uploads bytes; ingest also hashes, decodes, measures, validates with GX,
renders Data Docs and writes the manifest. Target: ingest ≥ 0.7× the baseline's images/s. The baseline
runs before and after the ingests (the mean is the reference: the machine's load drifts); importing
great_expectations is a one-off per worker process and is timed and reported on its own.

    .venv/bin/python benchmarks/ingest.py [--data ../shared/data/all_taleqani] [--workers 8]
"""

from __future__ import annotations

import argparse
import importlib
import io
import random
import shutil
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from pipelines.core.settings import Settings
from pipelines.data.ingest import ingest_source
from pipelines.data.sources import Source, default_label_map, load_source, save_source
from pipelines.devstack.processes import port_is_free
from pipelines.devstack.seaweedfs import seaweed_ports
from pipelines.devstack.stack import LocalStack
from pipelines.io.storage import ObjectStore

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "all_taleqani"


def free_ports() -> tuple[int, int]:
    rng = random.Random()
    for _ in range(200):
        s3 = rng.randrange(41000, 60000, 20)
        if all(port_is_free(p) for p in [*seaweed_ports(s3).values(), s3 + 17]):
            return s3, s3 + 17
    raise RuntimeError("no free port block")


def baseline(settings: Settings, files: list[Path], bucket: str) -> float:
    """Seconds for a plain sequential put_object of every file (read from disk inside the loop)."""
    store = ObjectStore.from_settings(settings, bucket=bucket)
    store.ensure_bucket()
    start = time.perf_counter()
    for f in files:
        data = f.read_bytes()
        store.client.put_object(store.bucket, f"baseline/{f.parent.name}/{f.name}", io.BytesIO(data), len(data))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--workers", type=int, nargs="+", default=[8], help="thread counts to compare")
    args = parser.parse_args()
    files = sorted(p for p in args.data.rglob("*") if p.is_file() and p.parent != args.data)
    state = Path(tempfile.mkdtemp(prefix="leukops-bench-"))
    s3_port, mlflow_port = free_ports()
    settings = Settings(
        profile="dev",
        state_dir=state,
        sources_dir=state / "sources",
        s3_endpoint=f"http://127.0.0.1:{s3_port}",
        mlflow_tracking_uri=f"http://127.0.0.1:{mlflow_port}",
    )
    stack = LocalStack(settings)
    timings: dict[str, float] = {}
    try:
        stack.up()
        for f in files:  # warm the page cache so neither side pays the first disk read
            f.read_bytes()
        timings["baseline (before)"] = baseline(settings, files, "bench-baseline-1")
        start = time.perf_counter()
        importlib.import_module("great_expectations")  # once per worker process; reported separately
        gx_import_s = time.perf_counter() - start
        for workers in args.workers:
            store = ObjectStore.from_settings(settings, bucket=f"bench-ingest-{workers}")
            store.ensure_bucket()
            source = save_and_load(settings, f"bench-{workers}", args.data)
            start = time.perf_counter()
            report = ingest_source(
                source, settings, store, run_date=datetime.now(UTC).date().isoformat(), workers=workers
            )
            timings[f"ingest, {workers} threads"] = time.perf_counter() - start
            print(f"ingest {workers} threads: {report.message}; new objects {report.new_objects}")
            start = time.perf_counter()
            rerun = ingest_source(source, settings, store, run_date="rerun", workers=workers)
            print(f"re-ingest: {rerun.status} in {time.perf_counter() - start:.2f} s, new objects {rerun.new_objects}")
        timings["baseline (after)"] = baseline(settings, files, "bench-baseline-2")
    finally:
        stack.down()
        shutil.rmtree(state, ignore_errors=True)
    report_figures(files, timings, args.data, gx_import_s)


def save_and_load(settings: Settings, name: str, data: Path) -> Source:
    source = Source(
        name=name,
        location=str(data.resolve()),
        layout="folders",
        label_map=default_label_map(["all_subtypes"]),
        tasks=("all_subtypes",),
    )
    save_source(source, settings)
    return load_source(name, settings)


def report_figures(files: list[Path], timings: dict[str, float], data: Path, gx_import_s: float) -> None:
    n = len(files)
    print(f"files: {n} ({sum(f.stat().st_size for f in files) / 1e6:.1f} MB) from {data}")
    for name, seconds in timings.items():
        print(f"{name:<26} {seconds:7.2f} s  {n / seconds:7.1f} images/s")
    base_s = (timings["baseline (before)"] + timings["baseline (after)"]) / 2
    for name, seconds in timings.items():
        if name.startswith("ingest"):
            print(f"ratio {name} / mean baseline: {base_s / seconds:.2f}x (target >= 0.70x)")
            print(f"  counting the one-off GX import ({gx_import_s:.1f} s): {base_s / (seconds + gx_import_s):.2f}x")


if __name__ == "__main__":
    main()
