"""The demo's closing summary: each link says whether it answers, and a login page is not an error."""

from __future__ import annotations

from pipelines.devstack.demo import render_summary


def _summary(links: dict[str, dict]) -> dict:
    return {
        "task": "all_subtypes",
        "wall_s": 1.0,
        "dag_runs": {"leukops_ingest": {"state": "success"}},
        "ingest": [],
        "snapshot": [],
        "candidates": [],
        "promotion": [],
        "drift": [],
        "champion": None,
        "links": links,
        "airflow_ui": "http://127.0.0.1:8080",
        "mlflow_ui": "http://127.0.0.1:15000",
    }


def test_each_link_line_says_whether_the_page_answers_or_asks_for_a_login():
    links = {
        "report": {"url": "http://s3/report.html", "status": 200},
        "MLflow champion": {"url": "http://mlflow/#/models/m", "status": 401},
        "gone": {"url": "http://127.0.0.1:1/x", "status": "ConnectError"},
    }
    lines = {line.split(":", 1)[0]: line for line in render_summary(_summary(links)).splitlines()}
    assert lines["report"].endswith("(HTTP 200)")
    assert lines["MLflow champion"].endswith("(HTTP 401)  <- asks for the login below")
    assert lines["gone"].endswith("(HTTP ConnectError)  <- does not answer")
