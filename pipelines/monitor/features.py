"""Drift features, one row per image (pure: no storage, no registry).

* the ingest facts (``imagefacts.FACT_COLUMNS``: size, brightness, contrast, blur, hue/saturation, RGB
  means, purple share, haematoxylin/eosin optical density), read straight from the manifest where ingest
  stored them and computed from the decoded image otherwise, plus ``file_type`` (from the object key);
* the champion's penultimate-layer embedding, reduced by a whitened PCA fitted on the reference and
  stored with the reference features, so every run against that reference uses the same axes;
* the champion's predicted class and confidence.

Stain: the facts (hue, saturation, RGB means, haematoxylin/eosin density) come from the raw decoded images,
never stain-normalised, so a new lab's stain shift keeps showing as drift. The embeddings and confidences
go through the champion's own preprocessing (``LoadedModel.batch``), which applies the stain normaliser
saved in its bundle (`pipelines.model.stain`), so they describe what the model actually sees.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pandas as pd

from pipelines.core.errors import LeukopsError
from pipelines.data.imagefacts import FACT_COLUMNS, DecodedImage, image_facts

log = logging.getLogger(__name__)

EMBEDDING_NAME = "embedding"  # the embeddings set in the report, and its name in drifted_features
PC_PREFIX = "emb_pc"
FILE_TYPE = "file_type"
PREDICTED_CLASS = "predicted_class"
CONFIDENCE = "confidence"
SIZE_FEATURES = ("width", "height", "channels", FILE_TYPE)
MODEL_BATCH = 32


class DriftError(LeukopsError):
    """A drift input is missing or unusable; the message names the spec, object and reason."""


class ImageModel(Protocol):
    """What drift needs from a loaded model (``pipelines.model.bundle.LoadedModel`` satisfies it: its
    ``predict_proba`` is the one predict function, so confidences carry the bundle's temperature and TTA)."""

    classes: Sequence[str]

    def embed(self, rgb_list: list[np.ndarray]) -> np.ndarray: ...

    def predict_proba(self, rgb_list: list[np.ndarray]) -> np.ndarray: ...


@dataclass(frozen=True)
class EmbeddingPCA:
    """A whitened PCA of penultimate features, fitted on the reference; JSON-serialisable, no pickle."""

    mean: np.ndarray
    components: np.ndarray  # k × D
    scale: np.ndarray  # sqrt of explained variance, k

    @classmethod
    def fit(cls, embeddings: np.ndarray, n_components: int) -> EmbeddingPCA:
        from sklearn.decomposition import PCA

        k = max(1, min(n_components, embeddings.shape[0] - 1, embeddings.shape[1]))
        pca = PCA(n_components=k, svd_solver="full", random_state=0).fit(embeddings)
        return cls(pca.mean_, pca.components_, np.sqrt(np.maximum(pca.explained_variance_, 1e-12)))

    @property
    def input_dim(self) -> int:
        return int(self.components.shape[1])

    @property
    def columns(self) -> list[str]:
        return [f"{PC_PREFIX}{i}" for i in range(self.components.shape[0])]

    def transform(self, embeddings: np.ndarray) -> pd.DataFrame:
        if embeddings.ndim != 2 or embeddings.shape[1] != self.input_dim:
            raise DriftError(
                f"embeddings of shape {embeddings.shape} do not match the reference PCA ({self.input_dim}-d)"
            )
        return pd.DataFrame(((embeddings - self.mean) @ self.components.T) / self.scale, columns=self.columns)

    def to_dict(self) -> dict[str, list]:
        return {
            "mean": self.mean.tolist(),
            "components": self.components.tolist(),
            "scale": self.scale.tolist(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, list]) -> EmbeddingPCA:
        return cls(*(np.asarray(data[k], dtype=np.float64) for k in ("mean", "components", "scale")))


# -- feature blocks ----------------------------------------------------------------------------------


def rows_missing_facts(rows: pd.DataFrame) -> pd.Series:
    """True for rows whose ingest facts are absent (older manifests) and must come from the image."""
    if any(c not in rows.columns for c in FACT_COLUMNS):
        return pd.Series(True, index=rows.index)
    return rows[list(FACT_COLUMNS)].isna().any(axis=1)


def file_types(keys: pd.Series) -> pd.Series:
    """jpg / png / bmp ... from object keys (jpeg and jpg are one type)."""
    ext = keys.astype(str).str.extract(r"\.([A-Za-z0-9]+)$", expand=False).str.lower()
    return ext.replace({"jpeg": "jpg", "tiff": "tif"}).fillna("unknown")


def fact_features(rows: pd.DataFrame, computed: dict[Any, dict[str, float]] | None = None) -> pd.DataFrame:
    """The fact columns of ``rows`` (manifest values, or ``computed`` facts by row index) + file_type."""
    frame = pd.DataFrame(index=rows.index)
    for column in FACT_COLUMNS:
        frame[column] = rows[column].astype(float) if column in rows.columns else np.nan
    for index, facts in (computed or {}).items():
        frame.loc[index, list(FACT_COLUMNS)] = [facts[c] for c in FACT_COLUMNS]
    missing = frame.index[frame.isna().any(axis=1)]
    if len(missing):
        raise DriftError(f"{len(missing)} rows have no image facts and no decoded image (first: {missing[0]!r})")
    if "key" in rows.columns:
        frame[FILE_TYPE] = file_types(rows["key"])
    return frame.reset_index(drop=True)


def prediction_features(proba: np.ndarray, classes: Sequence[str]) -> pd.DataFrame:
    if proba.ndim != 2 or proba.shape[1] != len(classes):
        raise DriftError(f"probabilities of shape {proba.shape} do not match {len(classes)} classes")
    return pd.DataFrame(
        {
            PREDICTED_CLASS: np.asarray(classes, dtype=object)[proba.argmax(axis=1)],
            CONFIDENCE: proba.max(axis=1),
        }
    )


def model_outputs(model: ImageModel, rgbs: list[np.ndarray], batch: int = MODEL_BATCH) -> tuple[np.ndarray, np.ndarray]:
    """Penultimate embeddings (N×D) and class probabilities (N×C), computed in batches to bound memory."""
    embeddings, probas = [], []
    for start in range(0, len(rgbs), batch):
        chunk = rgbs[start : start + batch]
        embeddings.append(np.asarray(model.embed(chunk), dtype=np.float64))
        probas.append(np.asarray(model.predict_proba(chunk), dtype=np.float64))
        log.info("drift features: model outputs for %d/%d images", start + len(chunk), len(rgbs))
    return np.concatenate(embeddings), np.concatenate(probas)


def assemble_features(facts: pd.DataFrame, *parts: pd.DataFrame | None) -> pd.DataFrame:
    """Side-by-side concatenation of equally long feature blocks (missing blocks are skipped)."""
    blocks = [facts.reset_index(drop=True)] + [p.reset_index(drop=True) for p in parts if p is not None]
    lengths = {len(b) for b in blocks}
    if len(lengths) != 1:
        raise DriftError(f"feature blocks have different row counts: {sorted(lengths)}")
    return pd.concat(blocks, axis=1)


# -- one side's features -----------------------------------------------------------------------------


@dataclass
class SideFeatures:
    features: pd.DataFrame
    notes: list[str]


def image_side_features(
    rows: pd.DataFrame,
    images: Callable[[pd.DataFrame], list[DecodedImage]],
    model: ImageModel | None,
    pca: EmbeddingPCA | None,
) -> tuple[pd.DataFrame, np.ndarray | None]:
    """Facts (+ model predictions) for image rows; returns the features and the raw embeddings."""
    missing = rows_missing_facts(rows)
    to_decode = rows if model is not None else rows[missing]
    decoded = dict(zip(to_decode.index, images(to_decode), strict=True)) if len(to_decode) else {}
    computed = {idx: image_facts(decoded[idx].rgb, decoded[idx].source_channels) for idx in rows.index[missing]}
    facts = fact_features(rows, computed)
    if model is None:
        return facts, None
    embeddings, proba = model_outputs(model, [decoded[idx].rgb for idx in rows.index])
    pcs = pca.transform(embeddings) if pca is not None else None
    return assemble_features(facts, pcs, prediction_features(proba, model.classes)), embeddings


def serving_side_features(rows: pd.DataFrame, pca: EmbeddingPCA | None, champion_version: str | None) -> SideFeatures:
    """Features from the request log: facts and predictions as logged, embeddings when the champion logged them."""
    notes = []
    facts = fact_features(rows)
    predictions = rows[[PREDICTED_CLASS, CONFIDENCE]].reset_index(drop=True)
    pcs = None
    if pca is not None:
        served_by = set(rows["model_version"].astype(str)) if "model_version" in rows.columns else set()
        if "embedding" not in rows.columns or not rows["embedding"].notna().all():
            notes.append("serving log has no embeddings for every request: embedding drift skipped")
        elif served_by != {str(champion_version)}:
            notes.append(
                f"requests were served by model versions {sorted(served_by)}, not only the champion "
                f"{champion_version}: their embeddings are not comparable, embedding drift skipped"
            )
        else:
            pcs = pca.transform(np.stack([np.asarray(e, dtype=np.float64) for e in rows["embedding"]]))
    return SideFeatures(assemble_features(facts, pcs, predictions), notes)
