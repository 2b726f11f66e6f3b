"""The split ledger: sha → split, kept forever within a ledger version, grown one snapshot at a time.

Rows record how each image got its split (``assigned_by``), its group, and the grouping of its source
when it was assigned (``grouping``, ``GroupSpec.spec``). New images are joined into components (same
group, or near-duplicate pHashes within ``NEAR_DUPLICATE_BITS``, transitively); each component gets one
split:

1. a new image of a group the ledger already knows takes that group's split (``group``): groups win
   over per-image inheritance;
2. the rest of the component follows the split most of its evidence has: known groups in it and the
   ledger's near-duplicates of its images (``near_duplicate``), so a re-encoded copy cannot leak;
3. else a component with a group goes to the split furthest below its 80/10/10 share for its class
   (``group_balance``: whole groups cannot follow a hash and still give each class a val/test part),
   and one of ungrouped images to a deterministic hash of its first sha (``hash``). A source with its
   own split shares (recorded in each row's ``grouping``) is placed by those shares, balanced within
   the source (its class counts, not the task's).

Versions: when a source's grouping changes, its rows cannot keep splits drawn under the old groups
(a new group would straddle splits). The snapshot then starts ledger version N+1: the other sources'
rows carried over unchanged, the changed source's images placed again under the new grouping. Rows
of older versions stay in the ledger file for audit; only the newest version assigns splits.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from typing import TYPE_CHECKING, Any

import numpy as np

from pipelines.data.groups import SPLIT_SHARES, SPLITS, shares_of_spec

if TYPE_CHECKING:
    import pandas as pd

    from pipelines.data.groups import GroupSpec

NEAR_DUPLICATE_BITS = 6  # pHash Hamming distance; unrelated smear fields measured ≥ 12 apart
LEDGER_COLUMNS = (
    "sha256",
    "split",
    "phash",
    "label",
    "group",
    "source",
    "assigned_by",
    "grouping",
    "ledger_version",
)
PAIR_CHECK_LIMIT = 400_000_000  # held-out × train hash comparisons (~30k images) before the count is skipped


def hash_split(key: str, shares: dict[str, float] = SPLIT_SHARES) -> str:
    """Deterministic split from a key (a sha or a group name): 80/10/10 unless ``shares`` says otherwise."""
    bucket = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 100  # percent, as splits always were
    train, val = round(100 * shares["train"]), round(100 * (shares["train"] + shares["val"]))
    return "train" if bucket < train else "val" if bucket < val else "test"


def phash_ints(hashes) -> np.ndarray:
    return np.array([int(h, 16) if isinstance(h, str) and h else 0 for h in hashes], dtype=np.uint64)


def hamming_to_all(one: np.uint64, many: np.ndarray) -> np.ndarray:
    return np.bitwise_count(np.bitwise_xor(many, one)).astype(np.int64)


def empty_ledger() -> pd.DataFrame:
    import pandas as pd

    return pd.DataFrame({c: pd.Series(dtype=object) for c in LEDGER_COLUMNS})


def upgraded(ledger: pd.DataFrame) -> pd.DataFrame:
    """A ledger written before versions and groupings were recorded: version 1, grouping unknown."""
    for column in LEDGER_COLUMNS:
        if column not in ledger:
            ledger = ledger.assign(**{column: None})
    versions = ledger["ledger_version"].where(ledger["ledger_version"].notna(), 1).astype(int)
    return ledger.assign(ledger_version=versions)[list(LEDGER_COLUMNS)]


def current_version(ledger: pd.DataFrame) -> int:
    return int(ledger["ledger_version"].max()) if len(ledger) else 1


def active_rows(ledger: pd.DataFrame) -> pd.DataFrame:
    """The rows of the newest ledger version: the ones that assign splits."""
    return ledger[ledger["ledger_version"] == current_version(ledger)] if len(ledger) else ledger


def adopt_groupings(active: pd.DataFrame, groupings: dict[str, GroupSpec]) -> pd.DataFrame:
    """Rows with no recorded grouping (older ledgers) take their source's current one."""
    current = active["source"].map(lambda s: groupings[s].spec if s in groupings else None)
    return active.assign(grouping=active["grouping"].where(active["grouping"].notna(), current))


def regrouped_sources(active: pd.DataFrame, groupings: dict[str, GroupSpec]) -> list[str]:
    """Sources whose rows were assigned under a grouping other than their current one."""
    recorded = active[active["grouping"].notna() & active["source"].isin(groupings)]
    changed = recorded["grouping"] != recorded["source"].map(lambda s: groupings[s].spec)
    return sorted(set(recorded.loc[changed, "source"]))


def version_changes(ledger: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """Source → {from, to} grouping for the sources whose regrouping started the newest version."""
    version = current_version(ledger)
    if version == 1:
        return {}
    before = ledger[ledger["ledger_version"] == version - 1].groupby("source")["grouping"].first()
    after = ledger[ledger["ledger_version"] == version].groupby("source")["grouping"].first()
    return {s: {"from": before[s], "to": after[s]} for s in after.index if s in before and before[s] != after[s]}


def assign_splits(
    candidates: pd.DataFrame,
    ledger: pd.DataFrame,
    max_bits: int = NEAR_DUPLICATE_BITS,
    version: int | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(candidates with ``split``, grown ledger). ``ledger`` is one version (numbered ``version``, default
    its own); its rows never change, new rows are appended."""
    import pandas as pd

    ledger = upgraded(ledger)
    known = dict(zip(ledger["sha256"], ledger["split"], strict=True))
    fresh = candidates[~candidates["sha256"].isin(known)].sort_values("sha256").reset_index(drop=True)
    rows = list(fresh.itertuples(index=False))
    hashes, valid = phash_ints(fresh["phash"]), fresh["phash"].map(_is_hash).to_numpy(bool)
    inherited = ledger_near_splits(hashes, valid, ledger, max_bits)
    growth = LedgerGrowth(ledger, version or current_version(ledger))
    for component in placement_components(rows, hashes, valid, max_bits):
        growth.place([rows[i] for i in component], [inherited[i] for i in component])
    added = pd.DataFrame(growth.added, columns=list(LEDGER_COLUMNS))
    grown = pd.concat([ledger, added], ignore_index=True) if len(added) else ledger
    known.update(zip(added["sha256"], added["split"], strict=True))
    return candidates.assign(split=candidates["sha256"].map(known)), grown


def _is_hash(value: Any) -> bool:
    return isinstance(value, str) and bool(value)


def _distances(a: np.ndarray, b: np.ndarray):
    """Chunks of (rows of ``a``, Hamming distances to every hash of ``b``), 256 rows of ``a`` at a time."""
    for start in range(0, a.size, 256):
        yield start, np.bitwise_count(np.bitwise_xor(a[start : start + 256, None], b[None, :]))


def ledger_near_splits(hashes: np.ndarray, valid: np.ndarray, ledger: pd.DataFrame, max_bits: int) -> list:
    """Per new image: the split of its nearest ledger image within ``max_bits`` (first on ties), or None."""
    usable = ledger["phash"].map(_is_hash).to_numpy(bool)
    pool, pool_splits = phash_ints(ledger.loc[usable, "phash"]), list(ledger.loc[usable, "split"])
    found: list[str | None] = [None] * hashes.size
    if pool.size == 0:
        return found
    for start, distances in _distances(hashes, pool):
        best = distances.argmin(axis=1)
        for offset, column in enumerate(best):
            i = start + offset
            if valid[i] and distances[offset, column] <= max_bits:
                found[i] = pool_splits[column]
    return found


def placement_components(rows: list[Any], hashes: np.ndarray, valid: np.ndarray, max_bits: int) -> list[list[int]]:
    """New images that must share a split: joined by group and by near-duplicate pHash (union-find).

    Largest first, ties in a hash order of their first member's group (or sha), so placement is stable.
    """
    parent = list(range(len(rows)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_of_group: dict[str, int] = {}
    for i, row in enumerate(rows):
        group = group_of(row)
        if group is not None:
            parent[root(i)] = root(first_of_group.setdefault(group, i))
    for start, distances in _distances(hashes, hashes):
        for offset, j in zip(*np.nonzero(distances <= max_bits), strict=True):
            i = start + int(offset)
            if i < j and valid[i] and valid[j]:
                parent[root(i)] = root(int(j))
    members: dict[int, list[int]] = {}
    for i in range(len(rows)):
        members.setdefault(root(i), []).append(i)

    def order(component: list[int]) -> tuple[int, str]:
        first = rows[component[0]]
        name = group_of(first) or first.sha256
        return -len(component), hashlib.sha256(name.encode()).hexdigest()

    return sorted(members.values(), key=order)


def _shares(row: Any) -> dict[str, float]:
    return shares_of_spec(getattr(row, "grouping", None))


def group_of(row: Any) -> str | None:
    group = getattr(row, "group", None)
    return group if isinstance(group, str) and group else None


class LedgerGrowth:
    """The ledger being grown: its group splits and per-class split counts, and the rows added."""

    def __init__(self, ledger: pd.DataFrame, version: int) -> None:
        self.version = version
        self.group_split: dict[str, str] = {}
        for group, split in zip(ledger["group"], ledger["split"], strict=True):
            if isinstance(group, str) and group:
                self.group_split.setdefault(group, split)
        self.counts: dict[Any, Counter] = {}  # label → split counts, and (source, label) → split counts
        for label, source, split in zip(ledger["label"], ledger["source"], ledger["split"], strict=True):
            self.counts.setdefault(label, Counter())[split] += 1
            self.counts.setdefault((source, label), Counter())[split] += 1
        self.added: list[dict[str, Any]] = []

    def place(self, component: list[Any], inherited: list[str | None]) -> None:
        """One split for the component; images of groups the ledger knows keep their group's split."""
        known = [self.group_split[g] for r in component if (g := group_of(r)) in self.group_split]
        evidence = Counter(known + [s for s in inherited if s])
        if evidence:
            split, how = evidence.most_common(1)[0][0], "near_duplicate"
        elif any(group_of(r) for r in component):
            split, how = self.balanced_split(component), "group_balance"
        else:
            split, how = hash_split(component[0].sha256, _shares(component[0])), "hash"
        for row in component:
            group = group_of(row)
            if group in self.group_split:
                self.add(row, self.group_split[group], "group")
            else:
                self.add(row, split, how)
        for row in component:
            if (group := group_of(row)) is not None:
                self.group_split.setdefault(group, split)

    def balanced_split(self, component: list[Any]) -> str:
        """The split furthest below its share for the component's (most common) class, train on ties; a
        source with its own shares is balanced against its own images of that class."""
        label = Counter(row.label for row in component).most_common(1)[0][0]
        shares = _shares(component[0])
        key = label if shares == SPLIT_SHARES else (component[0].source, label)
        counts = self.counts.get(key, Counter())
        total = sum(counts.values()) + len(component)
        return max(SPLITS, key=lambda s: shares[s] * total - counts[s])

    def add(self, row: Any, split: str, how: str) -> None:
        self.counts.setdefault(row.label, Counter())[split] += 1
        self.counts.setdefault((row.source, row.label), Counter())[split] += 1
        self.added.append(
            {
                "sha256": row.sha256,
                "split": split,
                "phash": row.phash,
                "label": row.label,
                "group": group_of(row),
                "source": row.source,
                "assigned_by": how,
                "grouping": getattr(row, "grouping", None),
                "ledger_version": self.version,
            }
        )


def near_duplicates_across_splits(frame: pd.DataFrame, max_bits: int = NEAR_DUPLICATE_BITS) -> int | None:
    """Pairs of images in different splits whose pHashes are within ``max_bits`` (None: too many to check)."""
    valid = frame[frame["phash"].map(lambda h: isinstance(h, str) and bool(h))]
    by_split = {s: phash_ints(valid.loc[valid["split"] == s, "phash"]) for s in SPLITS}
    pairs = [("train", "val"), ("train", "test"), ("val", "test")]
    if sum(by_split[a].size * by_split[b].size for a, b in pairs) > PAIR_CHECK_LIMIT:
        return None
    total = 0
    for a, b in pairs:
        for start in range(0, by_split[b].size, 512):
            chunk = by_split[b][start : start + 512]
            distances = np.bitwise_count(np.bitwise_xor(chunk[:, None], by_split[a][None, :]))
            total += int((distances <= max_bits).sum())
    return total
