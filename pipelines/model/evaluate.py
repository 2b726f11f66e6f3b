"""Evaluation of class probabilities against true labels: pure functions, arrays in, a dataclass out.

`evaluate_predictions` gives accuracy, macro-F1, per-class precision/recall/F1/support, the confusion
matrix, the expected calibration error (15 equal-width confidence bins) and a percentile-bootstrap 95% CI of
macro-F1. `evaluate_logits` scores logits the way the model predicts (`pipelines.model.predict`: softmax of
logits / temperature) and adds the ECE the same logits had before calibration. `confusion_matrix_figure`
draws the matrix. `evaluate_model` is the thin adapter that re-evaluates a loaded model on a frame of
stored images, through the model's own predict function (its temperature and TTA).

`macro_f1` is the one macro-F1 of leukops (training's validation, test evaluation, the shortcut test): it
averages over the classes present in `y_true` (sklearn's macro average when every class is present).
A source that labels a subset of the task's classes (CellaVision: 5 of 8) is scored on the classes it has
(`EvalResult.classes_scored`; the others are `absent_classes`), and a prediction into an absent class is
an error (a miss of the image's true class, counted in `predicted_absent`), never left out.

`evaluate_sites` evaluates each source (lab) of a split on its own: `site_metrics` names its figures
``site.<source>.<name>`` (`pipelines.io.layout.site_metric`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

from pipelines.core.errors import LeukopsError

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

    from pipelines.io.storage import ObjectStore
    from pipelines.model.predict import InferenceConfig

ECE_BINS = 15


class EvaluationError(LeukopsError, ValueError):
    pass


@dataclass(frozen=True)
class ClassScores:
    precision: float
    recall: float
    f1: float
    support: int


@dataclass(frozen=True)
class EvalResult:
    classes: tuple[str, ...]
    n: int
    accuracy: float
    macro_f1: float
    per_class: dict[str, ClassScores]
    confusion: tuple[tuple[int, ...], ...]  # rows: true class, columns: predicted class
    ece: float
    f1_ci_low: float
    f1_ci_high: float
    absent_classes: tuple[str, ...] = ()
    bootstrap: int = 0
    ece_uncalibrated: float | None = None  # the same logits at temperature 1 (when evaluated from logits)
    predicted_absent: int = 0  # predictions into an absent class: errors (misses of the true class)

    @property
    def classes_scored(self) -> tuple[str, ...]:
        """The classes macro-F1 averages over: those the evaluated images are labelled with."""
        return tuple(name for name in self.classes if name not in self.absent_classes)

    def to_metrics(self, prefix: str = "") -> dict[str, float]:
        """Flat metrics: accuracy, macro_f1, precision_/recall_/f1_<class> (present classes), the CI, ece
        (and ece_uncalibrated when known), n_classes_scored and predicted_absent."""
        metrics = {"accuracy": self.accuracy, "macro_f1": self.macro_f1}
        for name, scores in self.per_class.items():
            if name not in self.absent_classes:
                metrics |= {f"precision_{name}": scores.precision, f"recall_{name}": scores.recall}
                metrics[f"f1_{name}"] = scores.f1
        metrics |= {"f1_ci_low": self.f1_ci_low, "f1_ci_high": self.f1_ci_high, "ece": self.ece}
        metrics |= {"n_classes_scored": len(self.classes_scored), "predicted_absent": self.predicted_absent}
        if self.ece_uncalibrated is not None:
            metrics["ece_uncalibrated"] = self.ece_uncalibrated
        return {f"{prefix}{key}": float(value) for key, value in metrics.items()}

    def to_dict(self) -> dict[str, Any]:
        """JSON-able report (the per-class table, confusion matrix, CI and calibration)."""
        report = asdict(self)
        report["classes"] = list(self.classes)
        report["confusion"] = [list(row) for row in self.confusion]
        report["absent_classes"] = list(self.absent_classes)
        report["classes_scored"] = list(self.classes_scored)
        return report

    def scoring_note(self) -> str:
        """One line on which classes were scored ('' when the images carry every class)."""
        if not self.absent_classes:
            return ""
        return (
            f"scored on the {len(self.classes_scored)} of {len(self.classes)} classes these images carry (absent: "
            f"{', '.join(self.absent_classes)}); {self.predicted_absent} prediction(s) into absent classes "
            "counted as errors"
        )

    def classification_report(self) -> str:
        """A plain-text per-class table, like sklearn's."""
        width = max(12, *(len(c) for c in self.classes))
        lines = [f"{'class':>{width}}  precision  recall  f1-score  support"]
        for name, s in self.per_class.items():
            absent = "  (absent: not scored)" if name in self.absent_classes else ""
            lines.append(f"{name:>{width}}  {s.precision:9.3f}  {s.recall:6.3f}  {s.f1:8.3f}  {s.support:7d}{absent}")
        lines.append(f"{'accuracy':>{width}}  {'':9}  {'':6}  {self.accuracy:8.3f}  {self.n:7d}")
        ci = f"[{self.f1_ci_low:.3f}, {self.f1_ci_high:.3f}]"
        lines.append(f"{'macro-F1':>{width}}  {self.macro_f1:.3f}  (95% CI {ci}, {self.bootstrap} resamples)")
        before = f"  (uncalibrated {self.ece_uncalibrated:.4f})" if self.ece_uncalibrated is not None else ""
        lines.append(f"{'ECE':>{width}}  {self.ece:.4f}{before}")
        if self.absent_classes:
            lines.append(self.scoring_note())
        return "\n".join(lines)


def macro_f1(
    y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray, labels: Sequence[int] | None = None
) -> float:
    """Unweighted mean F1 over ``labels`` (default: the classes present in ``y_true``); an undefined
    precision or recall counts as 0."""
    labels = np.unique(y_true) if labels is None else labels
    return float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0))


def evaluate_predictions(
    y_true: Sequence[int] | Sequence[str] | np.ndarray,
    proba: np.ndarray,
    classes: Sequence[str],
    *,
    bootstrap: int = 1000,
    seed: int = 0,
) -> EvalResult:
    """Metrics of `proba` (N×C, rows sum to 1) against `y_true` (class indices or names from `classes`)."""
    classes = tuple(classes)
    truth, proba = _check_inputs(y_true, proba, classes)
    predicted = proba.argmax(axis=1)
    indices = np.arange(len(classes))
    confusion = confusion_matrix(truth, predicted, labels=indices)
    present = confusion.sum(axis=1) > 0
    precision, recall, f1, _ = precision_recall_fscore_support(
        truth, predicted, labels=indices, average=None, zero_division=0
    )
    low, high = _bootstrap_macro_f1(truth, predicted, len(classes), present, bootstrap, seed)
    return EvalResult(
        classes=classes,
        n=len(truth),
        accuracy=float(np.trace(confusion) / len(truth)),
        macro_f1=macro_f1(truth, predicted),
        per_class={
            name: ClassScores(float(precision[i]), float(recall[i]), float(f1[i]), int(confusion[i].sum()))
            for i, name in enumerate(classes)
        },
        confusion=tuple(tuple(int(v) for v in row) for row in confusion),
        ece=expected_calibration_error(truth, proba),
        f1_ci_low=low,
        f1_ci_high=high,
        absent_classes=tuple(name for name, here in zip(classes, present, strict=True) if not here),
        bootstrap=bootstrap,
        predicted_absent=int(np.sum(~present[predicted])),
    )


def evaluate_logits(
    y_true: Sequence[int] | Sequence[str] | np.ndarray,
    logits: np.ndarray,
    classes: Sequence[str],
    inference: InferenceConfig,
    *,
    bootstrap: int = 1000,
    seed: int = 0,
) -> EvalResult:
    """`evaluate_predictions` of the model's probabilities (``inference``'s temperature applied to the
    TTA-averaged ``logits``), with the ECE of the uncalibrated softmax beside the calibrated one."""
    from pipelines.model.predict import probabilities  # torch: kept off this module's import path

    proba = probabilities(logits, inference.temperature)
    result = evaluate_predictions(y_true, proba, classes, bootstrap=bootstrap, seed=seed)
    truth, _ = _check_inputs(y_true, proba, tuple(classes))
    return replace(result, ece_uncalibrated=expected_calibration_error(truth, probabilities(logits)))


def evaluate_sites(
    y_true: Sequence[int] | Sequence[str] | np.ndarray,
    logits: np.ndarray,
    classes: Sequence[str],
    inference: InferenceConfig,
    sources: Sequence[str] | None,
    *,
    bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, EvalResult]:
    """`evaluate_logits` of each source's images on their own (sources sorted; {} when ``sources`` is None),
    each scored on the classes that source carries."""
    if sources is None:
        return {}
    sources = np.asarray(sources, dtype=str)
    if len(sources) != len(logits):
        raise EvaluationError(f"sources must name one source per image ({len(logits)}), got {len(sources)}")
    truth = np.asarray(y_true)
    return {
        str(site): evaluate_logits(
            truth[sources == site], logits[sources == site], classes, inference, bootstrap=bootstrap, seed=seed
        )
        for site in np.unique(sources)
    }


def site_metrics(sites: dict[str, EvalResult]) -> dict[str, float]:
    """The run metrics ``site.<source>.<name>`` of `evaluate_sites` (names at `layout.site_metric`)."""
    from pipelines.io.layout import site_metric

    return {
        site_metric(site, name): value
        for site, result in sites.items()
        for name, value in (result.to_metrics() | {"n_images": float(result.n)}).items()
    }


def sites_report(sites: dict[str, EvalResult]) -> dict[str, Any]:
    """JSON-able per-site reports (each `EvalResult.to_dict`), by source."""
    return {site: result.to_dict() for site, result in sites.items()}


def expected_calibration_error(y_true: np.ndarray, proba: np.ndarray, bins: int = ECE_BINS) -> float:
    """Σ_b (n_b / N)·|accuracy_b − mean confidence_b| over equal-width bins of the top-class confidence."""
    confidence = proba.max(axis=1)
    correct = proba.argmax(axis=1) == y_true
    bin_index = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    confidence_sum = np.bincount(bin_index, weights=confidence, minlength=bins)
    correct_sum = np.bincount(bin_index, weights=correct.astype(float), minlength=bins)
    return float(np.abs(correct_sum - confidence_sum).sum() / len(y_true))


def confusion_matrix_figure(result: EvalResult) -> Figure:
    """The confusion matrix (counts, row-normalised colour) as a matplotlib Figure (Agg, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts = np.asarray(result.confusion)
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = 2.5 + 0.6 * len(result.classes)
    figure = Figure(figsize=(size, size * 0.9), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ticks = range(len(result.classes))
    axes.set_xticks(ticks, result.classes, rotation=45, ha="right")
    axes.set_yticks(ticks, result.classes)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    for (row, col), value in np.ndenumerate(counts):
        axes.text(
            col,
            row,
            str(value),
            ha="center",
            va="center",
            color="white" if rates[row, col] > 0.5 else "black",
        )
    axes.set_title(f"accuracy {result.accuracy:.3f}, macro-F1 {result.macro_f1:.3f} (n={result.n})")
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="row share")
    figure.tight_layout()
    return figure


def evaluate_model(
    loaded_model: Any, store: ObjectStore, frame: pd.DataFrame, *, batch_size: int = 32, bootstrap: int = 1000
) -> EvalResult:
    """Re-evaluate a loaded model (`pipelines.model.bundle.LoadedModel`) on the images of `frame`
    (columns `key`, `label`), with the temperature and TTA of its bundle.

    Labels must be classes of the model; undecodable objects are an error naming the key.
    """
    from pipelines.data.imagefacts import ImageDecodeError, decode_image

    missing = {"key", "label"} - set(frame.columns)
    if missing:
        raise EvaluationError(f"evaluate_model: frame lacks columns {sorted(missing)}")
    if frame.empty:
        raise EvaluationError("evaluate_model: no images to evaluate")
    classes = tuple(loaded_model.classes)
    unknown = sorted(set(frame["label"]) - set(classes))
    if unknown:
        raise EvaluationError(f"evaluate_model: labels {unknown} are not classes of the model {list(classes)}")
    logits = []
    keys = list(frame["key"])
    for start in range(0, len(keys), batch_size):
        images = []
        for key in keys[start : start + batch_size]:
            try:
                images.append(decode_image(store.get_bytes(key)).rgb)
            except ImageDecodeError as error:
                raise EvaluationError(f"evaluate_model: object {key}: {error}") from error
        logits.append(loaded_model.outputs(images).logits)
    labels = list(frame["label"])
    return evaluate_logits(labels, np.concatenate(logits), classes, loaded_model.inference, bootstrap=bootstrap)


def _check_inputs(
    y_true: Sequence[int] | Sequence[str] | np.ndarray, proba: np.ndarray, classes: tuple[str, ...]
) -> tuple[np.ndarray, np.ndarray]:
    proba = np.asarray(proba, dtype=np.float64)
    if proba.ndim != 2 or proba.shape[1] != len(classes):
        raise EvaluationError(f"proba must be N×{len(classes)} (one column per class), got {proba.shape}")
    truth = np.asarray(y_true)
    if truth.ndim != 1 or len(truth) != len(proba) or len(truth) == 0:
        raise EvaluationError(f"y_true must hold one label per proba row ({len(proba)}), got {truth.shape}")
    if truth.dtype.kind in ("U", "S", "O"):
        index = {name: i for i, name in enumerate(classes)}
        unknown = sorted({str(v) for v in truth} - set(index))
        if unknown:
            raise EvaluationError(f"labels {unknown} are not among the classes {list(classes)}")
        truth = np.array([index[str(v)] for v in truth])
    truth = truth.astype(int)
    if truth.min() < 0 or truth.max() >= len(classes):
        raise EvaluationError(f"class indices must be in [0, {len(classes)}), got {truth.min()}..{truth.max()}")
    return truth, proba


def resampled_macro_f1(
    truth: np.ndarray, predicted: np.ndarray, num_classes: int, draws: np.ndarray, present: np.ndarray | None = None
) -> np.ndarray:
    """Macro-F1 of every resample (rows of index array ``draws``) at once, over the ``present`` classes
    (default: those in the full ``truth``, the same set in every resample).

    `macro_f1`'s formula (F1 = 2·TP / (2·TP + FP + FN)), vectorised over all resamples: one sklearn call per
    resample would cost seconds for thousands of resamples. A class a resample draws no image of and
    predicts for none scores 1 (sklearn's ``zero_division=1``): nothing to find, nothing falsely claimed.
    Scored 0, a class with one test image (CellaVision's basophil) would sink the ~37 % of resamples that
    miss it, and hold even a perfect model's lower bound at (C - 1) / C.
    """
    present = np.bincount(truth, minlength=num_classes) > 0 if present is None else present
    rounds = len(draws)
    cells = truth * num_classes + predicted
    offsets = (np.arange(rounds) * num_classes**2)[:, None]
    counts = np.bincount((cells[draws] + offsets).ravel(), minlength=rounds * num_classes**2)
    confusions = counts.reshape(rounds, num_classes, num_classes)
    hits = np.diagonal(confusions, axis1=1, axis2=2).astype(float)
    denominator = confusions.sum(axis=1) + confusions.sum(axis=2)  # (TP + FP) + (TP + FN)
    f1 = np.divide(2 * hits, denominator, out=np.ones_like(hits), where=denominator > 0)
    return f1[:, present].mean(axis=1)


def _bootstrap_macro_f1(
    truth: np.ndarray, predicted: np.ndarray, num_classes: int, present: np.ndarray, rounds: int, seed: int
) -> tuple[float, float]:
    """Percentile 95% interval of macro-F1 (over the classes present in the full set) under resampling."""
    if rounds <= 0:
        return float("nan"), float("nan")
    samples = np.random.default_rng(seed).integers(0, len(truth), size=(rounds, len(truth)))
    low, high = np.percentile(resampled_macro_f1(truth, predicted, num_classes, samples, present), [2.5, 97.5])
    return float(low), float(high)
