"""Drift report documents (Evidently's page with a leukops summary, the JSON body) and the reports index."""

from __future__ import annotations

import json
import posixpath
import re
from datetime import date
from typing import TYPE_CHECKING, Any

from pipelines.core.render import render
from pipelines.io import layout
from pipelines.monitor.features import DriftError

if TYPE_CHECKING:
    from pipelines.io.storage import ObjectStore
    from pipelines.monitor.statistics import DriftResult, DriftSummary


def report_page(evidently_html: str, summary: DriftSummary, meta: dict[str, Any], retrain: bool) -> str:
    """Evidently's standalone page with a leukops summary table at the top of the body."""
    match = re.search(r"<body[^>]*>", evidently_html)
    if match is None:
        raise DriftError("the Evidently report HTML has no <body> element")
    banner = render("drift_summary.html.j2", summary=summary, meta=meta, retrain=retrain)
    page = evidently_html[: match.end()] + banner + evidently_html[match.end() :]
    head_end = page.find("</head>")
    if head_end < 0 or "<title>" in page[:head_end]:
        return page
    return page[:head_end] + render("drift_title.html.j2", report_id=meta["report_id"]) + page[head_end:]


def report_documents(result: DriftResult, meta: dict[str, Any], retrain: bool) -> tuple[str, dict[str, Any]]:
    """The standalone HTML page and the JSON document of one report."""
    page = report_page(result.snapshot.get_html_str(as_iframe=False), result.summary, meta, retrain)
    body = {
        "meta": meta,
        "summary": result.summary.to_dict(),
        "retrain_recommended": retrain,
        "evidently": json.loads(result.snapshot.json()),
    }
    return page, body


# -- the index --------------------------------------------------------------------------------------


def index_entry(meta: dict[str, Any], summary: DriftSummary, retrain: bool, run_date: date) -> dict[str, Any]:
    html_key, json_key = layout.drift_report_keys(run_date, meta["report_id"])
    return {
        "date": run_date.isoformat(),
        "created": meta["created"],
        "report_id": meta["report_id"],
        "task": meta["task"],
        "reference": meta["reference"],
        "current": meta["current"],
        "html_key": html_key,
        "json_key": json_key,
        "drift_detected": summary.drift_detected,
        "drift_share": summary.drift_share,
        "embedding_drift": summary.embedding_drift,
        "retrain_recommended": retrain,
    }


def upsert_index(entries: list[dict[str, Any]], entry: dict[str, Any]) -> list[dict[str, Any]]:
    """Replace the entry with the same report key (a rerun), then order newest first."""
    kept = [e for e in entries if e["html_key"] != entry["html_key"]]
    return sorted([*kept, entry], key=lambda e: (e["date"], e["created"], e["report_id"]), reverse=True)


def index_page(entries: list[dict[str, Any]]) -> str:
    """The browsable list of drift reports, in the order given (links are relative to the index page)."""
    index_dir = posixpath.dirname(layout.DRIFT_INDEX_HTML)
    linked = [{**e, "href": posixpath.relpath(e["html_key"], index_dir)} for e in entries]
    return render("drift_index.html.j2", entries=linked)


def publish(store: ObjectStore, page: str, body: dict[str, Any], entry: dict[str, Any]) -> tuple[str, str]:
    """Write the report HTML + JSON at the entry's keys, then update the index (last); returns their URIs."""
    store.put_text(entry["html_key"], page)
    store.put_json(entry["json_key"], body)
    index_key = layout.DRIFT_INDEX_JSON
    entries = upsert_index(store.get_json(index_key) if store.exists(index_key) else [], entry)
    store.put_json(index_key, entries)
    store.put_text(layout.DRIFT_INDEX_HTML, index_page(entries))
    return store.uri(entry["html_key"]), store.uri(entry["json_key"])
