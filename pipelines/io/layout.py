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
    manifests/conflicts/<sha256>/<resolution_id>.json    audited resolutions of label conflicts
    state/{ingest,retrain,drift}/...                     idempotency records of the Airflow tasks
    state/inflight/<source>/<batch_id>.json              (sha, label) of batches being ingested
    manifests/splits/<task>/<generation>.parquet         committed ledger generations (If-None-Match)
    state/locks/<name>/<ticket>.json|.released           leases (one holder of a training run key)
    state/promotions/<task>/<entry_id>.json              promotion journal (alias moves: intended, then done)
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import date

# --- raw originals ----------------------------------------------------------------------------------------
RAW = "raw"
RAW_SHARDS = f"{RAW}/sha256"
IMMUTABLE_PREFIXES = (f"{RAW}/", "manifests/", "quarantine/")  # never deleted through the adapter


def raw_key(sha256: str, ext: str) -> str:
    """Content-addressed key of an original: two shard levels keep listings small."""
    return f"{RAW_SHARDS}/{sha256[:2]}/{sha256[2:4]}/{sha256}.{ext}"


def sha_of_raw_key(key: str) -> str:
    """The sha256 a ``raw_key`` names: the inverse of ``raw_key`` (without the extension)."""
    return key.rsplit("/", 1)[-1].split(".", 1)[0]


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
SPLITS = "manifests/splits"
DATASETS = "manifests/datasets"


def ledger_key(task: str) -> str:
    return f"{SPLITS}/{task}.parquet"


def dataset_dir(task: str) -> str:
    """Every snapshot of a task (dataset parquet + summary per version, and the latest pointer)."""
    return f"{DATASETS}/{task}/"


def dataset_key(task: str, version: str) -> str:
    return f"{DATASETS}/{task}/{version}.parquet"


def dataset_summary_key(task: str, version: str) -> str:
    return f"{DATASETS}/{task}/{version}.json"


def latest_dataset_pointer_key(task: str) -> str:
    return f"{DATASETS}/{task}/latest.json"


def ledger_generations_dir(task: str) -> str:
    """Every committed generation of a task's ledger (``data/ledger_store``): immutable, created once each."""
    return f"{SPLITS}/{task}/"


def ledger_generation_key(task: str, generation: int) -> str:
    return f"{SPLITS}/{task}/{generation:010d}.parquet"


def generation_of_ledger_key(key: str) -> int | None:
    """The generation number of a ``ledger_generation_key``; None for any other key."""
    name = key.rsplit("/", 1)[-1].removesuffix(".parquet")
    return int(name) if key.endswith(".parquet") and name.isdigit() else None


# --- leases (io/lease.py): one holder at a time, e.g. of a training run key ----------------------------------
LOCKS = "state/locks"


def lease_dir(name: str) -> str:
    return f"{LOCKS}/{name}/"


def lease_ticket_key(name: str, ticket: int) -> str:
    """Ticket ``n`` of a lease: created once (If-None-Match), its holder's owner record."""
    return f"{LOCKS}/{name}/{ticket:010d}.json"


def lease_release_key(name: str, ticket: int) -> str:
    return f"{LOCKS}/{name}/{ticket:010d}.released"


# --- the promotion journal (trust/journal.py): alias moves announced before they run --------------------------
PROMOTIONS = "state/promotions"


def promotion_journal_dir(task: str | None = None) -> str:
    return f"{PROMOTIONS}/{task}/" if task else f"{PROMOTIONS}/"


def promotion_journal_key(task: str, entry_id: str) -> str:
    """One journaled alias move of ``task``: written before the aliases move, marked done after."""
    return f"{PROMOTIONS}/{task}/{entry_id}.json"


def training_lease_name(run_key: str) -> str:
    """The lease one training of a run key holds (``model/candidate``): a second identical run waits."""
    return f"train/{run_key}"


def promotion_lease_name(model: str) -> str:
    """The lease every alias move of a registered model holds (``trust/journal``): promotions run in turn."""
    return f"promote/{model}"


def ticket_of_lease_key(key: str) -> int | None:
    name = key.rsplit("/", 1)[-1]
    stem = name.removesuffix(".json")
    return int(stem) if name.endswith(".json") and stem.isdigit() else None


# --- label conflicts and in-flight batches (data/conflicts.py, data/decisions.py) ----------------------------
CONFLICT_RESOLUTIONS = "manifests/conflicts"  # under manifests/: audit records, never deleted
INFLIGHT = "state/inflight"  # deleted once the batch is published or held


def conflict_resolutions_dir(sha256: str | None = None) -> str:
    return f"{CONFLICT_RESOLUTIONS}/{sha256}/" if sha256 else f"{CONFLICT_RESOLUTIONS}/"


def conflict_resolution_key(sha256: str, resolution_id: str) -> str:
    """Who resolved a label conflict of one image, when, why, and to which label (one object per decision)."""
    return f"{CONFLICT_RESOLUTIONS}/{sha256}/{resolution_id}.json"


def inflight_dir(source: str | None = None) -> str:
    return f"{INFLIGHT}/{source}/" if source else f"{INFLIGHT}/"


def inflight_batch_key(source: str, batch_id: str) -> str:
    """The (sha, label) pairs of a batch being ingested, so a concurrent ingest of another source sees them."""
    return f"{INFLIGHT}/{source}/{batch_id}.json"


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
INGEST_STATE = f"{STATE}/ingest"
RETRAIN_STATE = f"{STATE}/retrain"
DRIFT_STATE = f"{STATE}/drift"


def _safe(run_id: str) -> str:
    """An Airflow run id as one key segment (run ids hold ':' and '+')."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in run_id)


def ingest_report_key(source: str, run_id: str) -> str:
    return f"{INGEST_STATE}/{source}/{_safe(run_id)}.json"


def retrain_last_attempt_key(task: str) -> str:
    return f"{RETRAIN_STATE}/{task}/last_attempted.json"


def drift_checked_batches_key(task: str) -> str:
    return f"{DRIFT_STATE}/{task}/checked_batches.json"


def drift_verdict_key(task: str, run_id: str) -> str:
    return f"{DRIFT_STATE}/{task}/runs/{_safe(run_id)}.json"


def drift_dag_report_id(task: str, current: str, run_id: str) -> str:
    """The report id (see ``drift_report_keys``) of one current set checked by one drift DAG run."""
    return f"{task}-{current.replace(':', '-')}-{_safe(run_id)}"


# --- least-privilege S3 identities: the prefixes of the data bucket each role writes and reads ------------
# Rendered into SeaweedFS identities and MinIO policies by pipelines/devstack/s3_roles.py; "" = the whole
# bucket. A role deletes only under ROLE_DELETES; the admin pair (the stack itself) may do anything.
ROLE_WRITES: dict[str, tuple[str, ...]] = {
    "ingest": (RAW, BATCHES, QUARANTINE, VALIDATION_REPORTS, INGEST_STATE, INFLIGHT, CONFLICT_RESOLUTIONS),
    "training": (SPLITS, DATASETS, RETRAIN_STATE, LOCKS, PROMOTIONS),  # the retrain DAG: snapshot .. promote
    "drift": (DRIFT_REPORTS, DRIFT_REFERENCES, DRIFT_STATE),
    "serving": (SERVING_REQUESTS, SERVING_IMAGES),
}
ROLE_READS: dict[str, tuple[str, ...]] = {
    "ingest": ("",),  # manifests (what is new), and S3 landing buckets (devstack/s3_roles.py)
    "training": ("",),
    "drift": ("",),
    "serving": (SERVING_IMAGES,),  # whether a request image is stored already; models come through MLflow
}
ROLE_DELETES: dict[str, tuple[str, ...]] = {
    "ingest": (INFLIGHT,),  # a batch's in-flight record, once done
    "training": (LOCKS,),  # old tickets of a training lease (io/lease.py)
}


# --- local stack health probe ------------------------------------------------------------------------------
HEALTH_PROBE_KEY = "_health/ping"  # overwritten by every health check, in the stack's own health bucket


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
ATTESTATIONS = "attestation"  # signed promotion statements of a run, one per sequence number
ATTESTATION_TAG = "attestation"  # version tag: the newest signed statement (pipelines.trust.attestation)
DRIFT_REPORT_HTML = "drift/report.html"
DRIFT_REPORT_JSON = "drift/report.json"


def explain_overlay_path(label: str) -> str:
    return f"{EXPLAIN_OVERLAYS}/{label}.png"


def attestation_path(sequence: int) -> str:
    """The signed promotion statement with ``sequence`` (zero-padded: listings sort by sequence)."""
    return f"{ATTESTATIONS}/{sequence:06d}.json"


def gate_predictions_path(dataset_version: str) -> str:
    """A run's per-image predictions on the test split of ``dataset_version`` (the paired gate's evidence)."""
    return f"{GATE_PREDICTIONS}/{dataset_version}.json"


def holdout_metric(source: str, name: str) -> str:
    """Run metric of an external validation on a holdout source, e.g. ``holdout.<source>.macro_f1``;
    the gate reads ``macro_f1``, ``f1_ci_low`` and ``n_images``. ``pipelines.model.holdout`` logs those and
    ``f1_ci_high``, ``accuracy``, ``ece`` (calibrated), ``ece_uncalibrated``, ``precision_|recall_|f1_<class>``,
    ``n_other_labels``, ``excluded_seen_in_training``, ``n_classes_scored`` (a source may carry a subset of
    the task's classes: macro-F1 averages over those) and ``predicted_absent``."""
    return f"holdout.{source}.{name}"


def holdout_report_path(source: str) -> str:
    """The full external-validation report (per-class table, confusion, CI) of a run on a holdout source."""
    return f"evaluation/holdout/{source}.json"


SITE_REPORT = "evaluation/site_report.json"  # the test split's per-source reports (per-class table, CI)


def site_metric(source: str, name: str) -> str:
    """Run metric of the test-split images of one source (site, lab), e.g. ``site.<source>.macro_f1``:
    ``pipelines.model.evaluate.site_metrics`` logs ``EvalResult.to_metrics`` (macro_f1 over the classes the
    source carries, f1_ci_low/high, accuracy, ece, n_classes_scored, predicted_absent, ...) and ``n_images``."""
    return f"site.{source}.{name}"


def metric_sources(metric_names: Iterable[str], family: str) -> list[str]:
    """The sources with a ``<family>.<source>.n_images`` run metric (family ``site`` or ``holdout``), sorted."""
    head, tail = f"{family}.", ".n_images"
    return sorted(n[len(head) : -len(tail)] for n in metric_names if n.startswith(head) and n.endswith(tail))


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
