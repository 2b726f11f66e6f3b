"""Evaluation metrics against sklearn and hand-computed values; the adapter."""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

from pipelines.io import layout
from pipelines.model.evaluate import (
    EvaluationError,
    _bootstrap_macro_f1,
    confusion_matrix_figure,
    evaluate_logits,
    evaluate_model,
    evaluate_predictions,
    evaluate_sites,
    expected_calibration_error,
    macro_f1,
    site_metrics,
    sites_report,
)
from pipelines.model.predict import InferenceConfig, Outputs, probabilities

CLASSES = ("Benign", "Early", "Pre", "Pro")


def _noisy_predictions(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, len(CLASSES), n)
    proba = rng.dirichlet(np.ones(len(CLASSES)), n)
    proba[np.arange(n), truth] += rng.uniform(0, 1.2, n)
    return truth, proba / proba.sum(axis=1, keepdims=True)


def test_metrics_match_sklearn() -> None:
    truth, proba = _noisy_predictions(300)
    predicted = proba.argmax(axis=1)
    result = evaluate_predictions(truth, proba, CLASSES, bootstrap=200)
    assert result.n == 300
    assert result.accuracy == pytest.approx(accuracy_score(truth, predicted))
    assert result.macro_f1 == pytest.approx(f1_score(truth, predicted, average="macro"))
    precision, recall, f1, support = precision_recall_fscore_support(truth, predicted, zero_division=0)
    for i, name in enumerate(CLASSES):
        scores = result.per_class[name]
        assert (scores.precision, scores.recall, scores.f1) == pytest.approx((precision[i], recall[i], f1[i]))
        assert scores.support == support[i]
    assert np.array_equal(np.asarray(result.confusion), confusion_matrix(truth, predicted))


def test_string_labels_and_flat_metric_names() -> None:
    truth, proba = _noisy_predictions(80, seed=2)
    by_index = evaluate_predictions(truth, proba, CLASSES, bootstrap=50)
    by_name = evaluate_predictions([CLASSES[i] for i in truth], proba, CLASSES, bootstrap=50)
    assert by_name == by_index
    metrics = by_index.to_metrics("test_")
    expected = {"test_accuracy", "test_macro_f1", "test_f1_ci_low", "test_f1_ci_high", "test_ece"}
    assert expected | {f"test_recall_{c}" for c in CLASSES} <= set(metrics)
    assert all(isinstance(v, float) for v in metrics.values())
    json.dumps(by_index.to_dict())
    assert "macro-F1" in by_index.classification_report()


def test_bootstrap_interval_contains_the_estimate_and_narrows_with_more_data() -> None:
    small = evaluate_predictions(*_noisy_predictions(60), CLASSES, bootstrap=1000, seed=1)
    large = evaluate_predictions(*_noisy_predictions(1000), CLASSES, bootstrap=1000, seed=1)
    for result in (small, large):
        assert result.f1_ci_low < result.macro_f1 < result.f1_ci_high
    assert large.f1_ci_high - large.f1_ci_low < small.f1_ci_high - small.f1_ci_low
    again = evaluate_predictions(*_noisy_predictions(60), CLASSES, bootstrap=1000, seed=1)
    assert (again.f1_ci_low, again.f1_ci_high) == (small.f1_ci_low, small.f1_ci_high)


def test_ece_is_zero_when_calibrated_and_the_gap_when_overconfident() -> None:
    n = 1000
    truth = np.zeros(n, int)
    calibrated = np.tile([0.8, 0.2], (n, 1))
    predicted_wrong = np.arange(n) % 5 == 0  # exactly 20% wrong at 80% confidence
    calibrated[predicted_wrong] = [0.2, 0.8]
    assert expected_calibration_error(truth, calibrated) == pytest.approx(0.0, abs=1e-12)
    overconfident = np.tile([0.99, 0.01], (n, 1))
    overconfident[np.arange(n) % 2 == 0] = [0.01, 0.99]  # 50% right at 99% confidence
    assert expected_calibration_error(truth, overconfident) == pytest.approx(0.49)


def test_absent_classes_are_listed_and_left_out_of_macro_f1() -> None:
    truth = np.array([0, 0, 1, 1, 1])
    proba = np.eye(4)[[0, 0, 1, 1, 0]]
    result = evaluate_predictions(truth, proba, CLASSES, bootstrap=0)
    assert result.absent_classes == ("Pre", "Pro")
    assert result.macro_f1 == pytest.approx(f1_score(truth, proba.argmax(1), labels=[0, 1], average="macro"))
    assert "test_recall_Pre" not in result.to_metrics("test_")
    assert np.isnan(result.f1_ci_low)


def test_a_source_labelling_a_subset_is_scored_on_its_classes_and_absent_predictions_are_errors() -> None:
    truth = np.array([0, 0, 0, 1, 1, 1])  # a lab that labels Benign and Early only
    predicted = [0, 0, 3, 1, 1, 2]  # one Benign predicted Pro, one Early predicted Pre: absent classes
    result = evaluate_predictions(truth, np.eye(4)[predicted], CLASSES, bootstrap=100)
    assert result.classes_scored == ("Benign", "Early") and result.absent_classes == ("Pre", "Pro")
    assert result.predicted_absent == 2 and result.accuracy == pytest.approx(4 / 6)
    assert result.per_class["Benign"].recall == pytest.approx(2 / 3), "a prediction into an absent class is a miss"
    assert result.macro_f1 == pytest.approx(0.8), "F1 2/(2+0.5*(0+1)) of each of the two scored classes"
    assert f1_score(truth, predicted, labels=[0, 1, 2, 3], average="macro") == pytest.approx(0.4), "not this"
    metrics = result.to_metrics()
    assert metrics["n_classes_scored"] == 2.0 and metrics["predicted_absent"] == 2.0
    report = result.classification_report()
    assert "(absent: not scored)" in report and "scored on the 2 of 4 classes these images carry" in report
    assert "2 prediction(s) into absent classes counted as errors" in report
    assert result.to_dict()["classes_scored"] == ["Benign", "Early"]
    everything = evaluate_predictions(np.arange(8) % 4, np.eye(4)[np.arange(8) % 4], CLASSES, bootstrap=0)
    assert everything.scoring_note() == "" and everything.predicted_absent == 0


def test_each_site_is_evaluated_on_its_own_images_and_logged_per_source() -> None:
    truth = np.array([0, 1, 2, 3, 0, 1, 0, 1])
    logits = np.eye(4)[[0, 1, 2, 3, 0, 1, 1, 2]] * 3.0
    sources = ["pbc"] * 4 + ["cellavision.lab-2"] * 4
    sites = evaluate_sites(truth, logits, CLASSES, InferenceConfig(), sources, bootstrap=50)
    assert list(sites) == ["cellavision.lab-2", "pbc"]
    other, pbc = sites["cellavision.lab-2"], sites["pbc"]
    assert pbc.macro_f1 == 1.0 and pbc.n == 4 and other.n == 4 and other.accuracy == pytest.approx(0.5)
    assert other.classes_scored == ("Benign", "Early") and other.predicted_absent == 1
    metrics = site_metrics(sites)
    assert metrics[layout.site_metric("cellavision.lab-2", "n_images")] == 4.0
    assert metrics[layout.site_metric("pbc", "macro_f1")] == 1.0
    assert metrics[layout.site_metric("cellavision.lab-2", "n_classes_scored")] == 2.0
    assert layout.metric_sources(metrics, "site") == ["cellavision.lab-2", "pbc"]
    assert json.loads(json.dumps(sites_report(sites)))["pbc"]["n"] == 4
    assert evaluate_sites(truth, logits, CLASSES, InferenceConfig(), None) == {}
    with pytest.raises(EvaluationError, match="one source per image"):
        evaluate_sites(truth, logits, CLASSES, InferenceConfig(), sources[:3])


def test_macro_f1_averages_the_present_classes_or_the_given_ones() -> None:
    truth, predicted = np.array([0, 0, 1, 1]), np.array([0, 1, 1, 3])
    assert macro_f1(truth, predicted) == pytest.approx(f1_score(truth, predicted, labels=[0, 1], average="macro"))
    assert macro_f1(truth, predicted, labels=[0, 1, 2, 3]) == pytest.approx(
        f1_score(truth, predicted, labels=[0, 1, 2, 3], average="macro", zero_division=0)
    )


def test_vectorised_bootstrap_scores_each_resample_like_macro_f1() -> None:
    truth, proba = _noisy_predictions(40, seed=3)
    predicted, present = proba.argmax(axis=1), np.ones(len(CLASSES), bool)
    samples = np.random.default_rng(7).integers(0, len(truth), size=(50, len(truth)))
    per_resample = [
        f1_score(truth[i], predicted[i], labels=range(len(CLASSES)), average="macro", zero_division=1.0)
        for i in samples
    ]
    expected = tuple(np.percentile(per_resample, [2.5, 97.5]))
    assert _bootstrap_macro_f1(truth, predicted, len(CLASSES), present, 50, seed=7) == pytest.approx(expected)


def test_confusion_matrix_figure_renders() -> None:
    result = evaluate_predictions(*_noisy_predictions(50), CLASSES, bootstrap=0)
    buffer = io.BytesIO()
    confusion_matrix_figure(result).savefig(buffer, format="png")
    assert Image.open(io.BytesIO(buffer.getvalue())).size[0] > 200


def test_bad_inputs_are_clear_errors() -> None:
    with pytest.raises(EvaluationError, match="N×4"):
        evaluate_predictions([0, 1], np.ones((2, 3)) / 3, CLASSES)
    with pytest.raises(EvaluationError, match="one label per proba row"):
        evaluate_predictions([0], np.ones((2, 4)) / 4, CLASSES)
    with pytest.raises(EvaluationError, match="'Blast'"):
        evaluate_predictions(["Blast", "Pre"], np.ones((2, 4)) / 4, CLASSES)
    with pytest.raises(EvaluationError, match="class indices"):
        evaluate_predictions([0, 7], np.ones((2, 4)) / 4, CLASSES)


class _Store:
    """In-memory stand-in for ObjectStore.get_bytes (the adapter's only call)."""

    def __init__(self, objects: dict[str, bytes]) -> None:
        self.objects = objects

    def get_bytes(self, key: str) -> bytes:
        return self.objects[key]


class _RedOrBlueModel:
    """Predicts "Benign" for reddish images, "Early" otherwise (a LoadedModel's outputs/inference contract)."""

    classes = ["Benign", "Early"]
    inference = InferenceConfig(temperature=2.0)

    def outputs(self, rgb_list: list[np.ndarray]) -> Outputs:
        red = np.array([rgb[..., 0].mean() > rgb[..., 2].mean() for rgb in rgb_list], float)
        logits = np.stack([4 * red - 2, 2 - 4 * red], axis=1)  # softmax at T = 1: 0.982 sure
        return Outputs(probabilities(logits, self.inference.temperature), logits)


def _png(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, "PNG")
    return buffer.getvalue()


def test_evaluate_model_reads_decodes_and_scores_in_batches() -> None:
    store = _Store({"r1": _png((200, 0, 0)), "r2": _png((190, 10, 0)), "b1": _png((0, 0, 200))})
    frame = pd.DataFrame({"key": ["r1", "r2", "b1"], "label": ["Benign", "Early", "Early"]})
    result = evaluate_model(_RedOrBlueModel(), store, frame, batch_size=2, bootstrap=0)
    assert result.n == 3 and result.accuracy == pytest.approx(2 / 3)
    assert result.confusion == ((1, 0), (1, 1))
    calibrated, raw = 1 / (1 + np.exp(-2.0)), 1 / (1 + np.exp(-4.0))  # top-class confidence at T = 2 and 1
    assert result.ece == pytest.approx(abs(2 / 3 - calibrated))  # the bundle's temperature is applied
    assert result.ece_uncalibrated == pytest.approx(abs(2 / 3 - raw))
    assert result.to_metrics()["ece_uncalibrated"] == pytest.approx(result.ece_uncalibrated)
    store.objects["b1"] = b"not an image"
    with pytest.raises(EvaluationError, match="object b1"):
        evaluate_model(_RedOrBlueModel(), store, frame, bootstrap=0)
    with pytest.raises(EvaluationError, match="'Pro'"):
        evaluate_model(_RedOrBlueModel(), store, frame.assign(label="Pro"), bootstrap=0)


def test_evaluate_logits_scores_the_calibrated_softmax_and_reports_both_eces() -> None:
    truth, proba = _noisy_predictions(400, seed=5)
    logits = np.log(proba) * 3  # the same ranking, sharper
    inference = InferenceConfig(temperature=3.0)
    result = evaluate_logits(truth, logits, CLASSES, inference, bootstrap=50)
    plain = evaluate_predictions(truth, proba, CLASSES, bootstrap=50)
    assert (result.macro_f1, result.f1_ci_low, result.confusion) == (plain.macro_f1, plain.f1_ci_low, plain.confusion)
    assert result.ece == pytest.approx(expected_calibration_error(truth, proba))
    assert result.ece_uncalibrated == pytest.approx(expected_calibration_error(truth, probabilities(logits)))
    assert abs(result.ece_uncalibrated - result.ece) > 0.1
    assert "uncalibrated" in result.classification_report()
