"""Pure parts of drift monitoring: feature assembly, PCA, test choice, Evidently summary, rule, pages."""

from __future__ import annotations

import re
from datetime import date
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest

from pipelines.monitor.drift import (
    CATEGORY_TEST,
    CONFIDENCE,
    EMBEDDING_NAME,
    FILE_TYPE,
    PREDICTED_CLASS,
    ColumnDrift,
    DriftError,
    DriftSummary,
    EmbeddingPCA,
    FeatureColumns,
    assemble_features,
    chi2_homogeneity,
    column_test,
    compare,
    fact_features,
    file_types,
    image_side_features,
    index_page,
    parse_date_window,
    parse_spec,
    prediction_features,
    report_keys,
    report_page,
    retrain_recommended,
    rows_missing_facts,
    sample_rows,
    serving_side_features,
    summarize,
    upsert_index,
)
from pipelines.data.imagefacts import FACT_COLUMNS, DecodedImage, image_facts
from pipelines.core.settings import DriftThresholds

COLOUR = ("red_mean", "green_mean", "blue_mean", "hematoxylin_od", "eosin_od", "hue_mean")


def _facts(rng: np.random.Generator, n: int, colour_shift: float = 0.0) -> pd.DataFrame:
    frame = pd.DataFrame({c: rng.normal(100.0, 10.0, n) for c in FACT_COLUMNS})
    frame["width"], frame["height"], frame["channels"] = 360.0, 363.0, 3.0
    for column in COLOUR:
        frame[column] += colour_shift
    frame["key"] = [f"raw/sha256/aa/bb/{i:064x}.jpg" for i in range(n)]
    return frame


def _with_model(frame: pd.DataFrame, rng: np.random.Generator, shift: float = 0.0) -> pd.DataFrame:
    n = len(frame)
    pcs = pd.DataFrame(rng.normal(shift, 1.0, (n, 8)), columns=[f"emb_pc{i}" for i in range(8)])
    proba = rng.dirichlet(np.ones(3), n)
    return assemble_features(fact_features(frame), pcs, prediction_features(proba, ["a", "b", "c"]))


T = DriftThresholds()


# -- features ---------------------------------------------------------------------------------------


def test_fact_features_use_manifest_values_and_fill_missing_ones_from_images():
    rng = np.random.default_rng(0)
    rows = _facts(rng, 3)
    rows.loc[1, "brightness"] = np.nan
    rgb = np.full((10, 12, 3), 200, np.uint8)
    assert list(rows_missing_facts(rows)) == [False, True, False]
    features = fact_features(rows, {1: image_facts(rgb)})
    assert features.loc[1, "brightness"] == pytest.approx(200.0) and features.loc[1, "width"] == 12.0
    assert features.loc[0, "brightness"] == rows.loc[0, "brightness"]
    assert list(features[FILE_TYPE]) == ["jpg"] * 3
    with pytest.raises(DriftError, match="no image facts"):
        fact_features(rows)


def test_file_types_normalise_extensions():
    keys = pd.Series(["raw/a.JPEG", "raw/b.jpg", "raw/c.bmp", "raw/d.TIFF", "raw/e"])
    assert list(file_types(keys)) == ["jpg", "jpg", "bmp", "tif", "unknown"]


def test_image_side_features_decode_only_rows_without_facts_when_no_model():
    rows = _facts(np.random.default_rng(1), 4)
    rows.loc[2, list(FACT_COLUMNS)] = np.nan
    asked: list[list[int]] = []

    def images(frame: pd.DataFrame) -> list[DecodedImage]:
        asked.append(list(frame.index))
        return [DecodedImage(np.full((8, 8, 3), 90, np.uint8), "PNG", 3) for _ in range(len(frame))]

    features, embeddings = image_side_features(rows, images, None, None)
    assert asked == [[2]] and embeddings is None
    assert features.loc[2, "brightness"] == pytest.approx(90.0) and len(features) == 4


def test_image_side_features_with_a_model_add_embeddings_and_predictions():
    class MeanColourModel:
        """A deterministic model: its embedding is the mean colour, its prediction the brightest channel."""

        classes = ("red", "green", "blue")

        def embed(self, rgb_list):
            return np.stack([rgb.reshape(-1, 3).mean(axis=0) for rgb in rgb_list])

        def predict_proba(self, rgb_list):
            means = self.embed(rgb_list)
            return means / means.sum(axis=1, keepdims=True)

    rows = _facts(np.random.default_rng(2), 3)
    colours = [(200, 10, 10), (10, 200, 10), (10, 10, 200)]
    decoded = [DecodedImage(np.full((6, 6, 3), c, np.uint8), "PNG", 3) for c in colours]
    features, embeddings = image_side_features(rows, lambda frame: decoded, MeanColourModel(), None)
    assert embeddings.shape == (3, 3)
    assert list(features[PREDICTED_CLASS]) == ["red", "green", "blue"]
    assert features[CONFIDENCE].between(0.9, 1.0).all()


def test_serving_side_features_project_logged_embeddings_with_the_reference_pca():
    rng = np.random.default_rng(3)
    pca = EmbeddingPCA.fit(rng.normal(size=(50, 12)), 4)
    log = _facts(rng, 30).drop(columns=["key"]).assign(predicted_class="a", confidence=0.8, model_version="3")
    with_embeddings = log.assign(embedding=[list(rng.normal(size=12)) for _ in range(30)])
    side = serving_side_features(with_embeddings, pca, "3")
    assert side.notes == [] and [c for c in side.features if c.startswith("emb_pc")] == pca.columns
    assert FILE_TYPE not in side.features and set(side.features[PREDICTED_CLASS]) == {"a"}
    partial = with_embeddings.copy()
    partial.loc[3, "embedding"] = None
    older = with_embeddings.assign(model_version=["2"] * 10 + ["3"] * 20)
    for rows, note in ((partial, "no embeddings for every request"), (older, "versions ['2', '3']")):
        side = serving_side_features(rows, pca, "3")
        assert note in side.notes[0] and not any(c.startswith("emb_pc") for c in side.features)


def test_prediction_features_take_argmax_and_its_probability():
    proba = np.array([[0.1, 0.7, 0.2], [0.5, 0.25, 0.25]])
    frame = prediction_features(proba, ["a", "b", "c"])
    assert list(frame[PREDICTED_CLASS]) == ["b", "a"] and list(frame[CONFIDENCE]) == [0.7, 0.5]
    with pytest.raises(DriftError, match="do not match 2 classes"):
        prediction_features(proba, ["a", "b"])


def test_assemble_features_refuses_blocks_of_different_lengths():
    with pytest.raises(DriftError, match="different row counts"):
        assemble_features(pd.DataFrame({"a": [1, 2]}), pd.DataFrame({"b": [1]}))


def test_sample_rows_is_deterministic_and_bounded():
    rows = pd.DataFrame({"sha256": [f"{i:04x}" for i in range(50)], "v": range(50)})
    shuffled = rows.sample(frac=1.0, random_state=3)
    first, second = sample_rows(rows, 20), sample_rows(shuffled, 20)
    assert len(first) == 20 and set(first["sha256"]) == set(second["sha256"])
    assert len(sample_rows(rows, 100)) == 50


# -- PCA ----------------------------------------------------------------------------------------------


def test_embedding_pca_whitens_reference_and_round_trips_through_json():
    rng = np.random.default_rng(4)
    embeddings = rng.normal(0, 1, (200, 32)) @ rng.normal(0, 1, (32, 32))
    pca = EmbeddingPCA.fit(embeddings, 8)
    pcs = pca.transform(embeddings)
    assert list(pcs.columns) == [f"emb_pc{i}" for i in range(8)]
    assert np.allclose(pcs.std(ddof=1), 1.0, atol=1e-6) and np.allclose(pcs.mean(), 0.0, atol=1e-9)
    again = EmbeddingPCA.from_dict(pca.to_dict())
    assert np.allclose(again.transform(embeddings[:5]), pcs[:5])
    with pytest.raises(DriftError, match="32-d"):
        pca.transform(embeddings[:, :10])


def test_embedding_pca_caps_components_at_sample_size():
    pca = EmbeddingPCA.fit(np.random.default_rng(5).normal(size=(6, 40)), 16)
    assert pca.components.shape == (5, 40)


# -- statistics -----------------------------------------------------------------------------------------


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


@pytest.fixture(scope="module")
def same_and_shifted():
    rng = np.random.default_rng(7)
    reference = _with_model(_facts(rng, 120), rng)
    same = _with_model(_facts(rng, 120), rng)
    shifted = _with_model(_facts(rng, 120, colour_shift=8.0), rng, shift=0.8)
    shifted[[PREDICTED_CLASS, CONFIDENCE]] = reference[[PREDICTED_CLASS, CONFIDENCE]]  # the same mix
    return reference, compare(reference, same, T), compare(reference, shifted, T)


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
    result = compare(fact_features(_facts(rng, 60)), fact_features(_facts(rng, 60, colour_shift=20)), T)
    assert result.summary.embedding_drift is None and result.summary.prediction_drift is None
    assert set(result.summary.drifted_features) == set(COLOUR)


def test_compare_refuses_tiny_samples():
    rng = np.random.default_rng(9)
    with pytest.raises(DriftError, match="current side has 5 images"):
        compare(fact_features(_facts(rng, 50)), fact_features(_facts(rng, 5)), T)


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


# -- specs ------------------------------------------------------------------------------------------------


def test_parse_spec_accepts_the_documented_forms_and_names_them_on_error():
    kinds = ("champion", "dataset", "source", "batch")
    assert str(parse_spec("champion", kinds, "reference")) == "champion"
    assert parse_spec("dataset:abc", kinds, "reference").value == "abc"
    for bad in ("serving:2026-01-01..2026-01-02", "dataset:", "champion:x", "pbc"):
        with pytest.raises(DriftError, match="--reference"):
            parse_spec(bad, kinds, "reference")


def test_parse_date_window():
    assert parse_date_window("2026-01-01..2026-01-03") == (date(2026, 1, 1), date(2026, 1, 3))
    for bad in ("2026-01-03..2026-01-01", "2026-01-01", "yesterday..today"):
        with pytest.raises(DriftError, match="serving window"):
            parse_date_window(bad)


# -- pages ----------------------------------------------------------------------------------------------


class _Checker(HTMLParser):
    """Counts unclosed elements of the kinds we write (html, body, table, section)."""

    def __init__(self) -> None:
        super().__init__()
        self.open: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag in ("html", "body", "table", "section", "tr"):
            self.open.append(tag)

    def handle_endtag(self, tag):
        if tag in ("html", "body", "table", "section", "tr"):
            assert self.open and self.open[-1] == tag, f"</{tag}> closes {self.open[-1:]}"
            self.open.pop()


def test_report_page_puts_the_summary_into_the_evidently_body(same_and_shifted):
    _, _, shifted = same_and_shifted
    meta = {"report_id": "wbc-123", "task": "wbc", "reference": "dataset:v1", "current": "batch:b1"}
    page = report_page(shifted.snapshot.get_html_str(as_iframe=False), shifted.summary, meta, True)
    assert page.lstrip().startswith("<!DOCTYPE html>") and "<title>" in page
    body = page[page.index("<body") :]
    assert body.index('id="leukops-drift-summary"') < body.index("<script")
    assert "hematoxylin_od" in page and "retrain recommended" in page
    with pytest.raises(DriftError, match="no <body>"):
        report_page("<html></html>", shifted.summary, meta, True)


def test_index_lists_newest_first_and_a_rerun_replaces_its_entry():
    def entry(day: str, rid: str, created: str, drift: bool) -> dict:
        html_key, json_key = report_keys(date.fromisoformat(day), rid)
        return {
            "date": day, "created": created, "report_id": rid, "task": "wbc", "reference": "champion",
            "current": "batch:x", "html_key": html_key, "json_key": json_key, "drift_detected": drift,
            "drift_share": 0.1, "embedding_drift": None, "retrain_recommended": False,
        }  # fmt: skip

    entries = upsert_index([], entry("2026-01-01", "old", "2026-01-01T10:00:00", False))
    entries = upsert_index(entries, entry("2026-01-02", "new", "2026-01-02T09:00:00", False))
    entries = upsert_index(entries, entry("2026-01-01", "old", "2026-01-03T10:00:00", True))
    assert [e["report_id"] for e in entries] == ["new", "old"] and entries[1]["drift_detected"] is True
    page = index_page(entries)
    checker = _Checker()
    checker.feed(page)
    assert checker.open == []
    assert re.findall(r'href="([^"]+)"', page) == ["2026-01-02/new.html", "2026-01-01/old.html"]
