"""Dataset snapshots per task, with a stable 80/10/10 split kept in a ledger.

A snapshot is the accepted rows of published batches from ``train``-role sources feeding the task,
one row per sha256 (an image brought by two sources counts once), minus every sha ever seen in a
``holdout`` source. Its version is a hash of the sorted (sha, label, split) triples, so the same data
gives the same version.

The split ledger (``layout.ledger_key``) maps sha → split and only ever grows: an image
keeps its split forever. A new image inherits the split of its nearest near-duplicate (perceptual
hash within ``NEAR_DUPLICATE_BITS``, so a re-encoded or slightly resized copy cannot leak from train
into test), else of its group (patient or source, when the source sets ``group_by``), else a
deterministic hash. Stratification is therefore approximate: per-class shares are reported and
checked against a tolerance, and class imbalance is warned about.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from pipelines.core.errors import LeukopsError
from pipelines.core.taxonomy import get_task
from pipelines.data.imagefacts import FACT_COLUMNS
from pipelines.io import layout

if TYPE_CHECKING:
    import pandas as pd

    from pipelines.core.settings import Settings
    from pipelines.data.sources import Source
    from pipelines.io.storage import ObjectStore

SPLITS = ("train", "val", "test")
SPLIT_SHARES = {"train": 0.8, "val": 0.1, "test": 0.1}
NEAR_DUPLICATE_BITS = 6  # pHash Hamming distance; unrelated smear fields measured ≥ 12 apart
SHARE_TOLERANCE = 0.05
MIN_CLASS_FOR_SHARES = 40  # below this a class's split shares are too noisy to check
IMBALANCE_RATIO = 3.0
LEDGER_COLUMNS = ("sha256", "split", "phash", "label", "group", "source", "assigned_by")
SNAPSHOT_COLUMNS = ("sha256", "key", "label", "split", "source", "phash", "patient_id", *FACT_COLUMNS)


class SnapshotError(LeukopsError):
    pass


@dataclass(frozen=True)
class Snapshot:
    version: str
    frame: pd.DataFrame  # SNAPSHOT_COLUMNS, one row per image
    counts: dict[str, dict[str, int]]  # split → class → n


@dataclass(frozen=True)
class SnapshotResult:
    snapshot: Snapshot
    ledger: pd.DataFrame  # the grown ledger
    shares: dict[str, dict[str, float]]  # class → split → share
    warnings: list[str] = field(default_factory=list)
    excluded_holdout: int = 0
    new_in_ledger: int = 0


# -- pure core ------------------------------------------------------------------------------------------


def hash_split(key: str) -> str:
    """Deterministic 80/10/10 split from a key (a sha or a group name)."""
    bucket = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 100
    return "train" if bucket < 80 else "val" if bucket < 90 else "test"


def phash_ints(hashes) -> np.ndarray:
    return np.array([int(h, 16) if isinstance(h, str) and h else 0 for h in hashes], dtype=np.uint64)


def hamming_to_all(one: np.uint64, many: np.ndarray) -> np.ndarray:
    return np.bitwise_count(np.bitwise_xor(many, one)).astype(np.int64)


def nearest_within(one: np.uint64, many: np.ndarray, max_bits: int) -> int | None:
    """Index of the closest hash at most ``max_bits`` away (first on ties), or None."""
    if many.size == 0:
        return None
    distances = hamming_to_all(one, many)
    best = int(np.argmin(distances))
    return best if distances[best] <= max_bits else None


def training_candidates(rows: pd.DataFrame, classes: tuple[str, ...], holdout_shas: set[str]) -> tuple[Any, int]:
    """Accepted rows with a class of the task, one per sha, minus holdout shas → (frame, n excluded)."""
    rows = rows[rows["label"].isin(classes)].sort_values(["sha256", "source"])
    rows = rows.drop_duplicates("sha256", keep="first")
    in_holdout = rows["sha256"].isin(holdout_shas)
    return rows[~in_holdout].reset_index(drop=True), int(in_holdout.sum())


def assign_splits(candidates: pd.DataFrame, ledger: pd.DataFrame, max_bits: int = NEAR_DUPLICATE_BITS):
    """(candidates with ``split``, grown ledger). Ledger entries never change; new ones are appended."""
    import pandas as pd

    known = dict(zip(ledger["sha256"], ledger["split"], strict=True))
    group_split = dict(zip(ledger["group"], ledger["split"], strict=True))
    group_split.pop(None, None)
    fresh = candidates[~candidates["sha256"].isin(known)].sort_values("sha256")
    hashes = np.concatenate([phash_ints(ledger["phash"]), np.zeros(len(fresh), dtype=np.uint64)])
    filled = len(ledger)
    splits = list(ledger["split"])
    added = []
    for row in fresh.itertuples():
        one = phash_ints([row.phash])[0]
        near = nearest_within(one, hashes[:filled], max_bits) if row.phash else None
        if near is not None:
            split, how = splits[near], "near_duplicate"
        elif row.group and row.group in group_split:
            split, how = group_split[row.group], "group"
        else:
            split, how = hash_split(row.group or row.sha256), "hash"
        if row.group:
            group_split.setdefault(row.group, split)
        hashes[filled] = one
        filled += 1
        splits.append(split)
        known[row.sha256] = split
        added.append(
            {
                "sha256": row.sha256,
                "split": split,
                "phash": row.phash,
                "label": row.label,
                "group": row.group,
                "source": row.source,
                "assigned_by": how,
            }
        )
    grown = pd.concat([ledger, pd.DataFrame(added, columns=list(LEDGER_COLUMNS))], ignore_index=True)
    return candidates.assign(split=candidates["sha256"].map(known)), grown


def split_counts(frame: pd.DataFrame, classes: tuple[str, ...]) -> dict[str, dict[str, int]]:
    return {s: {c: int(((frame["split"] == s) & (frame["label"] == c)).sum()) for c in classes} for s in SPLITS}


def class_shares(counts: dict[str, dict[str, int]], classes: tuple[str, ...]) -> dict[str, dict[str, float]]:
    totals = {c: sum(counts[s][c] for s in SPLITS) for c in classes}
    return {c: {s: (counts[s][c] / totals[c] if totals[c] else 0.0) for s in SPLITS} for c in classes}


def split_warnings(
    counts: dict[str, dict[str, int]], classes: tuple[str, ...], tolerance: float = SHARE_TOLERANCE
) -> list[str]:
    """Per-class split shares off target, classes without a test/val image, and class imbalance."""
    warnings = []
    totals = {c: sum(counts[s][c] for s in SPLITS) for c in classes}
    for c, shares in class_shares(counts, classes).items():
        if totals[c] == 0:
            warnings.append(f"class {c!r} has no images")
            continue
        if totals[c] < MIN_CLASS_FOR_SHARES:
            warnings.append(f"class {c!r} has only {totals[c]} images: split shares are unreliable")
        off = {s: v for s, v in shares.items() if abs(v - SPLIT_SHARES[s]) > tolerance}
        if off and totals[c] >= MIN_CLASS_FOR_SHARES:
            text = ", ".join(f"{s} {v:.0%}" for s, v in off.items())
            warnings.append(f"class {c!r}: split shares {text} are more than {tolerance:.0%} off 80/10/10")
    present = [n for n in totals.values() if n]
    if present and max(present) > IMBALANCE_RATIO * min(present):
        biggest, smallest = max(totals, key=totals.get), min((c for c in totals if totals[c]), key=totals.get)
        warnings.append(
            f"class imbalance: {biggest!r} has {totals[biggest]} images, {smallest!r} {totals[smallest]} "
            f"(ratio above {IMBALANCE_RATIO:g})"
        )
    return warnings


def dataset_version(frame: pd.DataFrame) -> str:
    lines = sorted(f"{r.sha256},{r.label},{r.split}" for r in frame[["sha256", "label", "split"]].itertuples())
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def with_groups(rows: pd.DataFrame, group_by: dict[str, str | None]) -> pd.DataFrame:
    """Add ``group``: ``<source>:<patient_id>`` or ``<source>`` per the source's ``group_by``."""

    def group(row) -> str | None:
        how = group_by.get(row.source)
        if how == "source":
            return str(row.source)
        if how == "patient" and isinstance(row.patient_id, str) and row.patient_id:
            return f"{row.source}:{row.patient_id}"
        return None

    return rows.assign(group=[group(r) for r in rows.itertuples()])


def build_snapshot(
    task: str,
    rows: pd.DataFrame,
    holdout_shas: set[str],
    ledger: pd.DataFrame,
    group_by: dict[str, str | None],
) -> SnapshotResult:
    """The pure snapshot: candidates → splits (ledger) → counts, shares, warnings, version."""
    classes = get_task(task).classes
    candidates, excluded = training_candidates(rows, classes, holdout_shas)
    if candidates.empty:
        raise SnapshotError(f"no accepted images of train-role sources feed task {task!r}; ingest a source first")
    assigned, grown = assign_splits(with_groups(candidates, group_by), ledger)
    frame = assigned[list(SNAPSHOT_COLUMNS)].sort_values("sha256").reset_index(drop=True)
    counts = split_counts(frame, classes)
    warnings = split_warnings(counts, classes)
    if excluded:
        warnings.append(
            f"{excluded} image(s) of training sources were also seen in a holdout source and are excluded from training"
        )
    snapshot = Snapshot(dataset_version(frame), frame, counts)
    return SnapshotResult(snapshot, grown, class_shares(counts, classes), warnings, excluded, len(grown) - len(ledger))


# -- S3 edge -----------------------------------------------------------------------------------------------


def empty_ledger() -> pd.DataFrame:
    import pandas as pd

    return pd.DataFrame({c: pd.Series(dtype=object) for c in LEDGER_COLUMNS})


def load_ledger(store: ObjectStore, task: str) -> pd.DataFrame:
    key = layout.ledger_key(task)
    return store.get_parquet(key) if store.exists(key) else empty_ledger()


def holdout_shas(manifests: pd.DataFrame, holdout_sources: set[str]) -> set[str]:
    """Every sha ever seen (any status, quarantined too) in a holdout source."""
    seen = manifests[(manifests["role"] == "holdout") | manifests["source"].isin(holdout_sources)]
    return set(seen["sha256"].dropna())


def take_snapshot(store: ObjectStore, settings: Settings, task: str) -> SnapshotResult:
    """Build, store and publish the task's snapshot (dataset parquet, summary, ledger, then ``latest``)."""
    import pandas as pd

    from pipelines.data.manifests import accepted_rows, all_manifests
    from pipelines.data.sources import list_sources

    get_task(task)
    sources: list[Source] = list_sources(settings)
    feeding = [s for s in sources if s.role == "train" and task in s.tasks]
    frames = [accepted_rows(store, s.name) for s in feeding]
    rows = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["label", "sha256", "source"])
    holdout = holdout_shas(all_manifests(store), {s.name for s in sources if s.role == "holdout"})
    result = build_snapshot(task, rows, holdout, load_ledger(store, task), {s.name: s.group_by for s in sources})
    _store(store, task, result, [s.name for s in feeding])
    return result


def _store(store: ObjectStore, task: str, result: SnapshotResult, sources: list[str]) -> None:
    version = result.snapshot.version
    dataset_key = layout.dataset_key(task, version)
    if not store.exists(dataset_key):
        store.put_parquet(dataset_key, result.snapshot.frame)
    summary = snapshot_summary(task, result) | {"sources": sources, "uri": store.uri(dataset_key)}
    store.put_json(layout.dataset_summary_key(task, version), summary)
    if result.new_in_ledger:
        store.put_parquet(layout.ledger_key(task), result.ledger)
    pointer = {"version": version, "uri": store.uri(dataset_key)}
    store.put_json(layout.latest_dataset_pointer_key(task), pointer)


def snapshot_summary(task: str, result: SnapshotResult) -> dict[str, Any]:
    return {
        "task": task,
        "dataset_version": result.snapshot.version,
        "counts": result.snapshot.counts,
        "shares": result.shares,
        "warnings": result.warnings,
        "excluded_holdout": result.excluded_holdout,
        "images": len(result.snapshot.frame),
        "new_in_ledger": result.new_in_ledger,
    }


def load_snapshot(store: ObjectStore, task: str, version: str | None = None) -> Snapshot:
    """A stored snapshot of ``task`` (``version=None``: the latest published one)."""
    if version is None:
        pointer = layout.latest_dataset_pointer_key(task)
        if not store.exists(pointer):
            raise SnapshotError(f"no snapshot of task {task!r} yet (run `leukops snapshot --task {task}`)")
        version = store.get_json(pointer)["version"]
    key = layout.dataset_key(task, version)
    if not store.exists(key):
        raise SnapshotError(f"no snapshot {version!r} of task {task!r} at {store.uri(key)}")
    frame = store.get_parquet(key)
    return Snapshot(version, frame, split_counts(frame, get_task(task).classes))
