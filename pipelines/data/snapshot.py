"""Dataset snapshots per task, with a stable 80/10/10 split kept in a ledger (``pipelines.data.ledger``).

A snapshot is the newest decision per image (``decisions``: a relabel replaces what it relabels) of
published batches from ``train``-role sources feeding the task, accepted, one row per sha256 (an image
brought by two sources counts once), minus images with an unresolved label conflict (``conflicts``),
every sha ever seen in a ``holdout`` source and the near-duplicates (pHash within the ledger's
``NEAR_DUPLICATE_BITS``) of those. Its version is a hash of the sorted (sha, label, split) triples, so
the same data gives the same version; ``batch_id`` and ``resolution`` say where each label came from.

Each image gets the group its source's grouping gives it (``pipelines.data.groups``: patient, source
or a pattern over the file path); a group never straddles splits. The ledger keeps an image's split
forever within a ledger version; a changed grouping starts a new version (see ``ledger``), and the
first snapshot on a new version says the champion must be re-evaluated. Stratification is
approximate: per-class shares, the number of groups per split and the largest group's share are
reported, shares are checked against a tolerance, and class imbalance is warned about.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from pipelines.core.errors import LeukopsError
from pipelines.core.taxonomy import get_task
from pipelines.data.groups import GroupSpec
from pipelines.data.imagefacts import FACT_COLUMNS
from pipelines.data.ledger import (
    NEAR_DUPLICATE_BITS,
    SPLIT_SHARES,
    SPLITS,
    active_rows,
    adopt_groupings,
    assign_splits,
    current_version,
    near_duplicates_across_splits,
    phash_ints,
    regrouped_sources,
    upgraded,
    version_changes,
)
from pipelines.data.ledger import (
    hash_split as hash_split,  # re-exported: benchmarks/train.py imports it from here
)
from pipelines.data.ledger_store import LedgerHead, commit_ledger, publish_pointer, read_ledger, with_ledger
from pipelines.io import layout

if TYPE_CHECKING:
    import pandas as pd

    from pipelines.core.settings import Settings
    from pipelines.data.sources import Source
    from pipelines.io.storage import ObjectStore

SHARE_TOLERANCE = 0.05
MIN_CLASS_FOR_SHARES = 40  # below this a class's split shares are too noisy to check
IMBALANCE_RATIO = 3.0
SNAPSHOT_COLUMNS = (
    *("sha256", "key", "label", "split", "source", "phash", "patient_id", "group", *FACT_COLUMNS),
    *("batch_id", "resolution"),  # the batch whose decision gave the label; a conflict resolution's id
)


class SnapshotError(LeukopsError):
    pass


@dataclass(frozen=True)
class Snapshot:
    version: str
    frame: pd.DataFrame  # SNAPSHOT_COLUMNS, one row per image (``group`` None: split on its own)
    counts: dict[str, dict[str, int]]  # split → class → n


@dataclass(frozen=True)
class SnapshotResult:
    snapshot: Snapshot
    ledger: pd.DataFrame  # the whole ledger: every version's rows, the newest version grown
    shares: dict[str, dict[str, float]]  # class → split → share
    warnings: list[str] = field(default_factory=list)
    excluded_holdout: int = 0
    excluded_holdout_near_duplicates: int = 0  # re-encoded copies of holdout images (pHash within the threshold)
    labels: dict[str, Any] = field(default_factory=dict)  # conflicts.label_audit(): relabels, held, resolved
    new_in_ledger: int = 0  # rows this snapshot adds to the ledger (a new version: all of its rows)
    ledger_changed: bool = False  # rows added, or groupings recorded on older rows: the ledger is rewritten
    groups: dict[str, Any] = field(default_factory=dict)  # group_summary()
    ledger_version: int = 1
    regrouped: dict[str, dict[str, Any]] = field(default_factory=dict)  # source → {from, to} grouping
    champion_reevaluation_required: bool = False  # set by take_snapshot: first snapshot of a new version


# -- pure core ------------------------------------------------------------------------------------------


def training_candidates(rows: pd.DataFrame, classes: tuple[str, ...], holdout_shas: set[str]) -> tuple[Any, int]:
    """Accepted rows with a class of the task, one per sha, minus holdout shas → (frame, n excluded)."""
    rows = rows[rows["label"].isin(classes)].sort_values(["sha256", "source"])
    rows = rows.drop_duplicates("sha256", keep="first")
    in_holdout = rows["sha256"].isin(holdout_shas)
    return rows[~in_holdout].reset_index(drop=True), int(in_holdout.sum())


def near_holdout(rows: pd.DataFrame, holdout_phashes: list[str], max_bits: int = NEAR_DUPLICATE_BITS):
    """Per row: is its pHash within ``max_bits`` of a holdout image's (a re-encoded copy of it)?"""
    import numpy as np

    near = np.zeros(len(rows), dtype=bool)
    pool = phash_ints([h for h in holdout_phashes if isinstance(h, str) and h])
    if pool.size == 0 or rows.empty:
        return near
    valid = rows["phash"].map(lambda h: isinstance(h, str) and bool(h)).to_numpy(bool)
    hashes = phash_ints(rows["phash"])
    for start in range(0, hashes.size, 256):
        chunk = hashes[start : start + 256]
        distances = np.bitwise_count(np.bitwise_xor(chunk[:, None], pool[None, :]))
        near[start : start + chunk.size] = (distances <= max_bits).any(axis=1)
    return near & valid


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


def with_groups(rows: pd.DataFrame, groupings: dict[str, GroupSpec]) -> pd.DataFrame:
    """Add ``group`` (``<source>:<key>`` or None) and ``grouping`` (the source's spec) to each row."""
    none = GroupSpec()

    def text(row, column: str) -> str | None:
        value = getattr(row, column, None)
        return value if isinstance(value, str) and value else None

    specs = [groupings.get(r.source, none) for r in rows.itertuples()]
    groups = [
        spec.key(str(r.source), text(r, "path"), text(r, "patient_id"))
        for spec, r in zip(specs, rows.itertuples(), strict=True)
    ]
    return rows.assign(group=groups, grouping=[spec.spec for spec in specs])


def group_summary(frame: pd.DataFrame) -> dict[str, Any]:
    """Groups of a snapshot (an ungrouped image counts as a group of one): number, largest, per split."""
    units = frame["group"].where(frame["group"].notna(), frame["sha256"])
    sizes = units.value_counts()
    named = frame["group"].dropna().value_counts()
    largest = int(sizes.iloc[0]) if len(sizes) else 0
    return {
        "n_groups": int(len(sizes)),
        "grouped_images": int(frame["group"].notna().sum()),
        "largest_group": str(named.index[0]) if len(named) and named.iloc[0] == largest else None,
        "largest_group_share": round(largest / len(frame), 4) if len(frame) else 0.0,
        "groups_per_split": {s: int(units[frame["split"] == s].nunique()) for s in SPLITS},
        "groups_straddling_splits": int((frame.assign(unit=units).groupby("unit")["split"].nunique() > 1).sum()),
        "near_duplicate_pairs_across_splits": near_duplicates_across_splits(frame),
    }


def group_warnings(candidates: pd.DataFrame, groupings: dict[str, GroupSpec], groups: dict[str, Any]) -> list[str]:
    warnings = []
    for source, rows in candidates.groupby("source"):
        spec = groupings.get(source)
        missing = rows[rows["group"].isna()]
        if spec is not None and spec.by is not None and len(missing):
            example = missing["path"].iloc[0] if "path" in missing else missing["sha256"].iloc[0]
            warnings.append(
                f"{len(missing)} image(s) of source {source!r} have no group under group_by {spec.by!r} "
                f"(e.g. {example!r}): each is split on its own"
            )
    if groups["groups_straddling_splits"]:
        warnings.append(
            f"{groups['groups_straddling_splits']} group(s) straddle splits (ledger rows assigned before the "
            "group existed); change the source's grouping to start a new ledger version"
        )
    if groups["near_duplicate_pairs_across_splits"]:
        warnings.append(
            f"{groups['near_duplicate_pairs_across_splits']} near-duplicate image pair(s) lie in different splits"
        )
    return warnings


def ledger_for(ledger: pd.DataFrame, groupings: dict[str, GroupSpec]) -> tuple[pd.DataFrame, pd.DataFrame, int]:
    """(rows kept as they are, the version to grow, its number): a new version when a grouping changed.

    The new version carries the other sources' rows unchanged and drops the regrouped sources' rows,
    so their images are placed again under the new grouping; the old version's rows stay for audit.
    """
    import pandas as pd

    ledger = upgraded(ledger)
    version = current_version(ledger)
    older = ledger[ledger["ledger_version"] < version]
    active = adopt_groupings(active_rows(ledger), groupings)
    regrouped = regrouped_sources(active, groupings)
    if not regrouped:
        return older, active, version
    carried = active[~active["source"].isin(regrouped)].assign(ledger_version=version + 1)
    return pd.concat([older, active], ignore_index=True), carried, version + 1


def build_snapshot(
    task: str,
    rows: pd.DataFrame,
    holdout_shas: set[str],
    ledger: pd.DataFrame,
    groupings: dict[str, GroupSpec],
    *,
    holdout_phashes: list[str] = (),
    labels: dict[str, Any] | None = None,
) -> SnapshotResult:
    """The pure snapshot: candidates → groups → splits (ledger version) → counts, shares, warnings, version.

    ``rows``: the label decisions to use (``conflicts.label_decisions``); ``labels``: their audit."""
    import pandas as pd

    classes = get_task(task).classes
    rows = rows.assign(**{c: None for c in ("batch_id", "resolution") if c not in rows})
    candidates, excluded = training_candidates(rows, classes, holdout_shas)
    near = near_holdout(candidates, list(holdout_phashes))
    candidates = candidates[~near].reset_index(drop=True)
    if candidates.empty:
        raise SnapshotError(f"no accepted images of train-role sources feed task {task!r}; ingest a source first")
    candidates = with_groups(candidates, groupings)
    kept, growing, version = ledger_for(ledger, groupings)
    assigned, grown = assign_splits(candidates, growing, version=version)
    whole = pd.concat([kept, grown], ignore_index=True)
    frame = assigned[list(SNAPSHOT_COLUMNS)].sort_values("sha256").reset_index(drop=True)
    counts = split_counts(frame, classes)
    groups = group_summary(frame)
    warnings = split_warnings(counts, classes) + group_warnings(candidates, groupings, groups)
    if excluded:
        warnings.append(
            f"{excluded} image(s) of training sources were also seen in a holdout source and are excluded from training"
        )
    if near.any():
        warnings.append(
            f"{int(near.sum())} image(s) of training sources are near-duplicates of holdout images (pHash within "
            f"{NEAR_DUPLICATE_BITS} bits) and are excluded from training"
        )
    if labels and labels.get("conflicts_held"):
        warnings.append(
            f"{labels['conflicts_held']} image(s) with an unresolved label conflict are held out "
            "(`leukops conflict list`)"
        )
    return SnapshotResult(
        Snapshot(dataset_version(frame), frame, counts),
        whole,
        class_shares(counts, classes),
        warnings,
        excluded,
        excluded_holdout_near_duplicates=int(near.sum()),
        labels=labels or {},
        new_in_ledger=len(whole) - len(upgraded(ledger)),
        ledger_changed=not whole.reset_index(drop=True).equals(upgraded(ledger).reset_index(drop=True)),
        groups=groups,
        ledger_version=version,
        regrouped=version_changes(whole),
    )


# -- S3 edge -----------------------------------------------------------------------------------------------


def load_ledger(store: ObjectStore, task: str) -> pd.DataFrame:
    return read_ledger(store, task).frame


def holdout_rows(manifests: pd.DataFrame, holdout_sources: set[str]) -> pd.DataFrame:
    """Every row (any status, quarantined too) of a holdout source."""
    return manifests[(manifests["role"] == "holdout") | manifests["source"].isin(holdout_sources)]


def holdout_shas(manifests: pd.DataFrame, holdout_sources: set[str]) -> set[str]:
    """Every sha ever seen (any status, quarantined too) in a holdout source."""
    return set(holdout_rows(manifests, holdout_sources)["sha256"].dropna())


def take_snapshot(store: ObjectStore, settings: Settings, task: str) -> SnapshotResult:
    """Build, store and publish the task's snapshot (ledger, dataset parquet, summary, then ``latest``);
    redone from a fresh read when a concurrent snapshot commits the ledger first (``ledger_store``)."""
    return with_ledger(store, task, lambda head: _take_snapshot(store, settings, task, head))


def _take_snapshot(store: ObjectStore, settings: Settings, task: str, head: LedgerHead) -> SnapshotResult:
    import pandas as pd

    from pipelines.data.conflicts import conflict_status, label_decisions, load_resolutions
    from pipelines.data.decisions import newest_decisions
    from pipelines.data.manifests import held_rows, published_rows
    from pipelines.data.sources import list_sources

    get_task(task)
    sources: list[Source] = list_sources(settings)
    feeding = [s.name for s in sources if s.role == "train" and task in s.tasks]
    published = published_rows(store)
    every = pd.concat([published, held_rows(store)], ignore_index=True)
    decided = newest_decisions(published[published["source"].isin(feeding)])
    rows, labels = label_decisions(decided, conflict_status(every, load_resolutions(store)))
    holdout = holdout_rows(every, {s.name for s in sources if s.role == "holdout"})
    result = build_snapshot(
        task,
        rows,
        set(holdout["sha256"].dropna()),
        head.frame,
        {s.name: s.grouping for s in sources},
        holdout_phashes=list(holdout["phash"]),
        labels=labels,
    )
    result = replace(result, champion_reevaluation_required=_new_ledger_version(store, task, result))
    _store(store, task, result, feeding, head)
    return result


def _new_ledger_version(store: ObjectStore, task: str, result: SnapshotResult) -> bool:
    """True on the first snapshot of a new ledger version (and on its reruns: the stored summary keeps it)."""
    summary_key = layout.dataset_summary_key(task, result.snapshot.version)
    if store.exists(summary_key) and store.get_json(summary_key).get("champion_reevaluation_required"):
        return True
    pointer_key = layout.latest_dataset_pointer_key(task)
    if not store.exists(pointer_key):
        return False
    return store.get_json(pointer_key).get("ledger_version", 1) != result.ledger_version


def _store(store: ObjectStore, task: str, result: SnapshotResult, sources: list[str], head: LedgerHead) -> None:
    if result.ledger_changed:  # first: a lost race must not leave a dataset built on a stale ledger
        head = commit_ledger(store, task, head, result.ledger)
    version = result.snapshot.version
    dataset_key = layout.dataset_key(task, version)
    if not store.exists(dataset_key):
        store.put_parquet(dataset_key, result.snapshot.frame)
    summary = snapshot_summary(task, result) | {"sources": sources, "uri": store.uri(dataset_key)}
    store.put_json(layout.dataset_summary_key(task, version), summary)
    pointer = {"version": version, "uri": store.uri(dataset_key), "ledger_version": result.ledger_version}
    publish_pointer(store, task, pointer | {"ledger_generation": head.generation})


def snapshot_summary(task: str, result: SnapshotResult) -> dict[str, Any]:
    return {
        "task": task,
        "dataset_version": result.snapshot.version,
        "counts": result.snapshot.counts,
        "shares": result.shares,
        "warnings": result.warnings,
        "excluded_holdout": result.excluded_holdout,
        "excluded_holdout_near_duplicates": result.excluded_holdout_near_duplicates,
        "labels": result.labels,
        "images": len(result.snapshot.frame),
        "new_in_ledger": result.new_in_ledger,
        **result.groups,
        "ledger_version": result.ledger_version,
        "regrouped_sources": result.regrouped,
        "champion_reevaluation_required": result.champion_reevaluation_required,
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
