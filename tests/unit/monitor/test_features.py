"""Drift features: manifest facts with image fallbacks, model columns, serving-log features, the PCA."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipelines.data.imagefacts import FACT_COLUMNS, DecodedImage, image_facts
from pipelines.monitor.features import (
    CONFIDENCE,
    FILE_TYPE,
    PREDICTED_CLASS,
    DriftError,
    EmbeddingPCA,
    assemble_features,
    fact_features,
    file_types,
    image_side_features,
    prediction_features,
    rows_missing_facts,
    serving_side_features,
)

from .frames import fact_rows


def test_fact_features_use_manifest_values_and_fill_missing_ones_from_images():
    rng = np.random.default_rng(0)
    rows = fact_rows(rng, 3)
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
    rows = fact_rows(np.random.default_rng(1), 4)
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

    rows = fact_rows(np.random.default_rng(2), 3)
    colours = [(200, 10, 10), (10, 200, 10), (10, 10, 200)]
    decoded = [DecodedImage(np.full((6, 6, 3), c, np.uint8), "PNG", 3) for c in colours]
    features, embeddings = image_side_features(rows, lambda frame: decoded, MeanColourModel(), None)
    assert embeddings.shape == (3, 3)
    assert list(features[PREDICTED_CLASS]) == ["red", "green", "blue"]
    assert features[CONFIDENCE].between(0.9, 1.0).all()


def test_serving_side_features_project_logged_embeddings_with_the_reference_pca():
    rng = np.random.default_rng(3)
    pca = EmbeddingPCA.fit(rng.normal(size=(50, 12)), 4)
    log = fact_rows(rng, 30).drop(columns=["key"]).assign(predicted_class="a", confidence=0.8, model_version="3")
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
