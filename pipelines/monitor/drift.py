"""Drift monitoring, wired: two specs in, a published report and a retrain recommendation out.

``monitor`` resolves both sides (``inputs``: rows and features of image facts, champion embeddings and
predictions, see ``features``), compares them (``statistics.compare``: Evidently 0.7 with the tests
explained there), decides on retraining, writes the report + index to S3 (``report``) and logs one MLflow
run per report.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING, Any

from pipelines.io import layout
from pipelines.monitor.inputs import Champion, DriftInputs, gather
from pipelines.monitor.report import index_entry, publish, report_documents
from pipelines.monitor.statistics import DriftSummary, compare, retrain_recommended

if TYPE_CHECKING:
    from pipelines.core.settings import Settings
    from pipelines.io.storage import ObjectStore


@dataclass(frozen=True)
class DriftOutcome:
    report_id: str
    task: str
    reference: str
    current: str
    summary: DriftSummary
    retrain_recommended: bool
    report_html: str
    report_json: str
    mlflow_run_id: str | None

    def to_dict(self) -> dict[str, Any]:
        s = self.summary
        return {
            "drift_detected": s.drift_detected,
            "drift_share": s.drift_share,
            "drifted_features": s.drifted_features,
            "embedding_drift": s.embedding_drift,
            "prediction_drift": s.prediction_drift,
            "retrain_recommended": self.retrain_recommended,
            "report_html": self.report_html,
            "report_json": self.report_json,
            "report_id": self.report_id,
            "mlflow_run_id": self.mlflow_run_id,
            "notes": s.notes,
        }


def default_report_id(task: str, reference: str, current: str, champion: Champion | None, shas: Sequence[str]) -> str:
    """Same inputs, same id: a rerun overwrites its own report instead of adding a copy."""
    parts = [task, reference, current, champion.run_id if champion else None, sorted(shas)]
    return f"{task}-{hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:12]}"


def report_meta(task: str, inputs: DriftInputs, report_id: str | None) -> dict[str, Any]:
    """What identifies a report; ``created`` only orders same-day reports in the index."""
    champion = inputs.champion
    reference, current = str(inputs.reference), str(inputs.current)
    return {
        "report_id": report_id or default_report_id(task, reference, current, champion, inputs.current_identity),
        "task": task,
        "reference": reference,
        "current": current,
        "champion_version": champion.version if champion else None,
        "champion_run_id": champion.run_id if champion else None,
        "reference_dataset_version": (
            champion.dataset_version if champion and inputs.reference.kind == "champion" else None
        ),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def monitor(
    task: str,
    reference: str,
    current: str,
    *,
    settings: Settings,
    store: ObjectStore,
    run_date: date,
    report_id: str | None = None,
    log_to_mlflow: bool = True,
) -> DriftOutcome:
    """Build both sides' features, compare, publish to S3 (and MLflow), decide on retraining."""
    inputs = gather(task, reference, current, settings, store)
    result = compare(inputs.reference_features, inputs.current_features, settings.drift, inputs.notes)
    retrain = retrain_recommended(result.summary, settings.drift)
    meta = report_meta(task, inputs, report_id)
    page, body = report_documents(result, meta, retrain)
    html_uri, json_uri = publish(store, page, body, index_entry(meta, result.summary, retrain, run_date))
    run_id = _log_run(settings, meta, result.summary, retrain, html_uri, page, body) if log_to_mlflow else None
    return DriftOutcome(
        meta["report_id"], task, meta["reference"], meta["current"], result.summary, retrain, html_uri, json_uri, run_id
    )


def _log_run(
    settings: Settings,
    meta: dict[str, Any],
    summary: DriftSummary,
    retrain: bool,
    html_uri: str,
    page: str,
    body: dict[str, Any],
) -> str:
    """One MLflow run per report: summary metrics, tags to find it by, and the HTML + JSON as artifacts."""
    from pipelines.io.tracking import log_drift_run

    metrics = {"drift_share": summary.drift_share, "drifted_features": float(len(summary.drifted_features))}
    if summary.embedding_drift is not None:
        metrics["embedding_drift"] = summary.embedding_drift
    tags = {
        "kind": "drift",
        "task": meta["task"],
        "reference": meta["reference"],
        "current": meta["current"],
        "report_id": meta["report_id"],
        "report_html": html_uri,
        "drift_detected": str(summary.drift_detected).lower(),
        "retrain_recommended": str(retrain).lower(),
    }
    artifacts = {
        layout.DRIFT_REPORT_HTML: page.encode(),
        layout.DRIFT_REPORT_JSON: json.dumps(body, default=str).encode(),
    }
    return log_drift_run(settings, f"drift-{meta['report_id']}", tags, metrics, artifacts)
