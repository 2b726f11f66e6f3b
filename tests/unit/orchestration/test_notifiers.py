"""The failure alert: what it says and where it goes (a webhook on a local HTTP server, or only the log)."""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from types import SimpleNamespace

import pytest

from pipelines.orchestration.notifiers import AlertDeliveryError, LeukopsAlertNotifier

UI = "http://127.0.0.1:18080"


def _failure_context(run_id: str = "manual__2026-01-02T03:04:05+00:00") -> dict:
    """What Airflow hands a task's on_failure_callback: the run, the task instance, the exception."""
    return {
        "dag_run": SimpleNamespace(dag_id="leukops_ingest", run_id=run_id),
        "ti": SimpleNamespace(task_id="publish_accepted", map_index=1, try_number=1),
        "exception": RuntimeError("batch b-42 quarantined: 7 of 40 rows failed; Data Docs: http://docs/b-42"),
    }


@pytest.fixture
def webhook(monkeypatch):
    """A local HTTP server that records each request; its status code is settable."""
    received: list[dict] = []
    reply = {"status": 200}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - the http.server protocol
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append({"path": self.path, "headers": dict(self.headers), "body": json.loads(body)})
            self.send_response(reply["status"])
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    conn = {
        "conn_type": "http",
        "host": "127.0.0.1",
        "port": server.server_port,
        "schema": "http",
        "password": "hook-token",
        "extra": {"endpoint": "/hooks/qa"},
    }
    monkeypatch.setenv("AIRFLOW_CONN_LEUKOPS_ALERTS", json.dumps(conn))
    monkeypatch.setenv("AIRFLOW__API__BASE_URL", UI)
    yield SimpleNamespace(received=received, reply=reply)
    server.shutdown()


def test_the_webhook_gets_the_reason_and_the_run_links(webhook):
    LeukopsAlertNotifier()(_failure_context())
    [request] = webhook.received
    assert request["path"] == "/hooks/qa"
    assert request["headers"]["Authorization"] == "Bearer hook-token"
    body = request["body"]
    run_url = f"{UI}/dags/leukops_ingest/runs/manual__2026-01-02T03%3A04%3A05%2B00%3A00"
    assert body["run_url"] == run_url
    assert body["task_url"] == f"{run_url}/tasks/publish_accepted/mapped/1"
    assert body["reason"].startswith("RuntimeError: batch b-42 quarantined")
    assert "Data Docs: http://docs/b-42" in body["text"] and run_url in body["text"]
    assert (body["dag_id"], body["task_id"], body["map_index"]) == ("leukops_ingest", "publish_accepted", 1)


def test_a_webhook_that_refuses_the_alert_is_an_error(webhook):
    webhook.reply["status"] = 500
    with pytest.raises(AlertDeliveryError, match="answered HTTP 500"):
        LeukopsAlertNotifier()(_failure_context())


def test_without_a_connection_the_alert_is_logged_with_how_to_configure_one(monkeypatch, caplog):
    monkeypatch.delenv("AIRFLOW_CONN_LEUKOPS_ALERTS", raising=False)
    monkeypatch.setenv("AIRFLOW__API__BASE_URL", UI)
    with caplog.at_level(logging.WARNING, logger="pipelines.orchestration.notifiers"):
        LeukopsAlertNotifier()(_failure_context())
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ALERT")]
    assert "leukops_ingest failed at publish_accepted[1]" in line
    assert "batch b-42 quarantined" in line and f"{UI}/dags/leukops_ingest/runs/" in line
    assert "AIRFLOW_CONN_LEUKOPS_ALERTS" in line


def test_a_connection_of_another_type_is_named_in_the_error(monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_LEUKOPS_ALERTS", json.dumps({"conn_type": "postgres", "host": "db"}))
    with pytest.raises(AlertDeliveryError, match="type 'postgres'"):
        LeukopsAlertNotifier()(_failure_context())


def test_an_smtp_connection_needs_recipients(monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_LEUKOPS_ALERTS", json.dumps({"conn_type": "smtp", "host": "mail", "port": 25}))
    with pytest.raises(AlertDeliveryError, match="no extra.to"):
        LeukopsAlertNotifier()(_failure_context())
