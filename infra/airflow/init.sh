#!/usr/bin/env bash
# One-shot Airflow init, the same for compose/Kubernetes and the local stack (`leukops airflow up` runs this
# file): migrate the metadata DB, create the `gpu` pool (a task on a missing pool is never scheduled) and the
# connections the DAGs read (mapped onto leukops settings), then parse the DAGs and unpause the leukops ones
# (DAGS_ARE_PAUSED_AT_CREATION is true: a paused DAG's REST-triggered runs would stay queued forever).
# Idempotent: rerunning replaces the connections with the current values.
set -euo pipefail
airflow db migrate
airflow pools set gpu "${LEUKOPS_GPU_POOL_SLOTS:-1}" "GPU training jobs (leukops)"
python - <<'PY'
import json, os, subprocess

connections = {
    "leukops_mlflow": {"conn_type": "http", "host": os.environ["LEUKOPS_MLFLOW_TRACKING_URI"]},
}
for role in ("training", "drift", "promotion"):  # the MLflow user each DAG task logs in as (airflow_tasks)
    password = os.environ.get(f"LEUKOPS_MLFLOW_USERS__{role.upper()}")
    if password:  # the local stack passes them as AIRFLOW_CONN_* instead
        connections[f"leukops_mlflow_{role}"] = {**connections["leukops_mlflow"], "login": role, "password": password}
for role in ("ingest", "training", "drift"):  # the least-privilege S3 identity each DAG task signs as
    access_key = os.environ.get(f"LEUKOPS_S3_ROLES__{role.upper()}__ACCESS_KEY")
    if access_key:  # the local stack passes them as AIRFLOW_CONN_* instead; Airflow never gets the admin pair
        connections[f"leukops_s3_{role}"] = {
            "conn_type": "aws",
            "login": access_key,
            "password": os.environ[f"LEUKOPS_S3_ROLES__{role.upper()}__SECRET_KEY"],
            "extra": {"endpoint_url": os.environ["LEUKOPS_S3_ENDPOINT"], "region_name": "us-east-1"},
        }
# the one all-powerful S3 connection of earlier versions held the admin pair: remove it
subprocess.run(["airflow", "connections", "delete", "leukops_s3"], capture_output=True)
for conn_id, conn in connections.items():
    subprocess.run(["airflow", "connections", "delete", conn_id], capture_output=True)
    subprocess.run(["airflow", "connections", "add", conn_id, "--conn-json", json.dumps(conn)], check=True)
PY
airflow dags reserialize
airflow dags unpause --treat-dag-id-as-regex --yes '^leukops_'
echo "leukops airflow init done"
