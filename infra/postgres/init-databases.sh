#!/usr/bin/env bash
# Runs once, on an empty data volume: separate databases for Airflow's metadata and MLflow's backend store.
set -euo pipefail
for db in airflow mlflow; do
  psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
    -c "SELECT 'CREATE DATABASE $db' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '$db')\gexec"
done
