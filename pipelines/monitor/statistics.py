"""Two feature frames in, a drift summary out: the tests, their Evidently 0.7 report, the retrain rule.

Statistical choices (thresholds live in ``settings.drift``):

* **Columns.** Up to ``large_sample_rows`` rows per side, each column gets a two-sample test at
  ``column_alpha / m`` (Bonferroni over the ``m`` columns of its family): Kolmogorov-Smirnov for numbers,
  and for categories a chi-square test of homogeneity on the 2×k count table, registered with Evidently
  here (Evidently's ``chisquare`` treats the reference shares as exact, which false-alarms more often;
  its TVD permutation test takes seconds per column). Two samples of one population then flag *any*
  column with probability ≤ ``column_alpha`` (5 %), where Evidently's default p < 0.05 per column
  expects 0.7 false alarms over 14 facts (``benchmarks/drift.py`` measures both on real pbc halves).
  Above that size p-values flag practically irrelevant differences, so (as in Evidently's own defaults)
  normed Wasserstein / Jensen-Shannon distances with ``distance_threshold`` take over. The dataset
  drifts when ``dataset_drift_share`` of the image-fact columns drift (stain/colour facts move together,
  size facts move together, so 0.3 is about one family moving as a whole).
* **Embeddings.** Evidently's ``EmbeddingsDrift`` with the *model-based* method (``ModelDriftMethod``):
  a logistic-regression domain classifier tries to tell reference from current PCA components; its
  held-out ROC-AUC is the score (0.5 = indistinguishable, 1 = fully separable), with ``bootstrap``: drift
  when the AUC beats the ``embedding_quantile`` (99 %) quantile of chance AUCs on the same split. Why
  this method: it is multivariate (catches shifts no single component shows), the score has a scale
  users understand and that does not depend on the embedding dimension, and the bootstrap makes the
  threshold adapt to the sample size. MMD's score has no absolute scale (its Evidently bootstrap also
  draws its null quantile at 5 %), share-of-drifted-components inherits the small-n false alarms of
  per-component tests, and mean distance ignores everything but the mean. Reference: Rabanser, Günnemann
  & Lipton, "Failing Loudly: An Empirical Study of Methods for Detecting Dataset Shift", NeurIPS 2019
  (domain classifiers), and Evidently's embedding drift docs.
* **Predictions.** ``ValueDrift`` on ``predicted_class`` (chi-square homogeneity) and ``confidence``
  (KS), with the same Bonferroni split over the two.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import pandas as pd

from pipelines.data.imagefacts import FACT_COLUMNS
from pipelines.monitor.features import (
    CONFIDENCE,
    EMBEDDING_NAME,
    FILE_TYPE,
    PC_PREFIX,
    PREDICTED_CLASS,
    DriftError,
)

if TYPE_CHECKING:
    from evidently import Dataset
    from evidently.core.report import Report, Snapshot
    from evidently.metrics.embeddings import ModelDriftMethod

    from pipelines.core.settings import DriftThresholds

CATEGORY_TEST = "chi2_homogeneity"
MIN_ROWS = 20  # below this a two-sample test or a domain classifier says nothing useful


@dataclass(frozen=True)
class ColumnTest:
    method: str
    threshold: float


@dataclass(frozen=True)
class FeatureColumns:
    """The columns both sides have, by role."""

    facts: list[str]
    categorical_facts: list[str]
    embedding: list[str]
    predictions: bool

    @property
    def image_columns(self) -> list[str]:
        return self.facts + self.categorical_facts


def shared_columns(reference: pd.DataFrame, current: pd.DataFrame) -> FeatureColumns:
    both = set(reference.columns) & set(current.columns)
    return FeatureColumns(
        facts=[c for c in FACT_COLUMNS if c in both],
        categorical_facts=[FILE_TYPE] if FILE_TYPE in both else [],
        embedding=[c for c in reference.columns if c.startswith(PC_PREFIX) and c in both],
        predictions=PREDICTED_CLASS in both and CONFIDENCE in both,
    )


# -- the tests and the Evidently report --------------------------------------------------------------


def column_test(
    categorical: bool, n_reference: int, n_current: int, family_size: int, t: DriftThresholds
) -> ColumnTest:
    """p-value tests (Bonferroni-split alpha) for small samples, effect-size distances for large ones."""
    if min(n_reference, n_current) > t.large_sample_rows:
        return ColumnTest("jensenshannon" if categorical else "wasserstein", t.distance_threshold)
    return ColumnTest(CATEGORY_TEST if categorical else "ks", t.column_alpha / max(family_size, 1))


def chi2_homogeneity(reference: pd.Series, current: pd.Series, feature_type: Any, threshold: float):
    """Chi-square test of homogeneity on the 2×k table of category counts: (p-value, drifted)."""
    from scipy.stats import chi2_contingency

    table = pd.concat([reference.value_counts(), current.value_counts()], axis=1).fillna(0).to_numpy().T
    if table.shape[1] < 2:
        return 1.0, False
    p_value = float(chi2_contingency(table).pvalue)
    return p_value, p_value < threshold


def register_category_test() -> None:
    """Make ``chi2_homogeneity`` known to Evidently by name (registering twice is harmless)."""
    from evidently.legacy.calculations.stattests.registry import StatTest, register_stattest
    from evidently.legacy.core import ColumnType

    test = StatTest(CATEGORY_TEST, "chi-square homogeneity p_value", [ColumnType.Categorical])
    register_stattest(test, default_impl=chi2_homogeneity)


def embedding_method(t: DriftThresholds) -> ModelDriftMethod:
    from evidently.metrics.embeddings import ModelDriftMethod

    return ModelDriftMethod(bootstrap=True, quantile_probability=t.embedding_quantile)


def build_report(columns: FeatureColumns, n_reference: int, n_current: int, t: DriftThresholds) -> Report:
    from evidently import Report
    from evidently.metrics import EmbeddingsDrift, ValueDrift
    from evidently.presets import DataDriftPreset

    register_category_test()
    family = len(columns.image_columns)
    numeric = column_test(False, n_reference, n_current, family, t)
    categorical = column_test(True, n_reference, n_current, family, t)
    items: list = [
        DataDriftPreset(
            columns=columns.image_columns,
            num_method=numeric.method,
            num_threshold=numeric.threshold,
            cat_method=categorical.method,
            cat_threshold=categorical.threshold,
            drift_share=t.dataset_drift_share,
        )
    ]
    if columns.embedding:
        items.append(EmbeddingsDrift(embeddings_name=EMBEDDING_NAME, drift_method=embedding_method(t)))
    if columns.predictions:
        items += [
            ValueDrift(column=PREDICTED_CLASS, **asdict(column_test(True, n_reference, n_current, 2, t))),
            ValueDrift(column=CONFIDENCE, **asdict(column_test(False, n_reference, n_current, 2, t))),
        ]
    return Report(items, include_tests=True)


def evidently_dataset(frame: pd.DataFrame, columns: FeatureColumns) -> Dataset:
    from evidently import DataDefinition, Dataset

    numerical = columns.facts + columns.embedding + ([CONFIDENCE] if columns.predictions else [])
    categorical = columns.categorical_facts + ([PREDICTED_CLASS] if columns.predictions else [])
    definition = DataDefinition(
        numerical_columns=numerical,
        categorical_columns=categorical,
        embeddings={EMBEDDING_NAME: columns.embedding} if columns.embedding else None,
    )
    return Dataset.from_pandas(frame[numerical + categorical], data_definition=definition)


# -- reading the report ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ColumnDrift:
    score: float
    method: str
    threshold: float
    drifted: bool


def column_drifts(report_dict: dict[str, Any]) -> dict[str, ColumnDrift]:
    """Per-column drift from an Evidently 0.7 snapshot dict (``ValueDrift`` values + their drift tests)."""
    values = {m["id"]: m for m in report_dict["metrics"] if m["config"]["type"].endswith(":ValueDrift")}
    result = {}
    for test in report_dict["tests"]:
        metric = values.get(test["metric_config"]["metric_id"])
        if metric is None:
            continue
        config = metric["config"]
        result[config["column"]] = ColumnDrift(
            score=float(metric["value"]),
            method=str(config.get("method")),
            threshold=float(config.get("threshold")),
            drifted=test["status"] == "FAIL",
        )
    return result


@dataclass(frozen=True)
class DriftSummary:
    """The compact answer: what drifted, how much, and notes on what could not be compared."""

    drift_detected: bool
    drift_share: float
    drifted_features: list[str]
    embedding_drift: float | None
    embedding_drift_detected: bool
    prediction_drift: bool | None
    n_reference: int
    n_current: int
    columns: dict[str, ColumnDrift] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DriftSummary:
        columns = {k: ColumnDrift(**v) for k, v in data.get("columns", {}).items()}
        return cls(**{**data, "columns": columns})


def summarize(
    drifts: dict[str, ColumnDrift],
    columns: FeatureColumns,
    embedding: tuple[float, bool] | None,
    n_reference: int,
    n_current: int,
    t: DriftThresholds,
    notes: Sequence[str] = (),
) -> DriftSummary:
    image = [c for c in columns.image_columns if c in drifts]
    drifted_image = [c for c in image if drifts[c].drifted]
    share = len(drifted_image) / len(image) if image else 0.0
    prediction_drift = (
        any(drifts[c].drifted for c in (PREDICTED_CLASS, CONFIDENCE) if c in drifts) if columns.predictions else None
    )
    drifted = drifted_image + ([EMBEDDING_NAME] if embedding and embedding[1] else [])
    drifted += [c for c in (PREDICTED_CLASS, CONFIDENCE) if c in drifts and drifts[c].drifted]
    return DriftSummary(
        drift_detected=share >= t.dataset_drift_share or bool(embedding and embedding[1]) or bool(prediction_drift),
        drift_share=round(share, 4),
        drifted_features=drifted,
        embedding_drift=round(embedding[0], 4) if embedding else None,
        embedding_drift_detected=bool(embedding and embedding[1]),
        prediction_drift=prediction_drift,
        n_reference=n_reference,
        n_current=n_current,
        columns=drifts,
        notes=list(notes),
    )


def retrain_recommended(summary: DriftSummary, rule: DriftThresholds) -> bool:
    """The retrain decision (read by the retrain DAG): enough image facts drifted, or the embeddings did."""
    if summary.drift_share >= rule.retrain_drift_share:
        return True
    if summary.embedding_drift is not None and summary.embedding_drift >= rule.retrain_embedding_auc:
        return True
    return bool(rule.retrain_on_prediction_drift and summary.prediction_drift)


# -- the comparison ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DriftResult:
    summary: DriftSummary
    snapshot: Snapshot


def compare(
    reference: pd.DataFrame, current: pd.DataFrame, t: DriftThresholds, notes: Sequence[str] = ()
) -> DriftResult:
    """Run the Evidently report on two feature frames and summarise it."""
    for name, frame in (("reference", reference), ("current", current)):
        if len(frame) < MIN_ROWS:
            raise DriftError(f"the {name} side has {len(frame)} images; drift needs at least {MIN_ROWS}")
    columns = shared_columns(reference, current)
    report = build_report(columns, len(reference), len(current), t)
    snapshot = report.run(
        current_data=evidently_dataset(current, columns), reference_data=evidently_dataset(reference, columns)
    )
    embedding = None
    if columns.embedding:
        # Evidently's EmbeddingsDrift value is the score alone; the verdict comes from the method itself
        score, drifted, _ = embedding_method(t)(current[columns.embedding].copy(), reference[columns.embedding].copy())
        embedding = (float(score), bool(drifted))
    drifts = column_drifts(snapshot.dict())
    summary = summarize(drifts, columns, embedding, len(reference), len(current), t, notes)
    return DriftResult(summary, snapshot)
