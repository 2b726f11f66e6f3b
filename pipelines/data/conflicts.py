"""Label conflicts: images whose bytes came under two labels, held out of snapshots until resolved.

A conflict is a manifest row (published or held) with ``label_conflict`` set: the same bytes under two
labels in one batch (every such row), or a label another source decided otherwise. Neither label wins:
every snapshot leaves the image out until a person resolves it (``leukops conflict resolve SHA --label
X --reason ...``). A resolution is an audit record (who, when, why, which label) under
``layout.conflict_resolution_key``; it covers the conflict rows it saw, so a later conflict on the same
bytes holds the image out again. A resolved image enters snapshots with the resolved label, from its
accepted rows or from conflict rows whose only failure was the conflict.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

from pipelines.core.errors import LeukopsError
from pipelines.data.decisions import newest_decisions
from pipelines.io import layout

if TYPE_CHECKING:
    import pandas as pd

    from pipelines.core.settings import Settings
    from pipelines.io.storage import ObjectStore

AUDIT_LIST_LIMIT = 100  # entries of each audit list a snapshot summary names (the counts are complete)


class ConflictError(LeukopsError):
    pass


def row_id(source: str, batch_id: str, row: Any) -> str:
    return f"{source}/{batch_id}/{int(row)}"


def conflict_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """Rows with a label conflict, once each (a released batch has a held and a published copy)."""
    # a bool mask, even when ``rows`` is empty (an empty object Series would select columns, not rows)
    found = rows.loc[rows["label_conflict"].map(lambda v: isinstance(v, str) and bool(v)).astype(bool)]
    return found.drop_duplicates(["source", "batch_id", "row"])


def conflict_status(rows: pd.DataFrame, resolutions: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """sha → {sha256, rows: [{source, batch_id, row, path, label, detail}], resolved, label, resolution}."""
    status: dict[str, dict[str, Any]] = {}
    for sha, found in conflict_rows(rows).groupby("sha256"):
        seen = [
            {"source": r.source, "batch_id": r.batch_id, "row": int(r.row), "path": r.path, "label": r.label}
            | {"detail": r.label_conflict}
            for r in found.itertuples()
        ]
        done = sorted(resolutions.get(sha, []), key=lambda r: r["resolution_id"])
        covered = {rid for r in done for rid in r["resolves"]}
        resolved = all(row_id(s["source"], s["batch_id"], s["row"]) in covered for s in seen)
        newest = done[-1] if resolved and done else None
        status[sha] = {
            "sha256": sha,
            "rows": seen,
            "resolved": resolved,
            "label": newest["label"] if newest else None,
            "resolution": newest["resolution_id"] if newest else None,
        }
    return status


def _only_conflict(frame: pd.DataFrame):
    """Rows rejected for the label conflict and nothing else (``detail`` holds every failure)."""
    return (frame["reason"] == "label_conflict") & (frame["detail"] == frame["label_conflict"])


def label_decisions(decided: pd.DataFrame, status: dict[str, dict[str, Any]]) -> tuple[pd.DataFrame, dict[str, Any]]:
    """(the rows a snapshot may use, the audit of how their labels were decided) from newest decisions.

    Accepted rows, minus images with an unresolved conflict; a resolved image's rows (accepted, or
    rejected only for the conflict) carry the resolved label and the resolution's id.
    """
    conflicted = decided["sha256"].map(lambda s: s in status)
    resolved = decided["sha256"].map(lambda s: s in status and status[s]["resolved"])
    usable = (decided["status"] == "accepted") | (resolved & _only_conflict(decided))
    rows = decided[usable & (resolved | ~conflicted)].copy()
    fixed = rows["sha256"].map(lambda s: status[s] if s in status else None)
    rows["label"] = [f["label"] if f else label for f, label in zip(fixed, rows["label"], strict=True)]
    rows["resolution"] = [f["resolution"] if f else None for f in fixed]
    held = sorted(set(decided.loc[conflicted & ~resolved, "sha256"]))
    return rows.reset_index(drop=True), label_audit(rows, held)


def label_audit(rows: pd.DataFrame, held: list[str]) -> dict[str, Any]:
    relabelled = rows[rows["relabel_of"].notna() & (rows["previous_label"] != rows["label"])]
    relabelled = relabelled[relabelled["resolution"].isna()].drop_duplicates("sha256")
    resolved = rows[rows["resolution"].notna()].drop_duplicates("sha256")
    return {
        "relabelled": len(relabelled),
        "relabels": [
            {"sha256": r.sha256, "source": r.source, "from": r.previous_label, "to": r.label, "batch_id": r.batch_id}
            for r in relabelled.head(AUDIT_LIST_LIMIT).itertuples()
        ],
        "conflicts_held": len(held),
        "held_shas": held[:AUDIT_LIST_LIMIT],
        "conflicts_resolved": len(resolved),
        "resolutions": [
            {"sha256": r.sha256, "label": r.label, "resolution": r.resolution}
            for r in resolved.head(AUDIT_LIST_LIMIT).itertuples()
        ],
    }


def make_resolution(
    sha: str, label: str, reason: str, *, actor: str, at: str, status: dict[str, Any], classes: set[str]
) -> dict[str, Any]:
    """The audit record of one resolution; ``at`` is an ISO UTC time (its digits order resolutions)."""
    if not reason.strip():
        raise ConflictError("a resolution needs a --reason (it is kept in the audit trail)")
    if label not in classes:
        raise ConflictError(f"label {label!r} is not a class of the sources of image {sha}: {sorted(classes)}")
    stamp = "".join(ch for ch in at if ch.isdigit())
    digest = hashlib.sha256(f"{sha}\n{label}\n{reason}\n{actor}\n{at}".encode()).hexdigest()[:8]
    return {
        "resolution_id": f"{stamp}-{digest}",
        "sha256": sha,
        "label": label,
        "reason": reason,
        "resolved_by": actor,
        "resolved_at": at,
        "labels_seen": sorted({r["label"] for r in status["rows"] if r["label"]}),
        "resolves": [row_id(r["source"], r["batch_id"], r["row"]) for r in status["rows"]],
    }


# -- S3 edge -----------------------------------------------------------------------------------------------


def load_resolutions(store: ObjectStore) -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = {}
    for key in store.list(layout.conflict_resolutions_dir()):
        record = store.get_json(key)
        found.setdefault(record["sha256"], []).append(record)
    return found


def _every_row(store: ObjectStore) -> pd.DataFrame:
    import pandas as pd

    from pipelines.data.manifests import held_rows, published_rows

    return pd.concat([published_rows(store), held_rows(store)], ignore_index=True)


def list_conflicts(store: ObjectStore) -> list[dict[str, Any]]:
    """Every image with a label conflict, unresolved first."""
    status = conflict_status(_every_row(store), load_resolutions(store))
    return sorted(status.values(), key=lambda s: (s["resolved"], s["sha256"]))


def resolve_conflict(
    store: ObjectStore, settings: Settings, sha: str, label: str, reason: str, *, actor: str, at: str
) -> dict[str, Any]:
    """Record who resolved the conflict on ``sha`` to ``label``, when and why; snapshots then use it."""
    from pipelines.data.sources import list_sources

    rows = _every_row(store)
    status = conflict_status(rows, load_resolutions(store)).get(sha)
    if status is None:
        raise ConflictError(f"image {sha} has no label conflict (see `leukops conflict list`)")
    sources = set(newest_decisions(rows[rows["sha256"] == sha])["source"])
    classes = {c for s in list_sources(settings) if s.name in sources for c in s.canonical_classes}
    record = make_resolution(sha, label, reason, actor=actor, at=at, status=status, classes=classes)
    record["uri"] = store.put_json(layout.conflict_resolution_key(sha, record["resolution_id"]), record)
    return record
