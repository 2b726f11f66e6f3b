"""Great Expectations 1.x on a batch manifest: accepted / rejected rows, or a quarantined batch.

The suite lives in ``expectations/suites/<name>.json`` (versioned in git, its ``meta.version`` part of
every batch id). Each row-level expectation carries a ``reason`` (or ``reason_column``) and a
``message`` template in its meta, so a failing row is rejected with a short code and a sentence that
names the value. A failing ``level: batch`` expectation, or a rejected share above the suite's
``max_rejected_share``, quarantines the whole batch. ``validate_and_report`` also renders GX Data Docs
and uploads them, with the result JSON, under a report prefix (``layout.validation_report_prefix``).
"""

from __future__ import annotations

import importlib
import json
import logging
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.core.errors import LeukopsError
from pipelines.io import layout

if TYPE_CHECKING:
    import pandas as pd

    from pipelines.core.settings import Settings
    from pipelines.data.sources import Source
    from pipelines.io.storage import ObjectStore

DOCS_SITE = "leukops"


class SuiteError(LeukopsError):
    """The expectation suite file is missing or invalid."""


@dataclass(frozen=True)
class Suite:
    name: str
    version: str
    max_rejected_share: float
    spec: dict[str, Any]  # the suite JSON as stored
    path: Path


@dataclass(frozen=True)
class Validation:
    frame: pd.DataFrame  # the manifest with status, reason, detail filled in
    quarantine_reasons: list[str]  # empty when the batch is accepted
    rejected_share: float
    result: dict[str, Any]  # the GX validation result, JSON-ready
    suite_version: str

    @property
    def quarantined(self) -> bool:
        return bool(self.quarantine_reasons)


def load_suite(settings: Settings, name: str = "image_batch") -> Suite:
    path = Path(settings.suite_dir) / "suites" / f"{name}.json"
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SuiteError(f"expectation suite {path} does not exist") from None
    except json.JSONDecodeError as err:
        raise SuiteError(f"{path}: not valid JSON: {err}") from None
    meta = spec.get("meta") or {}
    if "version" not in meta or not spec.get("expectations"):
        raise SuiteError(f"{path}: needs meta.version and a non-empty expectations list")
    return Suite(spec.get("name", name), str(meta["version"]), float(meta.get("max_rejected_share", 0.5)), spec, path)


_preload_lock = threading.Lock()
_preloads: list[threading.Thread] = []


def preload_gx() -> threading.Thread:
    """Import great_expectations in the background (seconds of work), once per process; a later import
    waits for it. Cheap to call again (ingest calls it for every new file it finds)."""
    with _preload_lock:
        if not _preloads:
            thread = threading.Thread(target=importlib.import_module, args=("great_expectations",), daemon=True)
            thread.start()
            _preloads.append(thread)
        return _preloads[0]


def _gx_suite(suite: Suite):
    import great_expectations as gx

    built = gx.ExpectationSuite(
        name=f"{suite.name}-v{suite.version}",
        expectations=[dict(e) for e in suite.spec["expectations"]],
        meta=dict(suite.spec.get("meta") or {}),
    )
    if len(built.expectations) != len(suite.spec["expectations"]):
        # GX logs and drops invalid expectation configs; a silently shorter suite would accept bad data
        dropped = len(suite.spec["expectations"]) - len(built.expectations)
        raise SuiteError(f"{suite.path}: {dropped} invalid expectation(s); see the GX log above")
    return built


def run_suite(frame: pd.DataFrame, suite: Suite, label_set: list[str], docs_dir: Path | None, run_name: str):
    """Run the suite through an ephemeral GX context (pandas datasource), building Data Docs if asked."""
    import great_expectations as gx
    from great_expectations.core.run_identifier import RunIdentifier
    from great_expectations.data_context.types.base import ProgressBarsConfig

    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    actions = []
    if docs_dir is not None:
        context.add_data_docs_site(
            DOCS_SITE,
            {
                "class_name": "SiteBuilder",
                "store_backend": {
                    "class_name": "TupleFilesystemStoreBackend",
                    "base_directory": str(docs_dir),
                },
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            },
        )
        actions.append(gx.checkpoint.UpdateDataDocsAction(name="data_docs", site_names=[DOCS_SITE]))
    asset = context.data_sources.add_pandas("leukops").add_dataframe_asset("batch_manifest")
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(
            name=run_name,
            data=asset.add_batch_definition_whole_dataframe("whole_manifest"),
            suite=context.suites.add(_gx_suite(suite)),
        )
    )
    checkpoint = context.checkpoints.add(
        gx.Checkpoint(
            name=f"ingest-{run_name}",
            validation_definitions=[definition],
            actions=actions,
            result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["row"]},
        )
    )
    outcome = checkpoint.run(
        batch_parameters={"dataframe": frame},
        expectation_parameters={"label_set": label_set},
        run_id=RunIdentifier(run_name=run_name),
    )
    return next(iter(outcome.run_results.values()))


def _message(template: str, row: dict[str, Any]) -> str:
    try:
        return template.format_map(row)
    except (KeyError, ValueError, TypeError, IndexError):
        return template


def row_reasons(frame: pd.DataFrame, gx_result) -> tuple[dict[int, list[tuple[str, str]]], list[str]]:
    """(row → [(reason, message)] in suite order, batch-level failures) from a GX validation result."""
    indexed = frame.set_index("row", drop=False)
    rows: dict[int, dict[str, Any]] = {}  # only failing rows are turned into dicts: a batch is mostly good

    def row_of(number: int) -> dict[str, Any]:
        if number not in rows:
            rows[number] = indexed.loc[number].to_dict()
        return rows[number]

    per_row: dict[int, list[tuple[str, str]]] = {}
    batch_failures = []
    for item in gx_result.results:
        if item.success:
            continue
        config = item.expectation_config
        meta = config.meta or {}
        if item.exception_info and item.exception_info.get("raised_exception"):
            batch_failures.append(f"{config.type} could not run: {item.exception_info.get('exception_message')}")
            continue
        if meta.get("level") == "batch":
            batch_failures.append(f"{meta.get('reason', config.type)}: {meta.get('message', config.type)}")
            continue
        for hit in item.result.get("unexpected_index_list") or []:
            row = row_of(int(hit["row"]))
            reason = str(row[meta["reason_column"]]) if "reason_column" in meta else meta.get("reason", config.type)
            per_row.setdefault(int(hit["row"]), []).append((reason, _message(meta.get("message", ""), row)))
    return per_row, batch_failures


def apply_reasons(frame: pd.DataFrame, per_row: dict[int, list[tuple[str, str]]]) -> pd.DataFrame:
    """status / reason (first failure in suite order) / detail (every failure) per row."""
    out = frame.copy()
    found = [per_row.get(int(r), []) for r in out["row"]]
    out["status"] = ["rejected" if f else "accepted" for f in found]
    out["reason"] = [f[0][0] if f else None for f in found]
    out["detail"] = ["; ".join(dict.fromkeys(m for _, m in f)) if f else None for f in found]
    return out


def validate_manifest(
    frame: pd.DataFrame,
    suite: Suite,
    label_set: list[str],
    *,
    docs_dir: Path | None = None,
    run_name: str = "batch",
) -> Validation:
    gx_result = run_suite(frame, suite, label_set, docs_dir, run_name)
    per_row, batch_failures = row_reasons(frame, gx_result)
    judged = apply_reasons(frame, per_row)
    share = float((judged["status"] == "rejected").mean()) if len(judged) else 0.0
    reasons = list(batch_failures)
    if share > suite.max_rejected_share:
        reasons.append(
            f"rejected_share: {share:.0%} of files rejected, above the suite's {suite.max_rejected_share:.0%} limit"
        )
    return Validation(judged, reasons, share, gx_result.to_json_dict(), suite.version)


def batch_summary(validation: Validation, source: Source, batch_id: str) -> dict[str, Any]:
    """The verdict on a batch in a few numbers: kept with its reports and its quarantine records."""
    frame = validation.frame
    return {
        "source": source.name,
        "batch_id": batch_id,
        "suite_version": validation.suite_version,
        "accepted": int((frame["status"] == "accepted").sum()),
        "rejected": int((frame["status"] == "rejected").sum()),
        "rejected_share": validation.rejected_share,
        "quarantine_reasons": validation.quarantine_reasons,
        "gx_success": validation.result.get("success"),
    }


def _upload_docs(store: ObjectStore, docs_dir: Path, prefix: str, pool: ThreadPoolExecutor) -> str:
    def upload(path: Path) -> str:
        return store.put_bytes(layout.data_docs_key(prefix, path.relative_to(docs_dir).as_posix()), path.read_bytes())

    list(pool.map(upload, [p for p in docs_dir.rglob("*") if p.is_file()]))
    return store.uri(layout.data_docs_key(prefix))


def validate_and_report(
    store: ObjectStore,
    frame: pd.DataFrame,
    source: Source,
    suite: Suite,
    batch_id: str,
    report_prefix: str,
    pool: ThreadPoolExecutor,
) -> tuple[Validation, str, str]:
    """GX suite on the manifest; (validation, Data Docs URI, result URI), both uploaded under ``report_prefix``."""
    with tempfile.TemporaryDirectory(prefix="leukops-gx-") as tmp:
        validation = validate_manifest(
            frame, suite, list(source.canonical_classes), docs_dir=Path(tmp), run_name=batch_id
        )
        docs = _upload_docs(store, Path(tmp), report_prefix, pool)
    result_uri = store.put_json(
        layout.validation_result_key(report_prefix),
        {**batch_summary(validation, source, batch_id), "gx": validation.result},
    )
    return validation, docs, result_uri
