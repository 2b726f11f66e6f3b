"""The catalog: every S3 key and MLflow artifact path leukops reads or writes, and nothing else.

Kedro's catalog idea: stages name *what* they read and write; this module alone says *where*. A change of
layout is a change here (and a migration of the bucket), never a search through the stages. Prefixes end
without a slash; ``*_dir`` helpers return a prefix with the trailing slash that S3 listings expect.

Bucket layout (one data bucket)::

    raw/sha256/ab/cd/<sha256>.<ext>                      content-addressed originals (immutable)
    manifests/batches/<source>/<batch_id>.parquet        published batch manifests (immutable)
    manifests/splits/<task>.parquet                      the split ledger (every version's rows; data/ledger.py)
    manifests/datasets/<task>/<version>.parquet|.json    dataset snapshots + summary; latest.json pointer
    quarantine/<source>/<batch_id>/...                   held batches and rejected originals
    reports/validation/<run_date>/<batch_id>/...         GX Data Docs per validation run
    reports/drift/<run_date>/<report_id>.html|.json      drift reports; index.html / index.json
    drift/references/<task>/<run_id>/<digest>/...        cached reference features of a champion
    serving/requests/date=<day>/part-<id>.parquet        the serving request log
    serving/images/<ab>/<sha256>.<ext>                   request images, when kept
    state/{ingest,retrain,drift}/...                     idempotency records of the Airflow tasks
"""

from __future__ import annotations

from datetime import date

# --- raw originals ----------------------------------------------------------------------------------------
RAW = "raw"
RAW_SHARDS = f"{RAW}/sha256"
IMMUTABLE_PREFIXES = (f"{RAW}/", "manifests/", "quarantine/")  # never deleted through the adapter


def raw_key(sha256: str, ext: str) -> str:
    """Content-addressed key of an original: two shard levels keep listings small."""
    return f"{RAW_SHARDS}/{sha256[:2]}/{sha256[2:4]}/{sha256}.{ext}"


def raw_shard_dir(sha256: str, depth: int = 4) -> str:
    """The shard folder holding ``sha256`` (depth 2: ``ab/``, depth 4: ``ab/cd/``), with a trailing slash."""
    return f"{RAW_SHARDS}/{sha256[:2]}/" + (f"{sha256[2:4]}/" if depth == 4 else "")


# --- batches, quarantine, validation reports --------------------------------------------------------------
BATCHES = "manifests/batches"
QUARANTINE = "quarantine"
VALIDATION_REPORTS = "reports/validation"


def batches_dir(source: str | None = None) -> str:
    return f"{BATCHES}/{source}/" if source else f"{BATCHES}/"


def batch_manifest_key(source: str, batch_id: str) -> str:
    return f"{BATCHES}/{source}/{batch_id}.parquet"


def batch_of_manifest_key(key: str) -> tuple[str, str]:
    """(source, batch_id) of a published manifest key: the inverse of ``batch_manifest_key``."""
    source, name = key.removeprefix(f"{BATCHES}/").split("/", 1)
    return source, name.removesuffix(".parquet")


def quarantine_dir(source: str | None = None) -> str:
    return f"{QUARANTINE}/{source}/" if source else f"{QUARANTINE}/"


def quarantined_batch_prefix(source: str, batch_id: str) -> str:
    return f"{QUARANTINE}/{source}/{batch_id}"


def rejected_original_key(source: str, batch_id: str, sha256: str, ext: str) -> str:
    return f"{quarantined_batch_prefix(source, batch_id)}/rejected/{sha256}.{ext}"


HELD_MANIFEST = "manifest.parquet"  # a held batch's manifest, inside its quarantine prefix


def quarantined_manifest_key(source: str, batch_id: str) -> str:
    return f"{quarantined_batch_prefix(source, batch_id)}/{HELD_MANIFEST}"


def batch_of_quarantined_manifest_key(key: str) -> tuple[str, str] | None:
    """(source, batch_id) of a held manifest key; None for the other objects of a held batch."""
    parts = key.removeprefix(f"{QUARANTINE}/").split("/")
    return (parts[0], parts[1]) if len(parts) == 3 and parts[2] == HELD_MANIFEST else None


def quarantine_event_key(source: str, batch_id: str, event: str) -> str:
    """The audit record of a held batch: ``event`` is "quarantined" (when held) or "released"."""
    return f"{quarantined_batch_prefix(source, batch_id)}/{event}.json"


def validation_report_prefix(run_date: str, batch_id: str) -> str:
    return f"{VALIDATION_REPORTS}/{run_date}/{batch_id}"


def release_report_prefix(run_date: str, batch_id: str) -> str:
    """The report of a release's re-validation, beside the batch's first one."""
    return validation_report_prefix(run_date, f"{batch_id}-release")


def validation_result_key(prefix: str) -> str:
    """The validation result JSON in a report folder (or in a held batch's quarantine prefix)."""
    return f"{prefix}/validation.json"


def data_docs_key(report_prefix: str, relative: str = "index.html") -> str:
    """A file of the GX Data Docs site uploaded under a report prefix (default: its index page)."""
    return f"{report_prefix}/{relative}"


# --- split ledger and dataset snapshots --------------------------------------------------------------------
def ledger_key(task: str) -> str:
    return f"manifests/splits/{task}.parquet"


def dataset_key(task: str, version: str) -> str:
    return f"manifests/datasets/{task}/{version}.parquet"


def dataset_summary_key(task: str, version: str) -> str:
    return f"manifests/datasets/{task}/{version}.json"


def latest_dataset_pointer_key(task: str) -> str:
    return f"manifests/datasets/{task}/latest.json"


# --- drift ---------------------------------------------------------------------------------------------------
DRIFT_REPORTS = "reports/drift"
DRIFT_INDEX_JSON = f"{DRIFT_REPORTS}/index.json"
DRIFT_INDEX_HTML = f"{DRIFT_REPORTS}/index.html"
DRIFT_REFERENCES = "drift/references"


def drift_report_keys(run_date: date, report_id: str) -> tuple[str, str]:
    """(html, json) keys of one drift report."""
    base = f"{DRIFT_REPORTS}/{run_date.isoformat()}/{report_id}"
    return f"{base}.html", f"{base}.json"


def drift_reference_prefix(task: str, run_id: str, digest: str) -> str:
    return f"{DRIFT_REFERENCES}/{task}/{run_id}/{digest}"


def drift_reference_keys(task: str, run_id: str, digest: str) -> tuple[str, str]:
    """(features.parquet, pca.json) keys of one cached champion reference."""
    base = drift_reference_prefix(task, run_id, digest)
    return f"{base}/features.parquet", f"{base}/pca.json"


# --- serving request log ------------------------------------------------------------------------------------
SERVING_REQUESTS = "serving/requests"
SERVING_IMAGES = "serving/images"


def request_log_day_dir(day: str) -> str:
    return f"{SERVING_REQUESTS}/date={day}/"


def request_log_part_key(day: str, part_id: str) -> str:
    return f"{request_log_day_dir(day)}part-{part_id}.parquet"


def request_image_key(sha256: str, ext: str) -> str:
    return f"{SERVING_IMAGES}/{sha256[:2]}/{sha256}.{ext}"


# --- Airflow task state (idempotent retries) ---------------------------------------------------------------
STATE = "state"


def _safe(run_id: str) -> str:
    """An Airflow run id as one key segment (run ids hold ':' and '+')."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in run_id)


def ingest_report_key(source: str, run_id: str) -> str:
    return f"{STATE}/ingest/{source}/{_safe(run_id)}.json"


def retrain_last_attempt_key(task: str) -> str:
    return f"{STATE}/retrain/{task}/last_attempted.json"


def drift_checked_batches_key(task: str) -> str:
    return f"{STATE}/drift/{task}/checked_batches.json"


def drift_verdict_key(task: str, run_id: str) -> str:
    return f"{STATE}/drift/{task}/runs/{_safe(run_id)}.json"


def drift_dag_report_id(task: str, current: str, run_id: str) -> str:
    """The report id (see ``drift_report_keys``) of one current set checked by one drift DAG run."""
    return f"{task}-{current.replace(':', '-')}-{_safe(run_id)}"


# --- local stack health probe ------------------------------------------------------------------------------
HEALTH_PROBE_KEY = "_health/ping"  # overwritten by every health check of the embedded S3 server


# --- MLflow: run artifacts and model URIs ------------------------------------------------------------------
MODEL_ARTIFACT_PATH = "model"  # the model bundle inside a run (weights + bundle.json)
RUN_CONFIG = "config.json"
SPLIT_COUNTS = "dataset/split_counts.json"
TEST_REPORT = "evaluation/test_report.json"
CONFUSION_MATRIX = "evaluation/confusion_matrix.png"
PER_CLASS_REPORT = "evaluation/per_class_report.txt"
EXPLAIN_METRICS = "explain/metrics.json"
EXPLAIN_OVERLAYS = "explain/overlays"
GATE_REPORT_JSON = "gate/report.json"
GATE_REPORT_MD = "gate/report.md"
GATE_PREDICTIONS = "gate/predictions"  # per-image test predictions of a run, one file per dataset version
MODEL_CARD = "model_card.md"
DRIFT_REPORT_HTML = "drift/report.html"
DRIFT_REPORT_JSON = "drift/report.json"


def explain_overlay_path(label: str) -> str:
    return f"{EXPLAIN_OVERLAYS}/{label}.png"


def gate_predictions_path(dataset_version: str) -> str:
    """A run's per-image predictions on the test split of ``dataset_version`` (the paired gate's evidence)."""
    return f"{GATE_PREDICTIONS}/{dataset_version}.json"


def holdout_metric(source: str, name: str) -> str:
    """Run metric of an external validation on a holdout source, e.g. ``holdout.<source>.macro_f1``;
    the gate reads ``macro_f1``, ``f1_ci_low`` and ``n_images``. ``pipelines.model.holdout`` logs those and
    ``f1_ci_high``, ``accuracy``, ``ece`` (calibrated), ``ece_uncalibrated``, ``precision_|recall_|f1_<class>``,
    ``n_other_labels`` and ``excluded_seen_in_training``."""
    return f"holdout.{source}.{name}"


def holdout_report_path(source: str) -> str:
    """The full external-validation report (per-class table, confusion, CI) of a run on a holdout source."""
    return f"evaluation/holdout/{source}.json"


def run_model_uri(run_id: str) -> str:
    """The model bundle logged by a training run: the one URI every loader takes."""
    return f"runs:/{run_id}/{MODEL_ARTIFACT_PATH}"


def run_artifact_uri(run_id: str, artifact_path: str) -> str:
    return f"runs:/{run_id}/{artifact_path}"


def registered_version_uri(name: str, version: str | int) -> str:
    return f"models:/{name}/{version}"


def alias_uri(name: str, alias: str) -> str:
    """The version an alias (``champion``, ``previous``, ``challenger``) of a registered model points at."""
    return f"models:/{name}@{alias}"


def logged_model_uri(model_id: str) -> str:
    """An MLflow 3 logged model (what a registered version's source is when the run logged one)."""
    return f"models:/{model_id}"
