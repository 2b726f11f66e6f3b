"""Label decisions: what a source already decided about its files, and the newest decision per image.

A manifest row with a sha256 and no read error is a *decision*: these bytes, under this label and
label-map version, were judged (accepted or rejected). Its key is (sha, label, label-map version).
A file counts as ingested when its key is one of the keys of the newest decision on its sha; any
other key (a file moved to another class folder, a corrected label map) makes the file part of a new
batch as a *relabel* row, one ``revision`` above the decision it replaces. Old manifests stay as
they were: the newest published revision of an image in a source is the one that counts.

A row without a sha (path refused, file unreadable) is a *failure*, keyed by (path, error): it is
recorded once and not re-added to every later batch; the file is still read on every ingest, so a
transient read error is retried and the file is ingested once it reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipelines.data.imagefacts import FACT_COLUMNS

if TYPE_CHECKING:
    import pandas as pd

EXAMINED_COLUMNS = ("format", "phash", "size_bytes", "decode_error", "decode_detail", *FACT_COLUMNS)


def decision_key(sha: str, label: str | None, label_map_version: str | None) -> str:
    return f"{sha}\t{label or ''}\t{label_map_version or ''}"


def failure_key(path: str, error: str | None) -> str:
    return f"!\t{path}\t{error or ''}"


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def decision_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """The rows that are decisions: a sha, and bytes that were read (a failed re-read is retried)."""
    if rows.empty:
        return rows
    read = rows["read_error"].map(_text).isna() if "read_error" in rows else True
    return rows[rows["sha256"].map(_text).notna() & read]


def revisions(rows: pd.DataFrame):
    """Each row's revision (manifests written before relabelling existed: 0)."""
    import pandas as pd

    if "revision" not in rows:
        return pd.Series(0.0, index=rows.index)
    return pd.to_numeric(rows["revision"], errors="coerce").fillna(0.0)


def newest_decisions(rows: pd.DataFrame) -> pd.DataFrame:
    """Per (source, sha): the rows of its highest revision (ties: every row of that revision)."""
    decided = decision_rows(rows)
    if decided.empty:
        return decided
    revision = revisions(decided)
    top = revision.groupby([decided["source"], decided["sha256"]]).transform("max")
    return decided[revision == top]


@dataclass(frozen=True)
class SourceHistory:
    """What the manifests of one source (published and held) say about its files."""

    current: dict[str, frozenset[str]]  # sha → decision keys of its newest revision
    newest: dict[str, dict[str, Any]]  # sha → {revision, batch_id, labels, examined facts} of that revision
    failures: frozenset[str]  # failure keys already recorded

    def is_known(self, key: str, sha: str) -> bool:
        return key in self.current.get(sha, ())

    def replaced(self, sha: str) -> dict[str, Any]:
        """The manifest fields of a new decision on ``sha``: its revision and the decision it replaces."""
        before = self.newest.get(sha)
        if before is None:
            return {"revision": 1, "relabel_of": None, "previous_label": None}
        previous = " / ".join(sorted(before["labels"])) or None
        return {"revision": before["revision"] + 1, "relabel_of": before["batch_id"], "previous_label": previous}

    def examined(self) -> set[str]:
        """Shas whose facts are known: the scan only hashes them (facts come from the newest row)."""
        return set(self.newest)


def source_history(rows: pd.DataFrame) -> SourceHistory:
    newest = newest_decisions(rows)
    current: dict[str, set[str]] = {}
    latest: dict[str, dict[str, Any]] = {}
    for row, revision in zip(newest.to_dict("records"), revisions(newest), strict=True):
        sha, label = row["sha256"], _text(row.get("label"))
        current.setdefault(sha, set()).add(decision_key(sha, label, row.get("label_map_version")))
        entry = latest.setdefault(
            sha,
            {
                "revision": int(revision),
                "batch_id": row["batch_id"],
                "labels": set(),
                "examined": {c: row.get(c) for c in EXAMINED_COLUMNS},
            },
        )
        entry["labels"] |= {label} if label else set()
    return SourceHistory({s: frozenset(k) for s, k in current.items()}, latest, frozenset(_failures(rows)))


def _failures(rows: pd.DataFrame) -> set[str]:
    if rows.empty:
        return set()
    failed = rows[rows["sha256"].map(_text).isna()]
    errors = failed["path_error"].map(_text).fillna(failed["read_error"].map(_text))
    return {failure_key(path, error) for path, error in zip(failed["path"], errors, strict=True)}
