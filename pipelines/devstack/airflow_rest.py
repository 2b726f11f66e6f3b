"""Airflow's public REST API (v2): a client of the running api-server (``AirflowClient``: JWT from
POST <airflow_url>/auth/token, trigger, poll, task instances, XComs, asset events), and the same
queries answered in-process for ``airflow dags test`` runs, where no api-server runs.

The in-process mode runs as ``python -m pipelines.devstack.airflow_rest QUERIES_JSON`` inside the environment of
``airflow_local.airflow_env``: the API app is built for that AIRFLOW_HOME and called in-process over
ASGI, so no api-server, port or login is needed (``API_ENV`` lets the simple auth manager treat the
caller as admin in this process only). Building the app takes seconds, so one process answers a whole
list of queries (``[{"query": "xcom-returns", "dag_id": ..., ...}, ...]``); it prints the list of
results as one JSON line, last.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any
from urllib.parse import quote

import httpx

API = "/api/v2"
PAGE_SIZE = 100  # the API's default maximum page size
API_ENV = {
    "AIRFLOW__CORE__AUTH_MANAGER": "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
    "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
}


def _get(client: Any, path: str, **params: Any) -> dict[str, Any]:
    params = {k: v for k, v in params.items() if v is not None}
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
FINISHED = {"success", "failed"}
HTTP_TIMEOUT_S = 30.0
POLL_S = 3.0


class AirflowApiError(RuntimeError):
    pass


def fetch_token(url: str, username: str, password: str) -> str:
    """A JWT for the REST API from the simple auth manager's login endpoint."""
    try:
        response = httpx.post(f"{url}/auth/token", json={"username": username, "password": password}, timeout=10)
    except httpx.HTTPError as err:
        raise AirflowApiError(f"Airflow at {url} is not answering ({err}); start it: `leukops airflow up`") from err
    if response.status_code not in (200, 201):
        raise AirflowApiError(f"Airflow at {url} refused the login: HTTP {response.status_code} {response.text[:300]}")
    return response.json()["access_token"]


class AirflowClient:
    """The api-server over HTTP, as any REST user sees it."""

    def __init__(self, url: str, token: str) -> None:
        self.url = url.rstrip("/")
        self.http = httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {token}"}, timeout=HTTP_TIMEOUT_S
        )

    def _send(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.http.request(method, f"{API}{path}", **kwargs)
        if response.status_code >= 300:
            raise AirflowApiError(f"{method} {path}: HTTP {response.status_code} {response.text[:500]}")
        return response.json()

    def trigger(self, dag_id: str, conf: dict[str, Any] | None = None, logical_date: str | None = None) -> dict:
        """A new DAG run; ``logical_date`` None = a run with no logical date (its run_after is now)."""
        body = {"logical_date": logical_date, "conf": conf or {}}
        return self._send("POST", f"/dags/{quote(dag_id, safe='')}/dagRuns", json=body)

    def dags(self, id_pattern: str) -> list[dict]:
        """The DAGs whose id matches the SQL LIKE pattern ``id_pattern`` (``%`` is implied at both ends)."""
        return _all_pages(self.http, "/dags", "dags", dag_id_pattern=id_pattern)

    def dag(self, dag_id: str) -> dict:
        """The DAG's details (is_paused, next_dagrun_run_after, ...)."""
        return self._send("GET", f"/dags/{quote(dag_id, safe='')}")

    def dag_run(self, dag_id: str, run_id: str) -> dict:
        return self._send("GET", f"/dags/{quote(dag_id, safe='')}/dagRuns/{quote(run_id, safe='')}")

    def dag_runs(self, dag_id: str, **filters: Any) -> list[dict]:
        return _all_pages(self.http, f"/dags/{quote(dag_id, safe='')}/dagRuns", "dag_runs", **filters)

    def task_instances(self, dag_id: str, run_id: str) -> list[dict]:
        path = f"/dags/{quote(dag_id, safe='')}/dagRuns/{quote(run_id, safe='')}/taskInstances"
        return _all_pages(self.http, path, "task_instances")

    def task_log(self, dag_id: str, run_id: str, task_id: str, try_number: int, map_index: int = -1) -> str:
        path = (
            f"/dags/{quote(dag_id, safe='')}/dagRuns/{quote(run_id, safe='')}/taskInstances/{quote(task_id, safe='')}"
        )
        response = self.http.get(
            f"{API}{path}/logs/{try_number}",
            params={"full_content": True, "map_index": map_index},
            headers={"Accept": "application/json"},
        )
        return response.text

    def xcom_returns(self, dag_id: str, run_id: str, task_id: str) -> list[Any]:
        return xcom_returns(self.http, dag_id, run_id, task_id)

    def asset_events(self, asset_name: str, dag_id: str | None = None) -> list[dict[str, Any]]:
        return asset_events(self.http, asset_name, dag_id)

    def wait(self, dag_id: str, run_id: str, timeout_s: float, on_poll=None) -> dict:
        """Poll the run until it finishes; ``on_poll(run)`` sees each state read (progress lines)."""
        deadline = time.monotonic() + timeout_s
        while True:
            run = self.dag_run(dag_id, run_id)
            if on_poll:
                on_poll(run)
            if run["state"] in FINISHED:
                return run
            if time.monotonic() > deadline:
                raise AirflowApiError(f"{dag_id} {run_id} still {run['state']} after {timeout_s:.0f}s")
            time.sleep(POLL_S)


def main(argv: list[str]) -> None:
    from airflow.api_fastapi.app import create_app
    from fastapi.testclient import TestClient

    queries = json.loads(argv[0])
    with TestClient(create_app(apps="core")) as client:
        results = [QUERIES[params.pop("query")](client, **params) for params in queries]
    print(json.dumps(results, default=str), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
