"""Test choice, the chi-square homogeneity test, Evidently comparisons, the summary and the retrain rule."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipelines.core.settings import DriftThresholds
from pipelines.data.imagefacts import FACT_COLUMNS
from pipelines.monitor.features import (
    CONFIDENCE,
    EMBEDDING_NAME,
    FILE_TYPE,
    PREDICTED_CLASS,
    DriftError,
    fact_features,
)
from pipelines.monitor.statistics import (
    CATEGORY_TEST,
    ColumnDrift,
    DriftSummary,
    FeatureColumns,
    chi2_homogeneity,
    column_test,
    compare,
    retrain_recommended,
    summarize,
)

from .frames import COLOUR, T, fact_rows


def test_column_test_uses_bonferroni_split_p_values_for_small_samples_and_distances_for_large():
    assert column_test(False, 150, 120, 15, T).method == "ks"
    assert column_test(False, 150, 120, 15, T).threshold == pytest.approx(T.column_alpha / 15)
    assert column_test(True, 150, 120, 2, T).method == CATEGORY_TEST
    big = T.large_sample_rows + 1
    assert column_test(False, big, big, 15, T).method == "wasserstein"
    assert column_test(True, big, big, 15, T).method == "jensenshannon"
    assert column_test(True, big, 50, 15, T).method == CATEGORY_TEST, "the smaller side decides"


def test_chi2_homogeneity_is_a_two_sample_test_of_category_shares():
    a = pd.Series(["x"] * 50 + ["y"] * 50)
    assert chi2_homogeneity(a, pd.Series(["x"] * 48 + ["y"] * 52), None, 0.01) == (
        pytest.approx(0.887, abs=1e-2),
        False,
    )
    p_value, drifted = chi2_homogeneity(a, pd.Series(["x"] * 85 + ["y"] * 10 + ["z"] * 5), None, 0.01)
    assert p_value < 1e-6 and drifted
    assert chi2_homogeneity(pd.Series(["x"] * 5), pd.Series(["x"] * 9), None, 0.01) == (1.0, False)


def test_compare_same_population_reports_no_drift(same_and_shifted):
    _, same, _ = same_and_shifted
    s = same.summary
    assert not s.drift_detected and s.drifted_features == [] and s.drift_share == 0.0
    assert s.embedding_drift is not None and 0.3 < s.embedding_drift < 0.7 and not s.embedding_drift_detected
    assert s.prediction_drift is False
    assert set(s.columns) == {*FACT_COLUMNS, FILE_TYPE, PREDICTED_CLASS, CONFIDENCE}
    assert s.columns["brightness"].method == "ks"
    assert s.columns["brightness"].threshold == pytest.approx(T.column_alpha / (len(FACT_COLUMNS) + 1))


def test_compare_names_exactly_the_shifted_colour_features_and_the_embedding(same_and_shifted):
    _, _, shifted = same_and_shifted
    s = shifted.summary
    assert s.drift_detected and s.embedding_drift_detected and s.embedding_drift > 0.8
    assert s.prediction_drift is False
    assert set(s.drifted_features) == {*COLOUR, EMBEDDING_NAME}
    assert s.drift_share == pytest.approx(len(COLOUR) / (len(FACT_COLUMNS) + 1), abs=1e-3)
    report = shifted.snapshot.dict()
    assert any(m["config"]["type"].endswith(":EmbeddingsDrift") for m in report["metrics"])


def test_compare_flags_a_changed_prediction_mix(same_and_shifted):
    reference = same_and_shifted[0].drop(columns=[f"emb_pc{i}" for i in range(8)])
    one_class = reference.copy()
    one_class[PREDICTED_CLASS] = np.where(np.arange(len(one_class)) % 4 == 0, "b", "a")
    s = compare(reference, one_class, T).summary
    assert s.prediction_drift is True and s.drifted_features == [PREDICTED_CLASS] and s.drift_detected


def test_compare_without_model_columns_skips_embedding_and_predictions():
    rng = np.random.default_rng(8)
    result = compare(fact_features(fact_rows(rng, 60)), fact_features(fact_rows(rng, 60, colour_shift=20)), T)
    assert result.summary.embedding_drift is None and result.summary.prediction_drift is None
    assert set(result.summary.drifted_features) == set(COLOUR)


def test_compare_refuses_tiny_samples():
    rng = np.random.default_rng(9)
    with pytest.raises(DriftError, match="current side has 5 images"):
        compare(fact_features(fact_rows(rng, 50)), fact_features(fact_rows(rng, 5)), T)


def _summary(share: float, auc: float | None, prediction: bool | None = False) -> DriftSummary:
    return DriftSummary(share >= 0.3, share, [], auc, False, prediction, 100, 100)


def test_retrain_rule_thresholds_are_configurable():
    rule = DriftThresholds(retrain_drift_share=0.5, retrain_embedding_auc=0.75)
    assert not retrain_recommended(_summary(0.4, 0.7), rule)
    assert retrain_recommended(_summary(0.5, None), rule)
    assert retrain_recommended(_summary(0.0, 0.75), rule)
    assert not retrain_recommended(_summary(0.0, None, prediction=True), rule)
    assert retrain_recommended(
        _summary(0.0, None, prediction=True), rule.model_copy(update={"retrain_on_prediction_drift": True})
    )


def test_summarize_counts_share_over_image_columns_only():
    columns = FeatureColumns(["brightness", "contrast"], [FILE_TYPE], [], True)
    drifts = {
        "brightness": ColumnDrift(0.001, "ks", 0.01, True),
        "contrast": ColumnDrift(0.5, "ks", 0.01, False),
        FILE_TYPE: ColumnDrift(1.0, CATEGORY_TEST, 0.01, False),
        PREDICTED_CLASS: ColumnDrift(0.0, CATEGORY_TEST, 0.025, True),
        CONFIDENCE: ColumnDrift(0.9, "ks", 0.025, False),
    }
    s = summarize(drifts, columns, None, 50, 50, T, ["a note"])
    assert s.drift_share == pytest.approx(1 / 3, abs=1e-3) and s.prediction_drift is True
    assert s.drifted_features == ["brightness", PREDICTED_CLASS] and s.drift_detected
    assert DriftSummary.from_dict(s.to_dict()) == s
