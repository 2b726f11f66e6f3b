"""Drift monitoring: image facts, champion embeddings and prediction mix, compared with Evidently 0.7.

Features per image (one row each):

* the ingest facts (``imagefacts.FACT_COLUMNS``: size, brightness, contrast, blur, hue/saturation, RGB
  means, purple share, haematoxylin/eosin optical density), read straight from the manifest where ingest
  stored them and computed from the decoded image otherwise, plus ``file_type`` (from the object key);
* the champion's penultimate-layer embedding, reduced by a whitened PCA fitted on the reference and
  stored with the reference features, so every run against that reference uses the same axes;
* the champion's predicted class and confidence.

Statistical choices (thresholds live in ``settings.drift``):

* **Columns.** Up to ``large_sample_rows`` rows per side, each column gets a two-sample test at
  ``column_alpha / m`` (Bonferroni over the ``m`` columns of its family): Kolmogorov-Smirnov for numbers,
  and for categories a chi-square test of homogeneity on the 2×k count table, registered with Evidently
  here (Evidently's ``chisquare`` treats the reference shares as exact, which false-alarms more often;
  its TVD permutation test takes seconds per column). Two samples of one population then flag *any*
  column with probability ≤ ``column_alpha`` (5 %), where Evidently's default p < 0.05 per column
  expects 0.7 false alarms over 14 facts (``benchmarks/drift.py`` measures both on real pbc halves).
  Above that size p-values flag practically irrelevant differences, so (as in Evidently's own defaults)
  normed Wasserstein / Jensen-Shannon distances with ``distance_threshold`` take over. The dataset
  drifts when ``dataset_drift_share`` of the image-fact columns drift (stain/colour facts move together,
  size facts move together, so 0.3 is about one family moving as a whole).
* **Embeddings.** Evidently's ``EmbeddingsDrift`` with the *model-based* method (``ModelDriftMethod``):
  a logistic-regression domain classifier tries to tell reference from current PCA components; its
  held-out ROC-AUC is the score (0.5 = indistinguishable, 1 = fully separable), with ``bootstrap``: drift
  when the AUC beats the ``embedding_quantile`` (99 %) quantile of chance AUCs on the same split. Why
  this method: it is multivariate (catches shifts no single component shows), the score has a scale
  users understand and that does not depend on the embedding dimension, and the bootstrap makes the
  threshold adapt to the sample size. MMD's score has no absolute scale (its Evidently bootstrap also
  draws its null quantile at 5 %), share-of-drifted-components inherits the small-n false alarms of
  per-component tests, and mean distance ignores everything but the mean. Reference: Rabanser, Günnemann
  & Lipton, "Failing Loudly: An Empirical Study of Methods for Detecting Dataset Shift", NeurIPS 2019
  (domain classifiers), and Evidently's embedding drift docs.
* **Predictions.** ``ValueDrift`` on ``predicted_class`` (chi-square homogeneity) and ``confidence``
  (KS), with the same Bonferroni split over the two.
"""

from __future__ import annotations

import hashlib
import html
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import date, timedelta
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pandas as pd

from pipelines.core.errors import LeukopsError
from pipelines.data.imagefacts import FACT_COLUMNS, DecodedImage, decode_image, image_facts

if TYPE_CHECKING:
    from evidently.core.report import Report, Snapshot

    from pipelines.core.settings import DriftThresholds, Settings
    from pipelines.io.storage import ObjectStore

EMBEDDING_NAME = "embedding"  # the embeddings set in the report, and its name in drifted_features
PC_PREFIX = "emb_pc"
FILE_TYPE = "file_type"
PREDICTED_CLASS = "predicted_class"
CONFIDENCE = "confidence"
CATEGORY_TEST = "chi2_homogeneity"
SIZE_FEATURES = ("width", "height", "channels", FILE_TYPE)
MIN_ROWS = 20  # below this a two-sample test or a domain classifier says nothing useful
REPORT_PREFIX = "reports/drift"
REFERENCE_CACHE_PREFIX = "drift/references"
SERVING_PREFIX = "serving/requests"
MODEL_BATCH = 32
_REFERENCE_KINDS = ("champion", "dataset", "source", "batch")
_CURRENT_KINDS = ("batch", "source", "serving")


class DriftError(LeukopsError):
    """A drift input is missing or unusable; the message names the spec, object and reason."""


class ImageModel(Protocol):
    """What drift needs from a loaded model (``pipelines.io.tracking.LoadedModel`` satisfies it)."""

    classes: Sequence[str]

    def embed(self, rgb_list: list[np.ndarray]) -> np.ndarray: ...

    def predict_proba(self, rgb_list: list[np.ndarray]) -> np.ndarray: ...


# -- embedding PCA ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class EmbeddingPCA:
    """A whitened PCA of penultimate features, fitted on the reference; JSON-serialisable, no pickle."""

    mean: np.ndarray
    components: np.ndarray  # k × D
    scale: np.ndarray  # sqrt of explained variance, k

    @classmethod
    def fit(cls, embeddings: np.ndarray, n_components: int) -> EmbeddingPCA:
        from sklearn.decomposition import PCA

        k = max(1, min(n_components, embeddings.shape[0] - 1, embeddings.shape[1]))
        pca = PCA(n_components=k, svd_solver="full", random_state=0).fit(embeddings)
        return cls(pca.mean_, pca.components_, np.sqrt(np.maximum(pca.explained_variance_, 1e-12)))

    @property
    def input_dim(self) -> int:
        return int(self.components.shape[1])

    @property
    def columns(self) -> list[str]:
        return [f"{PC_PREFIX}{i}" for i in range(self.components.shape[0])]

    def transform(self, embeddings: np.ndarray) -> pd.DataFrame:
        if embeddings.ndim != 2 or embeddings.shape[1] != self.input_dim:
            raise DriftError(
                f"embeddings of shape {embeddings.shape} do not match the reference PCA ({self.input_dim}-d)"
            )
        return pd.DataFrame(((embeddings - self.mean) @ self.components.T) / self.scale, columns=self.columns)

    def to_dict(self) -> dict[str, list]:
        return {
            "mean": self.mean.tolist(),
            "components": self.components.tolist(),
            "scale": self.scale.tolist(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, list]) -> EmbeddingPCA:
        return cls(*(np.asarray(data[k], dtype=np.float64) for k in ("mean", "components", "scale")))


# -- feature assembly (pure) ------------------------------------------------------------------------


def rows_missing_facts(rows: pd.DataFrame) -> pd.Series:
    """True for rows whose ingest facts are absent (older manifests) and must come from the image."""
    if any(c not in rows.columns for c in FACT_COLUMNS):
        return pd.Series(True, index=rows.index)
    return rows[list(FACT_COLUMNS)].isna().any(axis=1)


def file_types(keys: pd.Series) -> pd.Series:
    """jpg / png / bmp ... from object keys (jpeg and jpg are one type)."""
    ext = keys.astype(str).str.extract(r"\.([A-Za-z0-9]+)$", expand=False).str.lower()
    return ext.replace({"jpeg": "jpg", "tiff": "tif"}).fillna("unknown")


def fact_features(rows: pd.DataFrame, computed: dict[Any, dict[str, float]] | None = None) -> pd.DataFrame:
    """The fact columns of ``rows`` (manifest values, or ``computed`` facts by row index) + file_type."""
    frame = pd.DataFrame(index=rows.index)
    for column in FACT_COLUMNS:
        frame[column] = rows[column].astype(float) if column in rows.columns else np.nan
    for index, facts in (computed or {}).items():
        frame.loc[index, list(FACT_COLUMNS)] = [facts[c] for c in FACT_COLUMNS]
    missing = frame.index[frame.isna().any(axis=1)]
    if len(missing):
        raise DriftError(f"{len(missing)} rows have no image facts and no decoded image (first: {missing[0]!r})")
    if "key" in rows.columns:
        frame[FILE_TYPE] = file_types(rows["key"])
    return frame.reset_index(drop=True)


def prediction_features(proba: np.ndarray, classes: Sequence[str]) -> pd.DataFrame:
    if proba.ndim != 2 or proba.shape[1] != len(classes):
        raise DriftError(f"probabilities of shape {proba.shape} do not match {len(classes)} classes")
    return pd.DataFrame(
        {
            PREDICTED_CLASS: np.asarray(classes, dtype=object)[proba.argmax(axis=1)],
            CONFIDENCE: proba.max(axis=1),
        }
    )


def model_outputs(model: ImageModel, rgbs: list[np.ndarray], batch: int = MODEL_BATCH) -> tuple[np.ndarray, np.ndarray]:
    """Penultimate embeddings (N×D) and class probabilities (N×C), computed in batches to bound memory."""
    embeddings, probas = [], []
    for start in range(0, len(rgbs), batch):
        chunk = rgbs[start : start + batch]
        embeddings.append(np.asarray(model.embed(chunk), dtype=np.float64))
        probas.append(np.asarray(model.predict_proba(chunk), dtype=np.float64))
    return np.concatenate(embeddings), np.concatenate(probas)


def assemble_features(facts: pd.DataFrame, *parts: pd.DataFrame | None) -> pd.DataFrame:
    """Side-by-side concatenation of equally long feature blocks (missing blocks are skipped)."""
    blocks = [facts.reset_index(drop=True)] + [p.reset_index(drop=True) for p in parts if p is not None]
    lengths = {len(b) for b in blocks}
    if len(lengths) != 1:
        raise DriftError(f"feature blocks have different row counts: {sorted(lengths)}")
    return pd.concat(blocks, axis=1)


def sample_rows(rows: pd.DataFrame, max_rows: int) -> pd.DataFrame:
    """At most ``max_rows`` rows, the same ones for the same input (ordered by identity, fixed seed)."""
    identity = next((c for c in ("sha256", "request_id") if c in rows.columns), None)
    ordered = rows.sort_values(identity, kind="stable") if identity else rows
    if len(ordered) <= max_rows:
        return ordered
    return ordered.sample(n=max_rows, random_state=0).sort_index()


# -- comparison (Evidently) -------------------------------------------------------------------------


@dataclass(frozen=True)
class ColumnTest:
    method: str
    threshold: float


@dataclass(frozen=True)
class FeatureColumns:
    """The columns both sides have, by role."""

    facts: list[str]
    categorical_facts: list[str]
    embedding: list[str]
    predictions: bool

    @property
    def image_columns(self) -> list[str]:
        return self.facts + self.categorical_facts


def shared_columns(reference: pd.DataFrame, current: pd.DataFrame) -> FeatureColumns:
    both = set(reference.columns) & set(current.columns)
    return FeatureColumns(
        facts=[c for c in FACT_COLUMNS if c in both],
        categorical_facts=[FILE_TYPE] if FILE_TYPE in both else [],
        embedding=[c for c in reference.columns if c.startswith(PC_PREFIX) and c in both],
        predictions=PREDICTED_CLASS in both and CONFIDENCE in both,
    )


def column_test(
    categorical: bool, n_reference: int, n_current: int, family_size: int, t: DriftThresholds
) -> ColumnTest:
    """p-value tests (Bonferroni-split alpha) for small samples, effect-size distances for large ones."""
    if min(n_reference, n_current) > t.large_sample_rows:
        return ColumnTest("jensenshannon" if categorical else "wasserstein", t.distance_threshold)
    return ColumnTest(CATEGORY_TEST if categorical else "ks", t.column_alpha / max(family_size, 1))


def chi2_homogeneity(reference: pd.Series, current: pd.Series, feature_type: Any, threshold: float):
    """Chi-square test of homogeneity on the 2×k table of category counts: (p-value, drifted)."""
    from scipy.stats import chi2_contingency

    table = pd.concat([reference.value_counts(), current.value_counts()], axis=1).fillna(0).to_numpy().T
    if table.shape[1] < 2:
        return 1.0, False
    p_value = float(chi2_contingency(table).pvalue)
    return p_value, p_value < threshold


def register_category_test() -> None:
    """Make ``chi2_homogeneity`` known to Evidently by name (registering twice is harmless)."""
    from evidently.legacy.calculations.stattests.registry import StatTest, register_stattest
    from evidently.legacy.core import ColumnType

    test = StatTest(CATEGORY_TEST, "chi-square homogeneity p_value", [ColumnType.Categorical])
    register_stattest(test, default_impl=chi2_homogeneity)


def embedding_method(t: DriftThresholds):
    from evidently.metrics.embeddings import ModelDriftMethod

    return ModelDriftMethod(bootstrap=True, quantile_probability=t.embedding_quantile)


def build_report(columns: FeatureColumns, n_reference: int, n_current: int, t: DriftThresholds) -> Report:
    from evidently import Report
    from evidently.metrics import EmbeddingsDrift, ValueDrift
    from evidently.presets import DataDriftPreset

    register_category_test()
    family = len(columns.image_columns)
    numeric = column_test(False, n_reference, n_current, family, t)
    categorical = column_test(True, n_reference, n_current, family, t)
    items: list = [
        DataDriftPreset(
            columns=columns.image_columns,
            num_method=numeric.method,
            num_threshold=numeric.threshold,
            cat_method=categorical.method,
            cat_threshold=categorical.threshold,
            drift_share=t.dataset_drift_share,
        )
    ]
    if columns.embedding:
        items.append(EmbeddingsDrift(embeddings_name=EMBEDDING_NAME, drift_method=embedding_method(t)))
    if columns.predictions:
        items += [
            ValueDrift(column=PREDICTED_CLASS, **asdict(column_test(True, n_reference, n_current, 2, t))),
            ValueDrift(column=CONFIDENCE, **asdict(column_test(False, n_reference, n_current, 2, t))),
        ]
    return Report(items, include_tests=True)


def _dataset(frame: pd.DataFrame, columns: FeatureColumns):
    from evidently import DataDefinition, Dataset

    numerical = columns.facts + columns.embedding + ([CONFIDENCE] if columns.predictions else [])
    categorical = columns.categorical_facts + ([PREDICTED_CLASS] if columns.predictions else [])
    definition = DataDefinition(
        numerical_columns=numerical,
        categorical_columns=categorical,
        embeddings={EMBEDDING_NAME: columns.embedding} if columns.embedding else None,
    )
    return Dataset.from_pandas(frame[numerical + categorical], data_definition=definition)


@dataclass(frozen=True)
class ColumnDrift:
    score: float
    method: str
    threshold: float
    drifted: bool


def column_drifts(report_dict: dict[str, Any]) -> dict[str, ColumnDrift]:
    """Per-column drift from an Evidently 0.7 snapshot dict (``ValueDrift`` values + their drift tests)."""
    values = {m["id"]: m for m in report_dict["metrics"] if m["config"]["type"].endswith(":ValueDrift")}
    result = {}
    for test in report_dict["tests"]:
        metric = values.get(test["metric_config"]["metric_id"])
        if metric is None:
            continue
        config = metric["config"]
        result[config["column"]] = ColumnDrift(
            score=float(metric["value"]),
            method=str(config.get("method")),
            threshold=float(config.get("threshold")),
            drifted=test["status"] == "FAIL",
        )
    return result


@dataclass(frozen=True)
class DriftSummary:
    """The compact answer: what drifted, how much, and notes on what could not be compared."""

    drift_detected: bool
    drift_share: float
    drifted_features: list[str]
    embedding_drift: float | None
    embedding_drift_detected: bool
    prediction_drift: bool | None
    n_reference: int
    n_current: int
    columns: dict[str, ColumnDrift] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DriftSummary:
        columns = {k: ColumnDrift(**v) for k, v in data.get("columns", {}).items()}
        return cls(**{**data, "columns": columns})


def summarize(
    drifts: dict[str, ColumnDrift],
    columns: FeatureColumns,
    embedding: tuple[float, bool] | None,
    n_reference: int,
    n_current: int,
    t: DriftThresholds,
    notes: Sequence[str] = (),
) -> DriftSummary:
    image = [c for c in columns.image_columns if c in drifts]
    drifted_image = [c for c in image if drifts[c].drifted]
    share = len(drifted_image) / len(image) if image else 0.0
    prediction_drift = (
        any(drifts[c].drifted for c in (PREDICTED_CLASS, CONFIDENCE) if c in drifts) if columns.predictions else None
    )
    drifted = drifted_image + ([EMBEDDING_NAME] if embedding and embedding[1] else [])
    drifted += [c for c in (PREDICTED_CLASS, CONFIDENCE) if c in drifts and drifts[c].drifted]
    return DriftSummary(
        drift_detected=share >= t.dataset_drift_share or bool(embedding and embedding[1]) or bool(prediction_drift),
        drift_share=round(share, 4),
        drifted_features=drifted,
        embedding_drift=round(embedding[0], 4) if embedding else None,
        embedding_drift_detected=bool(embedding and embedding[1]),
        prediction_drift=prediction_drift,
        n_reference=n_reference,
        n_current=n_current,
        columns=drifts,
        notes=list(notes),
    )


def retrain_recommended(summary: DriftSummary, rule: DriftThresholds) -> bool:
    """The retrain decision (read by the retrain DAG): enough image facts drifted, or the embeddings did."""
    if summary.drift_share >= rule.retrain_drift_share:
        return True
    if summary.embedding_drift is not None and summary.embedding_drift >= rule.retrain_embedding_auc:
        return True
    return bool(rule.retrain_on_prediction_drift and summary.prediction_drift)


@dataclass(frozen=True)
class DriftResult:
    summary: DriftSummary
    snapshot: Snapshot


def compare(
    reference: pd.DataFrame, current: pd.DataFrame, t: DriftThresholds, notes: Sequence[str] = ()
) -> DriftResult:
    """Run the Evidently report on two feature frames and summarise it."""
    for name, frame in (("reference", reference), ("current", current)):
        if len(frame) < MIN_ROWS:
            raise DriftError(f"the {name} side has {len(frame)} images; drift needs at least {MIN_ROWS}")
    columns = shared_columns(reference, current)
    report = build_report(columns, len(reference), len(current), t)
    snapshot = report.run(current_data=_dataset(current, columns), reference_data=_dataset(reference, columns))
    embedding = None
    if columns.embedding:
        score, drifted, _ = embedding_method(t)(current[columns.embedding].copy(), reference[columns.embedding].copy())
        embedding = (float(score), bool(drifted))
    drifts = column_drifts(snapshot.dict())
    summary = summarize(drifts, columns, embedding, len(reference), len(current), t, notes)
    return DriftResult(summary, snapshot)


# -- report pages (pure) ----------------------------------------------------------------------------


def report_keys(run_date: date, report_id: str) -> tuple[str, str]:
    base = f"{REPORT_PREFIX}/{run_date.isoformat()}/{report_id}"
    return f"{base}.html", f"{base}.json"


_TABLE = '<table border="1" cellpadding="4" style="border-collapse:collapse">'


def _summary_banner(summary: DriftSummary, meta: dict[str, Any], retrain: bool) -> str:
    rows = {
        "task": meta.get("task"),
        "reference": meta.get("reference"),
        "current": meta.get("current"),
        "drift detected": summary.drift_detected,
        "drift share (image facts)": summary.drift_share,
        "drifted features": ", ".join(summary.drifted_features) or "none",
        "embedding drift (domain-classifier ROC-AUC)": summary.embedding_drift,
        "prediction drift": summary.prediction_drift,
        "retrain recommended": retrain,
        "images (reference / current)": f"{summary.n_reference} / {summary.n_current}",
        "notes": "; ".join(summary.notes) or "none",
    }
    cells = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows.items())
    return (
        '<section id="leukops-drift-summary" style="font-family:sans-serif;margin:1em">'
        f"<h1>leukops drift report {html.escape(str(meta.get('report_id')))}</h1>"
        f"{_TABLE}{cells}</table></section>"
    )


def report_page(evidently_html: str, summary: DriftSummary, meta: dict[str, Any], retrain: bool) -> str:
    """Evidently's standalone page with a leukops summary table at the top of the body."""
    match = re.search(r"<body[^>]*>", evidently_html)
    if match is None:
        raise DriftError("the Evidently report HTML has no <body> element")
    banner = _summary_banner(summary, meta, retrain)
    page = evidently_html[: match.end()] + banner + evidently_html[match.end() :]
    head_end = page.find("</head>")
    if head_end < 0 or "<title>" in page[:head_end]:
        return page
    title = f"<title>leukops drift {html.escape(str(meta.get('report_id')))}</title>"
    return page[:head_end] + title + page[head_end:]


_INDEX_COLUMNS = (
    ("date", "date"),
    ("report", "report_id"),
    ("task", "task"),
    ("reference", "reference"),
    ("current", "current"),
    ("drift", "drift_detected"),
    ("drift share", "drift_share"),
    ("embedding AUC", "embedding_drift"),
    ("retrain", "retrain_recommended"),
)


def _cell(entry: dict[str, Any], field_name: str) -> str:
    value = entry[field_name]
    if field_name == "report_id":
        link = html.escape(entry["html_key"].removeprefix(f"{REPORT_PREFIX}/"))
        return f'<a href="{link}">{html.escape(value)}</a>'
    if isinstance(value, bool):
        return "yes" if value else "no"
    return "" if value is None else html.escape(str(value))


def index_page(entries: list[dict[str, Any]]) -> str:
    """The browsable list of drift reports, newest first (links are relative to reports/drift/)."""
    header = "".join(f"<th>{title}</th>" for title, _ in _INDEX_COLUMNS)
    rows = "".join(
        "<tr>" + "".join(f"<td>{_cell(e, name)}</td>" for _, name in _INDEX_COLUMNS) + "</tr>" for e in entries
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        "<title>leukops drift reports</title></head>"
        '<body style="font-family:sans-serif"><h1>leukops drift reports</h1>'
        f"{_TABLE}<tr>{header}</tr>{rows}</table></body></html>\n"
    )


def upsert_index(entries: list[dict[str, Any]], entry: dict[str, Any]) -> list[dict[str, Any]]:
    """Replace the entry with the same report key (a rerun), then order newest first."""
    kept = [e for e in entries if e["html_key"] != entry["html_key"]]
    return sorted([*kept, entry], key=lambda e: (e["date"], e["created"], e["report_id"]), reverse=True)


# -- data sources (adapters: S3, registry, model) ---------------------------------------------------


@dataclass(frozen=True)
class Spec:
    kind: str
    value: str

    def __str__(self) -> str:
        return self.kind if self.kind == "champion" else f"{self.kind}:{self.value}"


def parse_spec(text: str, kinds: Sequence[str], role: str) -> Spec:
    kind, _, value = text.partition(":")
    if kind not in kinds or (kind != "champion" and not value) or (kind == "champion" and value):
        forms = ", ".join("champion" if k == "champion" else f"{k}:..." for k in kinds)
        raise DriftError(f"bad --{role} {text!r}: expected one of {forms}")
    return Spec(kind, value)


def parse_date_window(value: str) -> tuple[date, date]:
    """``FROM..TO`` (ISO dates, inclusive) → the two dates."""
    start, sep, end = value.partition("..")
    try:
        first, last = date.fromisoformat(start), date.fromisoformat(end)
    except ValueError:
        first = last = None
    if not sep or first is None or last is None or last < first:
        raise DriftError(f"bad serving window {value!r}: expected YYYY-MM-DD..YYYY-MM-DD with FROM <= TO")
    return first, last


@dataclass(frozen=True)
class Champion:
    version: str
    run_id: str
    dataset_version: str
    model_uri: str


def find_champion(settings: Settings, task: str) -> Champion | None:
    """The task's @champion version, its run and the snapshot it was trained on (None when none yet)."""
    from pipelines.io.registry import Registry

    registry = Registry.from_settings(settings)
    version = registry.aliases(task).get("champion")
    if version is None:
        return None
    record = registry.version(task, version)
    if not record.run_id:
        raise DriftError(f"{record.name} version {version} (@champion) has no training run")
    run = registry.read_run(record.run_id)
    dataset_version = run.tags.get("dataset_version")
    if not dataset_version:
        raise DriftError(f"run {record.run_id} of {record.name} v{version} has no dataset_version tag")
    return Champion(version, record.run_id, dataset_version, f"runs:/{record.run_id}/model")  # the contract URI


def batch_rows(store: ObjectStore, batch_id: str) -> pd.DataFrame:
    """Accepted rows of batch ``batch_id`` (found under manifests/batches/<source>/<batch_id>.parquet)."""
    keys = [k for k in store.list("manifests/batches/") if k.endswith(f"/{batch_id}.parquet")]
    if not keys:
        raise DriftError(f"no batch manifest {batch_id!r} under {store.uri('manifests/batches/')}")
    if len(keys) > 1:
        raise DriftError(f"batch id {batch_id!r} is ambiguous: {', '.join(keys)}")
    rows = store.get_parquet(keys[0])
    return rows[rows["status"] == "accepted"].reset_index(drop=True)


def serving_rows(store: ObjectStore, task: str, window: str) -> pd.DataFrame:
    """The serving request log of ``task`` for the dates FROM..TO (inclusive)."""
    first, last = parse_date_window(window)
    days = [first + timedelta(days=i) for i in range((last - first).days + 1)]
    keys = [k for d in days for k in store.list(f"{SERVING_PREFIX}/date={d.isoformat()}/") if k.endswith(".parquet")]
    if not keys:
        raise DriftError(f"no serving request logs under {store.uri(SERVING_PREFIX)}/date={first}..{last}")
    rows = pd.concat([store.get_parquet(k) for k in keys], ignore_index=True)
    return rows[rows["task"] == task].reset_index(drop=True)


def spec_rows(spec: Spec, task: str, store: ObjectStore, champion: Champion | None) -> pd.DataFrame:
    if spec.kind == "champion":
        if champion is None:
            raise DriftError(f"task {task!r} has no @champion yet: use --reference dataset:VERSION or source:NAME")
        return _snapshot_train_rows(store, task, champion.dataset_version)
    if spec.kind == "dataset":
        return _snapshot_train_rows(store, task, spec.value)
    if spec.kind == "source":
        from pipelines.data.ingest import accepted_rows

        return accepted_rows(store, spec.value)
    if spec.kind == "batch":
        return batch_rows(store, spec.value)
    return serving_rows(store, task, spec.value)


def _snapshot_train_rows(store: ObjectStore, task: str, version: str) -> pd.DataFrame:
    """The rows the model learned from: the train split of the snapshot."""
    from pipelines.data.snapshot import load_snapshot

    frame = load_snapshot(store, task, version).frame
    return frame[frame["split"] == "train"].reset_index(drop=True)


def decode_rows(store: ObjectStore, rows: pd.DataFrame, settings: Settings) -> list[DecodedImage]:
    """Decoded images of rows (sha256, key), fetched once into the local content-addressed cache."""
    from pipelines.data.datasets import fill_cache

    paths = fill_cache(store, rows, settings.state_dir / "cache")
    return [decode_image(p.read_bytes()) for p in paths]


@dataclass
class SideFeatures:
    features: pd.DataFrame
    notes: list[str]


def image_side_features(
    rows: pd.DataFrame,
    images: Callable[[pd.DataFrame], list[DecodedImage]],
    model: ImageModel | None,
    pca: EmbeddingPCA | None,
) -> tuple[pd.DataFrame, np.ndarray | None]:
    """Facts (+ model predictions) for image rows; returns the features and the raw embeddings."""
    missing = rows_missing_facts(rows)
    to_decode = rows if model is not None else rows[missing]
    decoded = dict(zip(to_decode.index, images(to_decode), strict=True)) if len(to_decode) else {}
    computed = {idx: image_facts(decoded[idx].rgb, decoded[idx].source_channels) for idx in rows.index[missing]}
    facts = fact_features(rows, computed)
    if model is None:
        return facts, None
    embeddings, proba = model_outputs(model, [decoded[idx].rgb for idx in rows.index])
    pcs = pca.transform(embeddings) if pca is not None else None
    return assemble_features(facts, pcs, prediction_features(proba, model.classes)), embeddings


def serving_side_features(rows: pd.DataFrame, pca: EmbeddingPCA | None, champion_version: str | None) -> SideFeatures:
    """Features from the request log: facts and predictions as logged, embeddings when the champion logged them."""
    notes = []
    facts = fact_features(rows)
    predictions = rows[[PREDICTED_CLASS, CONFIDENCE]].reset_index(drop=True)
    pcs = None
    if pca is not None:
        served_by = set(rows["model_version"].astype(str)) if "model_version" in rows.columns else set()
        if "embedding" not in rows.columns or not rows["embedding"].notna().all():
            notes.append("serving log has no embeddings for every request: embedding drift skipped")
        elif served_by != {str(champion_version)}:
            notes.append(
                f"requests were served by model versions {sorted(served_by)}, not only the champion "
                f"{champion_version}: their embeddings are not comparable, embedding drift skipped"
            )
        else:
            pcs = pca.transform(np.stack([np.asarray(e, dtype=np.float64) for e in rows["embedding"]]))
    return SideFeatures(assemble_features(facts, pcs, predictions), notes)


def reference_cache_key(task: str, champion: Champion, rows: pd.DataFrame, t: DriftThresholds) -> str:
    digest = hashlib.sha256(
        json.dumps([champion.run_id, t.pca_components, sorted(rows["sha256"])]).encode()
    ).hexdigest()[:16]
    return f"{REFERENCE_CACHE_PREFIX}/{task}/{champion.run_id}/{digest}"


def reference_features(
    store: ObjectStore,
    task: str,
    rows: pd.DataFrame,
    champion: Champion | None,
    model: ImageModel | None,
    settings: Settings,
) -> tuple[pd.DataFrame, EmbeddingPCA | None]:
    """Reference features; with a champion, cached in S3 together with the PCA fitted on them."""
    images = lambda r: decode_rows(store, r, settings)  # noqa: E731 - bound adapter
    if champion is None or model is None:
        return image_side_features(rows, images, None, None)[0], None
    base = reference_cache_key(task, champion, rows, settings.drift)
    if store.exists(f"{base}/pca.json") and store.exists(f"{base}/features.parquet"):
        return store.get_parquet(f"{base}/features.parquet"), EmbeddingPCA.from_dict(store.get_json(f"{base}/pca.json"))
    features, embeddings = image_side_features(rows, images, model, None)
    pca = EmbeddingPCA.fit(embeddings, settings.drift.pca_components)
    features = assemble_features(features, pca.transform(embeddings))
    store.put_json(f"{base}/pca.json", pca.to_dict())
    store.put_parquet(f"{base}/features.parquet", features)  # written last: the pair is complete
    return features, pca


# -- publishing -------------------------------------------------------------------------------------


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


def report_documents(result: DriftResult, meta: dict[str, Any], retrain: bool) -> tuple[str, dict[str, Any]]:
    """The standalone HTML page and the JSON document of one report."""
    page = report_page(result.snapshot.get_html_str(as_iframe=False), result.summary, meta, retrain)
    body = {
        "meta": meta,
        "summary": result.summary.to_dict(),
        "retrain_recommended": retrain,
        "evidently": json.loads(result.snapshot.json()),
    }
    return page, body


def index_entry(meta: dict[str, Any], summary: DriftSummary, retrain: bool, run_date: date) -> dict[str, Any]:
    html_key, json_key = report_keys(run_date, meta["report_id"])
    return {
        "date": run_date.isoformat(),
        "created": meta["created"],
        "report_id": meta["report_id"],
        "task": meta["task"],
        "reference": meta["reference"],
        "current": meta["current"],
        "html_key": html_key,
        "json_key": json_key,
        "drift_detected": summary.drift_detected,
        "drift_share": summary.drift_share,
        "embedding_drift": summary.embedding_drift,
        "retrain_recommended": retrain,
    }


def publish(store: ObjectStore, page: str, body: dict[str, Any], entry: dict[str, Any]) -> tuple[str, str]:
    """Write the report HTML + JSON under reports/drift/<date>/<id>, then update the index (last)."""
    store.put_text(entry["html_key"], page)
    store.put_json(entry["json_key"], body)
    index_key = f"{REPORT_PREFIX}/index.json"
    entries = upsert_index(store.get_json(index_key) if store.exists(index_key) else [], entry)
    store.put_json(index_key, entries)
    store.put_text(f"{REPORT_PREFIX}/index.html", index_page(entries))
    return store.uri(entry["html_key"]), store.uri(entry["json_key"])


def default_report_id(task: str, reference: str, current: str, champion: Champion | None, shas: Sequence[str]) -> str:
    """Same inputs, same id: a rerun overwrites its own report instead of adding a copy."""
    parts = [task, reference, current, champion.run_id if champion else None, sorted(shas)]
    return f"{task}-{hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:12]}"


@dataclass(frozen=True)
class DriftInputs:
    """Both sides as feature frames, with what identifies them."""

    reference: Spec
    current: Spec
    champion: Champion | None
    reference_features: pd.DataFrame
    current_features: pd.DataFrame
    current_identity: list[str]
    notes: list[str]


def gather(task: str, reference: str, current: str, settings: Settings, store: ObjectStore) -> DriftInputs:
    """Resolve both specs, sample their rows and build their features (with the champion when there is one)."""
    from pipelines.core.taxonomy import get_task

    get_task(task)
    ref_spec = parse_spec(reference, _REFERENCE_KINDS, "reference")
    cur_spec = parse_spec(current, _CURRENT_KINDS, "current")
    champion = find_champion(settings, task)
    notes = [] if champion else [f"no champion for task {task!r}: embedding and prediction features skipped"]
    model = _load_model(champion.model_uri) if champion else None
    ref_rows = sample_rows(spec_rows(ref_spec, task, store, champion), settings.drift.max_rows)
    cur_rows = sample_rows(spec_rows(cur_spec, task, store, champion), settings.drift.max_rows)
    for spec, rows in ((ref_spec, ref_rows), (cur_spec, cur_rows)):
        if rows.empty:
            raise DriftError(f"{spec} has no rows for task {task!r}")
    ref_features, pca = reference_features(store, task, ref_rows, champion, model, settings)
    if cur_spec.kind == "serving":
        side = serving_side_features(cur_rows, pca, champion.version if champion else None)
        cur_features, notes = side.features, notes + side.notes
    else:
        images = lambda r: decode_rows(store, r, settings)  # noqa: E731 - bound adapter
        features, embeddings = image_side_features(cur_rows, images, model, None)
        cur_features = assemble_features(features, pca.transform(embeddings)) if pca is not None else features
    identity = list(cur_rows["sha256"] if "sha256" in cur_rows.columns else cur_rows["request_id"])
    return DriftInputs(ref_spec, cur_spec, champion, ref_features, cur_features, identity, notes)


def report_meta(task: str, inputs: DriftInputs, report_id: str | None) -> dict[str, Any]:
    """What identifies a report; ``created`` only orders same-day reports in the index."""
    from datetime import UTC, datetime

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


def _load_model(model_uri: str) -> ImageModel:
    from pipelines.io.tracking import load_model

    return load_model(model_uri)


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
        "drift/report.html": page.encode(),
        "drift/report.json": json.dumps(body, default=str).encode(),
    }
    return log_drift_run(settings, f"drift-{meta['report_id']}", tags, metrics, artifacts)
