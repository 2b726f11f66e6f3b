"""Queries of Airflow's public REST API (v2) that the ``airflow`` CLI has no command for: the XCom return
values of a task and the events of an asset.

Runs as ``python -m pipelines.devstack.airflow_rest QUERIES_JSON`` inside the environment of
``airflow_local.airflow_env``: the API app is built for that AIRFLOW_HOME and called in-process over
ASGI, so no api-server, port or login is needed (``API_ENV`` lets the simple auth manager treat the
caller as admin in this process only). Building the app takes seconds, so one process answers a whole
list of queries (``[{"query": "xcom-returns", "dag_id": ..., ...}, ...]``); it prints the list of
results as one JSON line, last.
"""

from __future__ import annotations

import json
import sys
from typing import Any
from urllib.parse import quote

API = "/api/v2"
PAGE_SIZE = 100  # the API's default maximum page size
API_ENV = {
    "AIRFLOW__CORE__AUTH_MANAGER": "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
    "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
}


def _get(client: Any, path: str, **params: Any) -> dict[str, Any]:
    response = client.get(f"{API}{path}", params=params)
    if response.status_code != 200:
        raise RuntimeError(f"GET {path} {params}: HTTP {response.status_code} {response.text[:500]}")
    return response.json()


def _all_pages(client: Any, path: str, items: str, **params: Any) -> list[dict[str, Any]]:
    collected: list[dict[str, Any]] = []
    while True:
        page = _get(client, path, limit=PAGE_SIZE, offset=len(collected), **params)
        collected += page[items]
        if not page[items] or len(collected) >= page["total_entries"]:
            return collected


def xcom_returns(client: Any, dag_id: str, run_id: str, task_id: str) -> list[Any]:
    """The return values of the task's instances in one run, in map-index order."""
    base = f"/dags/{quote(dag_id, safe='')}/dagRuns/{quote(run_id, safe='')}/taskInstances/{quote(task_id, safe='')}"
    entries = _all_pages(client, f"{base}/xcomEntries", "xcom_entries", xcom_key_pattern="return_value")
    indexes = sorted(e["map_index"] for e in entries if e["key"] == "return_value")
    return [_get(client, f"{base}/xcomEntries/return_value", map_index=i)["value"] for i in indexes]


def asset_events(client: Any, asset_name: str, dag_id: str | None) -> list[dict[str, Any]]:
    """The asset's events (optionally only those a DAG emitted), oldest first, with their extra."""
    filters = {"name_pattern": asset_name} | ({"source_dag_id": dag_id} if dag_id else {})
    events = _all_pages(client, "/assets/events", "asset_events", **filters)
    mine = sorted((e for e in events if e["name"] == asset_name), key=lambda e: e["id"])  # the pattern is LIKE
    return [
        {
            "dag_id": e["source_dag_id"],
            "run_id": e["source_run_id"],
            "extra": e["extra"] or {},
            "timestamp": e["timestamp"],
        }
        for e in mine
    ]


QUERIES = {"xcom-returns": xcom_returns, "asset-events": asset_events}


def main(argv: list[str]) -> None:
    from airflow.api_fastapi.app import create_app
    from fastapi.testclient import TestClient

    queries = json.loads(argv[0])
    with TestClient(create_app(apps="core")) as client:
        results = [QUERIES[params.pop("query")](client, **params) for params in queries]
    print(json.dumps(results, default=str), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
