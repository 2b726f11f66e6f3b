"""The two sides of a drift report: specs (``champion``, ``dataset:``, ``source:``, ``batch:``, ``serving:``),
the rows they name in S3, the champion from the registry, and both sides' features.

Reference features of a champion are cached in S3 together with the PCA fitted on them, so every report
against that reference uses the same embedding axes (and the reference is embedded once).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from typing import TYPE_CHECKING

import pandas as pd

from pipelines.data.imagefacts import DecodedImage, decode_image
from pipelines.io import layout
from pipelines.monitor.features import (
    DriftError,
    EmbeddingPCA,
    ImageModel,
    assemble_features,
    image_side_features,
    serving_side_features,
)

if TYPE_CHECKING:
    from pipelines.core.settings import DriftThresholds, Settings
    from pipelines.io.storage import ObjectStore

REFERENCE_KINDS = ("champion", "dataset", "source", "batch")
CURRENT_KINDS = ("batch", "source", "serving")


# -- specs ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    kind: str
    value: str

    def __str__(self) -> str:
        return self.kind if self.kind == "champion" else f"{self.kind}:{self.value}"


def parse_spec(text: str, kinds: Sequence[str], role: str) -> Spec:
    kind, _, value = text.partition(":")
    if kind not in kinds or (kind != "champion" and not value) or (kind == "champion" and value):
        forms = ", ".join("champion" if k == "champion" else f"{k}:..." for k in kinds)
        raise DriftError(f"bad --{role} {text!r}: expected one of {forms}")
    return Spec(kind, value)


def parse_date_window(value: str) -> tuple[date, date]:
    """``FROM..TO`` (ISO dates, inclusive) → the two dates."""
    start, sep, end = value.partition("..")
    try:
        first, last = date.fromisoformat(start), date.fromisoformat(end)
    except ValueError:
        first = last = None
    if not sep or first is None or last is None or last < first:
        raise DriftError(f"bad serving window {value!r}: expected YYYY-MM-DD..YYYY-MM-DD with FROM <= TO")
    return first, last


# -- the champion ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Champion:
    version: str
    run_id: str
    dataset_version: str

    @property
    def model_uri(self) -> str:
        return layout.run_model_uri(self.run_id)


def find_champion(settings: Settings, task: str) -> Champion | None:
    """The task's @champion version, its run and the snapshot it was trained on (None when none yet)."""
    from pipelines.io.registry import Registry

    registry = Registry.from_settings(settings)
    record = registry.champion(task)
    if record is None:
        return None
    if not record.run_id:
        raise DriftError(f"{record.name} version {record.version} (@champion) has no training run")
    dataset_version = registry.read_run(record.run_id).tags.get("dataset_version")
    if not dataset_version:
        raise DriftError(f"run {record.run_id} of {record.name} v{record.version} has no dataset_version tag")
    return Champion(record.version, record.run_id, dataset_version)


# -- rows -------------------------------------------------------------------------------------------------


def batch_rows(store: ObjectStore, batch_id: str) -> pd.DataFrame:
    """Accepted rows of the published batch manifest ``batch_id`` (of whichever source holds it)."""
    keys = [k for k in store.list(layout.batches_dir()) if layout.batch_of_manifest_key(k)[1] == batch_id]
    if not keys:
        raise DriftError(f"no batch manifest {batch_id!r} under {store.uri(layout.batches_dir())}")
    if len(keys) > 1:
        raise DriftError(f"batch id {batch_id!r} is ambiguous: {', '.join(keys)}")
    rows = store.get_parquet(keys[0])
    return rows[rows["status"] == "accepted"].reset_index(drop=True)


def serving_rows(store: ObjectStore, task: str, window: str) -> pd.DataFrame:
    """The serving request log of ``task`` for the dates FROM..TO (inclusive)."""
    first, last = parse_date_window(window)
    days = [(first + timedelta(days=i)).isoformat() for i in range((last - first).days + 1)]
    keys = [k for d in days for k in store.list(layout.request_log_day_dir(d)) if k.endswith(".parquet")]
    if not keys:
        raise DriftError(f"no serving request logs under {store.uri(layout.SERVING_REQUESTS)}/date={first}..{last}")
    rows = pd.concat([store.get_parquet(k) for k in keys], ignore_index=True)
    return rows[rows["task"] == task].reset_index(drop=True)


def snapshot_train_rows(store: ObjectStore, task: str, version: str) -> pd.DataFrame:
    """The rows the model learned from: the train split of the snapshot."""
    from pipelines.data.snapshot import load_snapshot

    frame = load_snapshot(store, task, version).frame
    return frame[frame["split"] == "train"].reset_index(drop=True)


def spec_rows(spec: Spec, task: str, store: ObjectStore, champion: Champion | None) -> pd.DataFrame:
    if spec.kind == "champion":
        if champion is None:
            raise DriftError(f"task {task!r} has no @champion yet: use --reference dataset:VERSION or source:NAME")
        return snapshot_train_rows(store, task, champion.dataset_version)
    if spec.kind == "dataset":
        return snapshot_train_rows(store, task, spec.value)
    if spec.kind == "source":
        from pipelines.data.manifests import accepted_rows

        return accepted_rows(store, spec.value)
    if spec.kind == "batch":
        return batch_rows(store, spec.value)
    return serving_rows(store, task, spec.value)


def sample_rows(rows: pd.DataFrame, max_rows: int) -> pd.DataFrame:
    """At most ``max_rows`` rows, the same ones for the same input (ordered by identity, fixed seed)."""
    identity = next((c for c in ("sha256", "request_id") if c in rows.columns), None)
    ordered = rows.sort_values(identity, kind="stable") if identity else rows
    if len(ordered) <= max_rows:
        return ordered
    return ordered.sample(n=max_rows, random_state=0).sort_index()


def decode_rows(store: ObjectStore, rows: pd.DataFrame, settings: Settings) -> list[DecodedImage]:
    """Decoded images of rows (sha256, key), fetched once into the local content-addressed cache."""
    from pipelines.data.datasets import fill_cache

    paths = fill_cache(store, rows, settings.state_dir / "cache")
    return [decode_image(p.read_bytes()) for p in paths]


# -- features of both sides ---------------------------------------------------------------------------


def reference_cache_digest(champion: Champion, rows: pd.DataFrame, t: DriftThresholds) -> str:
    """Same champion, PCA size and images, same digest: the cached reference is still valid."""
    parts = [champion.run_id, t.pca_components, sorted(rows["sha256"])]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def reference_features(
    store: ObjectStore,
    task: str,
    rows: pd.DataFrame,
    champion: Champion | None,
    model: ImageModel | None,
    settings: Settings,
) -> tuple[pd.DataFrame, EmbeddingPCA | None]:
    """Reference features; with a champion, cached in S3 together with the PCA fitted on them."""

    def images(frame: pd.DataFrame) -> list[DecodedImage]:
        return decode_rows(store, frame, settings)

    if champion is None or model is None:
        return image_side_features(rows, images, None, None)[0], None
    digest = reference_cache_digest(champion, rows, settings.drift)
    features_key, pca_key = layout.drift_reference_keys(task, champion.run_id, digest)
    if store.exists(pca_key) and store.exists(features_key):
        return store.get_parquet(features_key), EmbeddingPCA.from_dict(store.get_json(pca_key))
    features, embeddings = image_side_features(rows, images, model, None)
    pca = EmbeddingPCA.fit(embeddings, settings.drift.pca_components)
    features = assemble_features(features, pca.transform(embeddings))
    store.put_json(pca_key, pca.to_dict())
    store.put_parquet(features_key, features)  # written last: the pair is complete
    return features, pca


def current_features(
    store: ObjectStore,
    spec: Spec,
    rows: pd.DataFrame,
    champion: Champion | None,
    model: ImageModel | None,
    pca: EmbeddingPCA | None,
    settings: Settings,
) -> tuple[pd.DataFrame, list[str]]:
    """Current features (projected on the reference PCA) and notes on what could not be compared."""
    if spec.kind == "serving":
        side = serving_side_features(rows, pca, champion.version if champion else None)
        return side.features, side.notes
    features, embeddings = image_side_features(rows, lambda frame: decode_rows(store, frame, settings), model, None)
    if pca is None or embeddings is None:
        return features, []
    return assemble_features(features, pca.transform(embeddings)), []


@dataclass(frozen=True)
class DriftInputs:
    """Both sides as feature frames, with what identifies them."""

    reference: Spec
    current: Spec
    champion: Champion | None
    reference_features: pd.DataFrame
    current_features: pd.DataFrame
    current_identity: list[str]
    notes: list[str]


def gather(task: str, reference: str, current: str, settings: Settings, store: ObjectStore) -> DriftInputs:
    """Resolve both specs, sample their rows and build their features (with the champion when there is one)."""
    from pipelines.core.taxonomy import get_task
    from pipelines.model.bundle import load_model

    get_task(task)
    ref_spec = parse_spec(reference, REFERENCE_KINDS, "reference")
    cur_spec = parse_spec(current, CURRENT_KINDS, "current")
    champion = find_champion(settings, task)
    notes = [] if champion else [f"no champion for task {task!r}: embedding and prediction features skipped"]
    model = load_model(champion.model_uri, settings=settings) if champion else None
    ref_rows = sample_rows(spec_rows(ref_spec, task, store, champion), settings.drift.max_rows)
    cur_rows = sample_rows(spec_rows(cur_spec, task, store, champion), settings.drift.max_rows)
    for spec, rows in ((ref_spec, ref_rows), (cur_spec, cur_rows)):
        if rows.empty:
            raise DriftError(f"{spec} has no rows for task {task!r}")
    ref_features, pca = reference_features(store, task, ref_rows, champion, model, settings)
    cur_features, cur_notes = current_features(store, cur_spec, cur_rows, champion, model, pca, settings)
    identity = cur_rows["sha256"] if "sha256" in cur_rows.columns else cur_rows["request_id"]
    return DriftInputs(ref_spec, cur_spec, champion, ref_features, cur_features, list(identity), notes + cur_notes)
