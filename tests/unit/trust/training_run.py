"""A leukops training run as the registry reads it (metrics and tags of the tracking contract)."""

from pipelines.io.registry import RunRecord
from pipelines.trust.gate import SplitPredictions

METRICS = {
    "val_macro_f1": 0.84,
    "test_macro_f1": 0.85,
    "test_accuracy": 0.86,
    "test_f1_ci_low": 0.80,
    "test_f1_ci_high": 0.90,
    "test_recall_ALL": 0.90,
    "test_recall_Healthy": 0.80,
    "gradcam_nucleus_enrichment": 2.0,
    "gradcam_artefact_mass": 0.04,
    "gradcam_n_images": 32,
    "shortcut_flip_rate": 0.01,
    "shortcut_flips": 3,
    "shortcut_n_images": 300,
    "holdout.lab_b.macro_f1": 0.81,
    "holdout.lab_b.f1_ci_low": 0.75,
    "holdout.lab_b.n_images": 120,
    "test_ece": 0.05,
}
TAGS = {
    "task": "binary_all",
    "dataset_version": "ds1",
    "backbone": "custom_cnn",
    "pretrained": "false",
    "augment": "paper",
}


def run(metrics=METRICS, tags=TAGS) -> RunRecord:
    return RunRecord("run1", "1", "s3://bucket/1/run1/artifacts", dict(metrics), {"lr": "0.001"}, dict(tags))


def predictions(hits: int, n: int = 100, classes=("ALL", "Healthy")) -> SplitPredictions:
    """Per-image test predictions: n images per class, the first ``hits`` of each predicted right."""
    labels = [c for c in classes for _ in range(n)]
    predicted = [c if i % n < hits else classes[classes.index(c) - 1] for i, c in enumerate(labels)]
    return SplitPredictions.from_labels(classes, [f"s{i}" for i in range(len(labels))], labels, predicted)
