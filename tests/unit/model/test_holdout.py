"""External-validation figures: the run-metric names the gate reads, and the small JSON summary."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.io import layout
from pipelines.model.evaluate import evaluate_logits
from pipelines.model.holdout import SourceEvaluation
from pipelines.model.predict import InferenceConfig

CLASSES = ("Benign", "Early", "Pre", "Pro")


def _evaluation(source: str = "taleqani.block-9") -> SourceEvaluation:
    truth = np.arange(40) % 4
    logits = np.eye(4)[truth] * 3.0
    logits[:4] = np.eye(4)[(truth[:4] + 1) % 4] * 3.0  # one error per class: recall 0.9 everywhere
    result = evaluate_logits(truth, logits, CLASSES, InferenceConfig(temperature=0.5), bootstrap=200)
    return SourceEvaluation(source, result, n_other_labels=2, excluded_seen_in_training=3)


def test_metrics_are_named_per_source_and_carry_what_the_gate_reads() -> None:
    evaluation = _evaluation()
    metrics = evaluation.metrics()

    def name(figure: str) -> str:
        return layout.holdout_metric("taleqani.block-9", figure)

    assert metrics[name("macro_f1")] == evaluation.result.macro_f1 == pytest.approx(0.9)
    assert metrics[name("n_images")] == 40.0 and metrics[name("excluded_seen_in_training")] == 3.0
    assert metrics[name("f1_ci_low")] <= 0.9 <= metrics[name("f1_ci_high")]
    assert metrics[name("ece")] != metrics[name("ece_uncalibrated")]  # T = 0.5 sharpened the softmax
    assert [metrics[name(f"recall_{c}")] for c in CLASSES] == pytest.approx([0.9] * 4)
    assert all(key.startswith("holdout.taleqani.block-9.") for key in metrics)


def test_summary_is_small_json_with_recall_ci_and_both_eces() -> None:
    summary = _evaluation().summary()
    assert set(summary) == {"macro_f1", "f1_ci", "ece", "ece_uncalibrated", "recall", "n_images"} | {
        "classes_scored",
        "classes_absent",
        "predicted_absent",
    }
    assert summary["classes_scored"] == list(CLASSES) and summary["classes_absent"] == []
    assert summary["recall"] == pytest.approx(dict.fromkeys(CLASSES, 0.9)) and summary["n_images"] == 40
    assert summary["f1_ci"][0] <= summary["macro_f1"] <= summary["f1_ci"][1]


def test_a_source_labelling_a_subset_of_the_classes_says_so_in_metrics_and_summary() -> None:
    truth = np.arange(30) % 2  # CellaVision-like: Benign and Early only
    predicted = truth.copy()
    predicted[:3] = 3  # three predictions into Pro, a class this source never labels
    result = evaluate_logits(truth, np.eye(4)[predicted] * 3.0, CLASSES, InferenceConfig(), bootstrap=100)
    evaluation = SourceEvaluation("cellavision", result, n_other_labels=0, excluded_seen_in_training=0)
    summary, metrics = evaluation.summary(), evaluation.metrics()
    assert summary["classes_scored"] == ["Benign", "Early"] and summary["classes_absent"] == ["Pre", "Pro"]
    assert summary["predicted_absent"] == 3 and set(summary["recall"]) == {"Benign", "Early"}
    assert metrics[layout.holdout_metric("cellavision", "n_classes_scored")] == 2.0
    assert metrics[layout.holdout_metric("cellavision", "predicted_absent")] == 3.0
    assert layout.holdout_metric("cellavision", "recall_Pro") not in metrics
    assert summary["macro_f1"] == pytest.approx(np.mean([2 * 13 / (2 * 13 + 2), 2 * 14 / (2 * 14 + 1)]))
    assert layout.metric_sources(metrics, "holdout") == ["cellavision"]
