"""Promotion cost vs a bare MLflow "register + set @champion", on the same runs and the same MLflow server.

Starts a private local stack (SeaweedFS S3 + MLflow, temp state dir, free ports), logs ``--runs`` real
leukops models (custom_cnn, random init, 32 px) through ``pipelines.model.pyfunc.log_model`` with rising test F1, then:

1. baseline: ``mlflow.register_model`` + ``set_registered_model_alias(champion)`` per run (what a plain
   MLflow script does: no gate, no report, no safety);
2. leukops: ``promote_run`` per run (read run, its logged per-image test predictions (scripted: the gate's
   evidence artifact) and the champion's, gate on bootstrap/exact bounds, gate report JSON + markdown,
   model card, version tags, verified alias moves with restore-on-error, audit tags);
3. rollback: ``rollback`` (two verified alias moves + audit) vs two bare ``set_registered_model_alias``.

    .venv/bin/python benchmarks/promote.py [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import mlflow
from mlflow import MlflowClient

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ingest import free_ports  # noqa: E402 - the benchmarks share one free-port finder

from pipelines.core.settings import Settings  # noqa: E402
from pipelines.devstack.stack import LocalStack  # noqa: E402
from pipelines.io.layout import gate_predictions_path, run_model_uri  # noqa: E402
from pipelines.io.registry import Registry  # noqa: E402
from pipelines.trust.gate import SplitPredictions  # noqa: E402
from pipelines.trust.promote import promote_run, rollback  # noqa: E402

TASK = "binary_all"


def scripted_predictions(hits: int, per_class: int = 100) -> SplitPredictions:
    """The gate's per-image evidence of one run: the first ``hits`` images of each class predicted right."""
    classes = ("ALL", "Healthy")
    labels = [c for c in classes for _ in range(per_class)]
    predicted = [c if i % per_class < hits else classes[classes.index(c) - 1] for i, c in enumerate(labels)]
    return SplitPredictions.from_labels(classes, [f"{i:064x}" for i in range(len(labels))], labels, predicted)


def log_runs(settings: Settings, count: int) -> list[str]:
    import cv2
    import numpy as np

    from pipelines.io.tracking import TrainingTracker
    from pipelines.model.backbones import create_backbone
    from pipelines.model.bundle import ModelBundle
    from pipelines.model.preprocess import preprocessing_from
    from pipelines.model.pyfunc import log_model

    image = cv2.imencode(".png", np.full((32, 32, 3), 200, np.uint8))[1].tobytes()
    run_ids = []
    for i in range(count):
        backbone = create_backbone("custom_cnn", 2, pretrained=False, image_size=32)
        bundle = ModelBundle.for_backbone(TASK, ["ALL", "Healthy"], backbone, preprocessing_from(backbone.data_config))
        f1 = 0.80 + 0.02 * i
        metrics = {
            "val_macro_f1": f1,
            "test_macro_f1": f1,
            "test_recall_ALL": f1,
            "test_recall_Healthy": f1,
            "test_f1_ci_low": f1 - 0.05,
            "test_f1_ci_high": f1 + 0.05,
            "gradcam_nucleus_enrichment": 2.0,
            "gradcam_artefact_mass": 0.05,
            "gradcam_n_images": 32,
            "shortcut_flip_rate": 0.0,
            "shortcut_flips": 0,
            "shortcut_n_images": 300,
        }
        tags = {"task": TASK, "dataset_version": "bench", "backbone": "custom_cnn", "pretrained": "false"}
        with TrainingTracker(settings, run_key=uuid.uuid4().hex, run_name=f"bench-{i}", tags=tags) as run:
            run.log_metrics(metrics)
            log_model(run, bundle, backbone.model.state_dict(), image)
            run.log_text(scripted_predictions(round(f1 * 100)).to_json(), gate_predictions_path("bench"))
        run_ids.append(run.run_id)
    return run_ids


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    state = Path(tempfile.mkdtemp(prefix="leukops-bench-promote-"))
    s3_port, mlflow_port = free_ports()
    os.environ["MLFLOW_TRACKING_URI"] = f"http://127.0.0.1:{mlflow_port}"
    settings = Settings(
        profile="dev",
        state_dir=state,
        s3_endpoint=f"http://127.0.0.1:{s3_port}",
        mlflow_tracking_uri=f"http://127.0.0.1:{mlflow_port}",
    )
    stack = LocalStack(settings)
    stack.up()
    try:
        run_ids = log_runs(settings, args.runs)
        client = MlflowClient(settings.mlflow_tracking_uri)
        bare_name = f"bare-{TASK}"

        def bare_promote(run_id: str) -> None:
            version = mlflow.register_model(run_model_uri(run_id), bare_name).version
            client.set_registered_model_alias(bare_name, "champion", version)

        base = [timed(lambda r=r: bare_promote(r)) for r in run_ids]
        gated = [timed(lambda r=r: promote_run(r, "benchmark", settings)) for r in run_ids]
        assert Registry.from_settings(settings).champion(TASK).version == str(args.runs)
        name = settings.registered_model_name(TASK)
        bare_rb = [
            timed(
                lambda: (
                    client.set_registered_model_alias(name, "champion", "1"),
                    client.set_registered_model_alias(name, "previous", "2"),
                )
            )
            for _ in range(3)
        ]
        safe_rb = [timed(lambda: rollback(TASK, "benchmark", settings)) for _ in range(3)]
    finally:
        stack.down()
        shutil.rmtree(state, ignore_errors=True)
    b, g = statistics.median(base), statistics.median(gated)
    print(
        f"promotion per run (median of {args.runs}): bare register+alias {b * 1000:.0f} ms, "
        f"leukops promote_run {g * 1000:.0f} ms, ratio {g / b:.1f}x"
    )
    rb, rs = statistics.median(bare_rb), statistics.median(safe_rb)
    print(
        f"rollback (median of 3): bare 2x set_alias {rb * 1000:.0f} ms, leukops rollback {rs * 1000:.0f} ms, "
        f"ratio {rs / rb:.1f}x"
    )


if __name__ == "__main__":
    main()
