"""`leukops drift`: compare a current image set with a reference and publish an Evidently drift report."""

from __future__ import annotations

import argparse
from datetime import UTC, date, datetime

from pipelines.cli import Output, add_command
from pipelines.io.layout import DRIFT_REPORTS


def register(sub: argparse._SubParsersAction) -> None:
    parser = add_command(
        sub,
        "drift",
        "drift report of a current image set against a reference: image facts, embeddings, prediction mix",
        _drift,
    )
    parser.add_argument("--task", required=True, help="task name, e.g. wbc")
    parser.add_argument(
        "--reference",
        default="champion",
        help="champion (its training snapshot, the default) | dataset:VERSION | source:NAME | batch:ID",
    )
    parser.add_argument("--current", required=True, help="batch:ID | source:NAME | serving:YYYY-MM-DD..YYYY-MM-DD")
    parser.add_argument(
        "--date",
        type=date.fromisoformat,
        default=None,
        help=f"report date for {DRIFT_REPORTS}/<date>/ (default: today, UTC; the DAG passes its run date)",
    )
    parser.add_argument("--report-id", default=None, help="report id (default: a hash of the inputs)")
    parser.add_argument("--no-mlflow", action="store_true", help="publish to S3 only, log no MLflow run")


def _human(data: dict) -> str:
    lines = [
        f"drift detected       {data['drift_detected']}",
        f"drift share          {data['drift_share']}",
        f"drifted features     {', '.join(data['drifted_features']) or 'none'}",
        f"embedding drift      {data['embedding_drift']} (domain-classifier ROC-AUC; 0.5 = none)",
        f"prediction drift     {data['prediction_drift']}",
        f"retrain recommended  {data['retrain_recommended']}",
        f"report               {data['report_html']}",
    ]
    lines += [f"note: {note}" for note in data["notes"]]
    return "\n".join(lines)


def _drift(args: argparse.Namespace) -> Output:
    from pipelines.core.settings import get_settings
    from pipelines.io.storage import ObjectStore
    from pipelines.monitor.drift import monitor

    settings = get_settings()
    outcome = monitor(
        args.task,
        args.reference,
        args.current,
        settings=settings,
        store=ObjectStore.from_settings(settings),
        run_date=args.date or datetime.now(UTC).date(),
        report_id=args.report_id,
        log_to_mlflow=not args.no_mlflow,
    )
    data = outcome.to_dict()
    return Output(data, _human(data))
