"""Failure alerts of the leukops DAGs: every task's ``on_failure_callback`` (its last try) tells QA what
failed, why, and where to look in the Airflow UI.

The destination is the Airflow connection ``leukops_alerts``:

- an HTTP connection (``conn_type`` http/https/webhook): the alert is POSTed as JSON to
  ``<schema>://<host>[:<port>]<extra.endpoint>``; a password becomes a bearer token, ``extra.headers``
  are added; the body has a ``text`` line (Slack/Teams-style webhooks show it) and the fields;
- an SMTP connection (``conn_type`` smtp/email): an e-mail through the SMTP provider's hook to
  ``extra.to`` (a list or a comma-separated string).

Without the connection the alert is only logged (one ``ALERT`` line in the task log), which says how to
configure one. Quarantined batches and drift without new labels fail their task on purpose, so they
reach QA through this path. Imports only ``airflow.sdk`` and the stdlib at module level (DAG parse time).
"""

from __future__ import annotations

import html
import json
import logging
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import quote

from airflow.sdk import BaseNotifier

from pipelines.core.errors import LeukopsError

log = logging.getLogger(__name__)

ALERTS_CONN_ID = "leukops_alerts"
WEBHOOK_TYPES = {"http", "https", "webhook"}
EMAIL_TYPES = {"smtp", "email"}
WEBHOOK_TIMEOUT_S = 10.0
DEFAULT_UI_URL = "http://localhost:8080"


class AlertDeliveryError(LeukopsError):
    pass


@dataclass(frozen=True)
class Alert:
    dag_id: str
    run_id: str
    task_id: str | None
    map_index: int | None
    try_number: int | None
    reason: str
    run_url: str
    task_url: str | None

    @property
    def subject(self) -> str:
        where = f"{self.task_id}[{self.map_index}]" if self.map_index not in (None, -1) else self.task_id
        return f"[leukops] {self.dag_id} failed" + (f" at {where}" if where else "")

    @property
    def text(self) -> str:
        return f"{self.subject}: {self.reason} — run {self.run_url}"

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "subject": self.subject, **asdict(self)}


def _ui_url() -> str:
    """The Airflow UI's base URL (``[api] base_url``, i.e. AIRFLOW__API__BASE_URL)."""
    from airflow.sdk import conf

    return (conf.get("api", "base_url", fallback=DEFAULT_UI_URL) or DEFAULT_UI_URL).rstrip("/")


def _reason(context: dict[str, Any]) -> str:
    exception = context.get("exception")
    if exception is not None:
        return f"{type(exception).__name__}: {exception}"
    return str(context.get("reason") or "no reason recorded")


def alert_from_context(context: dict[str, Any]) -> Alert:
    """The alert for a failure callback's context (a task's, or a DAG run's: then without a task)."""
    dag_run = context["dag_run"]
    ti = context.get("ti") or context.get("task_instance")
    run_url = f"{_ui_url()}/dags/{quote(dag_run.dag_id)}/runs/{quote(dag_run.run_id)}"
    task_url = None
    if ti is not None:
        mapped = f"/mapped/{ti.map_index}" if ti.map_index is not None and ti.map_index >= 0 else ""
        task_url = f"{run_url}/tasks/{quote(ti.task_id)}{mapped}"
    return Alert(
        dag_id=dag_run.dag_id,
        run_id=dag_run.run_id,
        task_id=ti.task_id if ti is not None else None,
        map_index=ti.map_index if ti is not None else None,
        try_number=getattr(ti, "try_number", None),
        reason=_reason(context),
        run_url=run_url,
        task_url=task_url,
    )


def _alerts_connection(conn_id: str):
    from airflow.sdk import Connection
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        return Connection.get(conn_id)
    except AirflowNotFoundException:
        return None


def webhook_url(conn) -> str:
    host = conn.host or ""
    if "://" not in host:
        port = f":{conn.port}" if conn.port else ""
        host = f"{conn.schema or 'https'}://{host}{port}"
    return host.rstrip("/") + (conn.extra_dejson.get("endpoint") or "")


def post_webhook(conn, alert: Alert) -> None:
    import httpx

    headers = {"Content-Type": "application/json", **conn.extra_dejson.get("headers", {})}
    if conn.password:
        headers["Authorization"] = f"Bearer {conn.password}"
    url = webhook_url(conn)
    try:
        response = httpx.post(url, content=json.dumps(alert.to_dict()), headers=headers, timeout=WEBHOOK_TIMEOUT_S)
    except httpx.HTTPError as err:
        raise AlertDeliveryError(f"alert webhook {url} (connection {conn.conn_id}) unreachable: {err}") from err
    if response.status_code >= 300:
        raise AlertDeliveryError(
            f"alert webhook {url} (connection {conn.conn_id}) answered HTTP {response.status_code}: "
            f"{response.text[:300]}"
        )


def send_email(conn, alert: Alert) -> None:
    from airflow.providers.smtp.hooks.smtp import SmtpHook

    to = conn.extra_dejson.get("to")
    if not to:
        raise AlertDeliveryError(f"SMTP connection {conn.conn_id} has no extra.to (the alert recipients)")
    rows = (f"<b>{name}</b>: {html.escape(str(value))}" for name, value in asdict(alert).items() if value is not None)
    body = "<br>".join(rows)
    with SmtpHook(smtp_conn_id=conn.conn_id) as hook:
        hook.send_email_smtp(to=to, subject=alert.subject, html_content=body, from_email=conn.extra_dejson.get("from"))


class LeukopsAlertNotifier(BaseNotifier):
    """Log the alert, then send it to the ``leukops_alerts`` connection when one is configured."""

    def __init__(self, conn_id: str = ALERTS_CONN_ID) -> None:
        super().__init__()
        self.conn_id = conn_id

    def notify(self, context: dict[str, Any]) -> None:
        alert = alert_from_context(context)
        conn = _alerts_connection(self.conn_id)
        if conn is None:
            log.warning(
                "ALERT %s (no Airflow connection %r is configured, so it is only logged here: set "
                "AIRFLOW_CONN_%s to a webhook or SMTP connection)",
                alert.text,
                self.conn_id,
                self.conn_id.upper(),
            )
            return
        log.warning("ALERT %s (sending to connection %r, type %s)", alert.text, self.conn_id, conn.conn_type)
        if conn.conn_type in WEBHOOK_TYPES:
            post_webhook(conn, alert)
        elif conn.conn_type in EMAIL_TYPES:
            send_email(conn, alert)
        else:
            kinds = ", ".join(sorted(WEBHOOK_TYPES | EMAIL_TYPES))
            raise AlertDeliveryError(f"connection {self.conn_id} has type {conn.conn_type!r}; use one of {kinds}")
