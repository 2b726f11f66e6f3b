"""Airflow Assets shared by the leukops DAGs (importing airflow.sdk only: cheap at DAG parse time)."""

from __future__ import annotations

from airflow.sdk import Asset

# Emitted when a validated batch is accepted (extra: source, batch_id, accepted count).
ACCEPTED_IMAGES = Asset(name="leukops_accepted_images", uri="leukops://accepted-images")
# Emitted by the drift DAG when drift calls for a retrain and new labelled data exists.
RETRAIN_REQUEST = Asset(name="leukops_retrain_request", uri="leukops://retrain-request")
