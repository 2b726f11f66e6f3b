"""Batch manifests: their columns, and reading the ones stored in S3 (published and held).

A manifest has one row per file a source sent in a batch: where it came from, its sha256 and key, the
decoded pixels' facts and the validation verdict. A published manifest (``layout.batch_manifest_key``)
is an accepted or released batch; a held one (``layout.quarantined_manifest_key``) a quarantined batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pipelines.data.imagefacts import FACT_COLUMNS
from pipelines.io import layout

if TYPE_CHECKING:
    import pandas as pd

    from pipelines.io.storage import ObjectStore

TEXT_COLUMNS = (
    "source",
    "batch_id",
    "role",
    "path",
    "patient_id",
    "sha256",
    "key",
    "phash",
    "ext",
    "format",
    "label",
    "source_label",
    "path_error",
    "read_error",
    "decode_error",
    "decode_detail",
    "duplicate_of",
    "label_conflict",
    "cross_source",
    "label_map_version",
    "relabel_of",  # the batch whose decision on this sha the row replaces (pipelines.data.decisions)
    "previous_label",  # that decision's label(s)
)
MANIFEST_COLUMNS = (
    "row",
    *TEXT_COLUMNS,
    "revision",  # 1 for a sha's first decision in its source, +1 for each relabel
    "size_bytes",
    *FACT_COLUMNS,
    "suite_version",
    "status",
    "reason",
    "detail",
)


def manifest_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Rows → a frame with every manifest column, text columns as objects (None, never NaN)."""
    import pandas as pd

    frame = pd.DataFrame(rows)
    for column in MANIFEST_COLUMNS:
        if column not in frame:
            frame[column] = None
    for column in TEXT_COLUMNS:
        frame[column] = frame[column].astype(object).where(frame[column].notna(), None)
    for column in ("revision", "size_bytes", *FACT_COLUMNS):
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype(float)
    return frame[list(MANIFEST_COLUMNS)].sort_values("row").reset_index(drop=True)


def published_manifest_keys(store: ObjectStore, source: str | None = None) -> list[str]:
    """Keys of the published batch manifests of one source, or of all sources."""
    return [k for k in store.list(layout.batches_dir(source)) if k.endswith(".parquet")]


def published_batches(store: ObjectStore) -> list[tuple[str, str]]:
    """(source, batch_id) of every published batch."""
    return [layout.batch_of_manifest_key(k) for k in published_manifest_keys(store)]


def held_manifest_keys(store: ObjectStore, source: str | None = None) -> list[str]:
    """Keys of the manifests of quarantined batches (released ones too: the held copy stays)."""
    return [k for k in store.list(layout.quarantine_dir(source)) if layout.batch_of_quarantined_manifest_key(k)]


def read_manifests(store: ObjectStore, keys: list[str]) -> pd.DataFrame:
    """The rows of these manifests; columns added since an older manifest was written are None there."""
    import pandas as pd

    frames = [store.get_parquet(k) for k in keys]
    frame = pd.concat(frames, ignore_index=True) if frames else manifest_frame([])
    missing = {c: None for c in MANIFEST_COLUMNS if c not in frame}
    return frame.assign(**missing) if missing else frame


def all_manifests(store: ObjectStore, source: str | None = None) -> pd.DataFrame:
    """Every batch manifest row (published and quarantined) of one source, or of all sources."""
    return read_manifests(store, published_manifest_keys(store, source) + held_manifest_keys(store, source))


def published_rows(store: ObjectStore) -> pd.DataFrame:
    """Every row of every published (accepted or released) batch."""
    return read_manifests(store, published_manifest_keys(store))


def held_rows(store: ObjectStore) -> pd.DataFrame:
    """Every row of every held (quarantined, released or not) batch."""
    return read_manifests(store, held_manifest_keys(store))


def accepted_rows(store: ObjectStore, source_name: str) -> pd.DataFrame:
    """Accepted rows of a source's published (accepted or released) batches, newest decision per sha."""
    from pipelines.data.decisions import newest_decisions

    frame = newest_decisions(read_manifests(store, published_manifest_keys(store, source_name)))
    return frame[frame["status"] == "accepted"].reset_index(drop=True)


def publish_manifest(store: ObjectStore, source_name: str, batch_id: str, frame: pd.DataFrame) -> str:
    """Publish a validated batch; its rows become visible to snapshots and drift checks."""
    return store.put_parquet(layout.batch_manifest_key(source_name, batch_id), frame)
