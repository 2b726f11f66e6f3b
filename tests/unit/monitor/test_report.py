"""Report pages (Evidently's page + the leukops summary), the reports index and publishing."""

from __future__ import annotations

import re
from datetime import date
from html.parser import HTMLParser

import pytest

from pipelines.io import layout
from pipelines.monitor.features import DriftError
from pipelines.monitor.report import index_entry, index_page, publish, report_page, upsert_index

from .frames import MemoryStore

META = {"report_id": "wbc-123", "task": "wbc", "reference": "dataset:v1", "current": "batch:b1"}


class _Checker(HTMLParser):
    """Counts unclosed elements of the kinds we write (html, body, table, section)."""

    def __init__(self) -> None:
        super().__init__()
        self.open: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag in ("html", "body", "table", "section", "tr"):
            self.open.append(tag)

    def handle_endtag(self, tag):
        if tag in ("html", "body", "table", "section", "tr"):
            assert self.open and self.open[-1] == tag, f"</{tag}> closes {self.open[-1:]}"
            self.open.pop()


def test_report_page_puts_the_summary_into_the_evidently_body(same_and_shifted):
    _, _, shifted = same_and_shifted
    page = report_page(shifted.snapshot.get_html_str(as_iframe=False), shifted.summary, META, True)
    assert page.lstrip().startswith("<!DOCTYPE html>") and "<title>" in page
    body = page[page.index("<body") :]
    assert body.index('id="leukops-drift-summary"') < body.index("<script")
    assert "hematoxylin_od" in page and "retrain recommended" in page
    with pytest.raises(DriftError, match="no <body>"):
        report_page("<html></html>", shifted.summary, META, True)


def test_report_page_escapes_what_users_typed_and_adds_a_title(same_and_shifted):
    _, same, _ = same_and_shifted
    meta = {**META, "report_id": "<b>id</b>", "current": "batch:<script>alert(1)</script>"}
    page = report_page("<html><head></head><body><p>evidently</p></body></html>", same.summary, meta, False)
    assert "<script>" not in page and "batch:&lt;script&gt;" in page
    assert "<title>leukops drift &lt;b&gt;id&lt;/b&gt;</title>" in page
    summary = page[page.index('<section id="leukops-drift-summary"') : page.index("<p>evidently")]
    assert "<th>drifted features</th><td>none</td>" in summary
    checker = _Checker()
    checker.feed(summary)
    assert checker.open == []


def _entry(day: str, rid: str, created: str, drift: bool) -> dict:
    html_key, json_key = layout.drift_report_keys(date.fromisoformat(day), rid)
    return {
        "date": day,
        "created": created,
        "report_id": rid,
        "task": "wbc",
        "reference": "champion",
        "current": "batch:x",
        "html_key": html_key,
        "json_key": json_key,
        "drift_detected": drift,
        "drift_share": 0.1,
        "embedding_drift": None,
        "retrain_recommended": False,
    }


def test_index_lists_newest_first_and_a_rerun_replaces_its_entry():
    entries = upsert_index([], _entry("2026-01-01", "old", "2026-01-01T10:00:00", False))
    entries = upsert_index(entries, _entry("2026-01-02", "new", "2026-01-02T09:00:00", False))
    entries = upsert_index(entries, _entry("2026-01-01", "old", "2026-01-03T10:00:00", True))
    assert [e["report_id"] for e in entries] == ["new", "old"] and entries[1]["drift_detected"] is True
    page = index_page(entries)
    checker = _Checker()
    checker.feed(page)
    assert checker.open == []
    assert re.findall(r'href="([^"]+)"', page) == ["2026-01-02/new.html", "2026-01-01/old.html"]
    assert "<td>yes</td>" in page and "<td>0.1</td>" in page


def test_publish_writes_the_report_then_the_index(same_and_shifted):
    _, same, _ = same_and_shifted
    store = MemoryStore()
    run_date = date(2026, 1, 2)
    entry = index_entry({**META, "created": "2026-01-02T10:00:00"}, same.summary, False, run_date)
    html_uri, json_uri = publish(store, "<html></html>", {"meta": META}, entry)
    html_key, json_key = layout.drift_report_keys(run_date, META["report_id"])
    assert (html_uri, json_uri) == (store.uri(html_key), store.uri(json_key))
    assert [e["report_id"] for e in store.get_json(layout.DRIFT_INDEX_JSON)] == [META["report_id"]]
    assert f'href="2026-01-02/{META["report_id"]}.html"' in store.objects[layout.DRIFT_INDEX_HTML]
