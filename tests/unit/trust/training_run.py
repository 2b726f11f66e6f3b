"""A leukops training run as the registry reads it (metrics and tags of the tracking contract)."""

from pipelines.io.registry import RunRecord

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
    "shortcut_flip_rate": 0.01,
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
