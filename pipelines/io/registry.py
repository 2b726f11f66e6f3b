"""MLflow model-registry adapter: versions of ``leukops-<task>``, the aliases that point at them, audit tags.

One registered model per task; promotion state lives only in the aliases ``@champion``, ``@previous`` and
``@challenger`` (never stages). MLflow sets or deletes one alias per call, so a multi-alias move cannot
be atomic; :meth:`Registry.move_aliases` makes it safe instead: every target version is checked to
exist and be READY before anything moves, ``@champion`` only ever changes in one call from one valid
version to another, the result is read back and compared, and on any error every alias is restored to
its previous value (champion first). Who/when/why of each move is written as an ``audit.<n>`` tag on
every version whose aliases changed.
"""

from __future__ import annotations

import functools
import json
import logging
import posixpath
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from pipelines.core.errors import LeukopsError
from pipelines.core.settings import Settings
from pipelines.io.layout import (
    MODEL_ARTIFACT_PATH,
    logged_model_uri,
    registered_version_uri,
    run_artifact_uri,
    run_model_uri,
)
from pipelines.io.mlflow_access import login
from pipelines.io.search_filter import quoted

log = logging.getLogger(__name__)

ALIASES = ("champion", "previous", "challenger")
AUDIT_PREFIX = "audit."
GATE_TAG_PREFIX = "gate."  # the promotion gate's version tags (pipelines.trust.promote.version_tags)
_RESTORE_ORDER = ("champion", "previous", "challenger")  # champion first: it is what serving reads


class RegistryError(LeukopsError):
    pass


@dataclass(frozen=True)
class RunRecord:
    run_id: str
    experiment_id: str
    artifact_uri: str
    metrics: dict[str, float]
    params: dict[str, str]
    tags: dict[str, str]


def run_record(run) -> RunRecord:
    """The facts of an MLflow ``Run`` that leukops reads, as plain dicts."""
    return RunRecord(
        run_id=run.info.run_id,
        experiment_id=run.info.experiment_id,
        artifact_uri=run.info.artifact_uri,
        metrics=dict(run.data.metrics),
        params=dict(run.data.params),
        tags=dict(run.data.tags),
    )


@dataclass(frozen=True)
class VersionRecord:
    name: str
    version: str
    run_id: str | None
    source: str
    status: str
    created_ms: int
    aliases: tuple[str, ...]
    tags: dict[str, str]
    description: str

    @property
    def model_uri(self) -> str:
        """The version's canonical model: its training run's bundle (the registry copy if it has no run)."""
        return run_model_uri(self.run_id) if self.run_id else registered_version_uri(self.name, self.version)

    @property
    def audit(self) -> list[dict[str, Any]]:
        keys = sorted(k for k in self.tags if k.startswith(AUDIT_PREFIX))
        return [json.loads(self.tags[k]) for k in keys]


def _version_record(mv: ModelVersion) -> VersionRecord:
    return VersionRecord(
        name=mv.name,
        version=str(mv.version),
        run_id=mv.run_id,
        source=mv.source,
        status=str(mv.status),
        created_ms=int(mv.creation_timestamp or 0),
        aliases=tuple(mv.aliases or ()),
        tags=dict(mv.tags or {}),
        description=mv.description or "",
    )


def _is_missing(err: MlflowException) -> bool:
    return err.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")


T = TypeVar("T")


def _translated(method: Callable[..., T]) -> Callable[..., T]:
    """MLflow errors left unhandled by ``method`` become RegistryErrors naming the server and the call."""

    @functools.wraps(method)
    def wrapper(self: Registry, *args: Any, **kwargs: Any) -> T:
        try:
            return method(self, *args, **kwargs)
        except MlflowException as err:
            uri = self.settings.mlflow_tracking_uri
            target = f"({args[0]!r})" if args else ""  # the task or run id, never a whole record
            raise RegistryError(f"MLflow at {uri}: {method.__name__}{target} failed: {err.message}") from err

    return wrapper


class Registry:
    """The registry of one MLflow server; every method names the model/version/run it touched on error."""

    def __init__(self, client: MlflowClient, settings: Settings):
        self.client = client
        self.settings = settings

    @classmethod
    def from_settings(cls, settings: Settings) -> Registry:
        login(settings)
        uri = settings.mlflow_tracking_uri
        return cls(MlflowClient(tracking_uri=uri, registry_uri=uri), settings)

    def model_name(self, task: str) -> str:
        return self.settings.registered_model_name(task)

    # --- runs -------------------------------------------------------------------------------------

    @_translated
    def read_run(self, run_id: str) -> RunRecord:
        try:
            run = self.client.get_run(run_id)
        except MlflowException as err:
            if _is_missing(err):
                raise RegistryError(f"MLflow run {run_id!r} not found at {self.settings.mlflow_tracking_uri}") from err
            raise
        return run_record(run)

    @_translated
    def log_text(self, run_id: str, text: str, artifact_file: str) -> str:
        """Store ``text`` as an artifact of the run; returns its run-artifact URI (``layout.run_artifact_uri``)."""
        self.client.log_text(run_id, text, artifact_file)
        return run_artifact_uri(run_id, artifact_file)

    @_translated
    def read_text(self, run_id: str, artifact_file: str) -> str | None:
        """The text artifact ``artifact_file`` of the run; None when the run has none there."""
        folder = posixpath.dirname(artifact_file) or None
        if artifact_file not in {a.path for a in self.client.list_artifacts(run_id, folder)}:
            return None
        with tempfile.TemporaryDirectory() as tmp:
            return Path(self.client.download_artifacts(run_id, artifact_file, tmp)).read_text()

    @_translated
    def set_run_tags(self, run_id: str, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(run_id, key, value)

    @_translated
    def list_artifacts(self, run_id: str, path: str) -> list[str]:
        """Files under ``path`` of the run's artifacts, at any depth."""
        files = []
        for artifact in self.client.list_artifacts(run_id, path):
            files += self.list_artifacts(run_id, artifact.path) if artifact.is_dir else [artifact.path]
        return files

    # --- versions ---------------------------------------------------------------------------------

    @_translated
    def aliases(self, task: str) -> dict[str, str]:
        """alias -> version of the task's registered model ({} when it has never been registered)."""
        try:
            model = self.client.get_registered_model(self.model_name(task))
        except MlflowException as err:
            if _is_missing(err):
                return {}
            raise
        return {alias: str(version) for alias, version in (model.aliases or {}).items()}

    @_translated
    def version(self, task: str, version: str) -> VersionRecord:
        name = self.model_name(task)
        try:
            return _version_record(self.client.get_model_version(name, str(version)))
        except MlflowException as err:
            if _is_missing(err):
                raise RegistryError(f"{name} has no version {version}") from err
            raise

    @_translated
    def versions(self, task: str) -> list[VersionRecord]:
        name = self.model_name(task)
        found = self.client.search_model_versions(f"name = {quoted(name)}", max_results=10_000)
        return sorted((_version_record(mv) for mv in found), key=lambda v: int(v.version))

    def at_alias(self, task: str, alias: str) -> VersionRecord | None:
        """The version ``@alias`` points to, or None while the alias is unset."""
        version = self.aliases(task).get(alias)
        return None if version is None else self.version(task, version)

    def champion(self, task: str) -> VersionRecord | None:
        """The version ``@champion`` points to, or None before the first promotion: the one champion lookup."""
        return self.at_alias(task, "champion")

    def version_for_run(self, task: str, run_id: str) -> VersionRecord | None:
        return next((v for v in self.versions(task) if v.run_id == run_id), None)

    @_translated
    def register(self, task: str, run: RunRecord, tags: dict[str, str], description: str) -> VersionRecord:
        """The run's ``model`` as a version of ``leukops-<task>`` (the existing one if already registered)."""
        name = self.model_name(task)
        self._ensure_model(task)
        existing = self.version_for_run(task, run.run_id)
        if existing is not None:  # re-gated: the new gate's tags replace the old gate's (audit tags stay)
            for stale in sorted(k for k in existing.tags if k.startswith(GATE_TAG_PREFIX) and k not in tags):
                self.client.delete_model_version_tag(name, existing.version, stale)
            self.tag_version(task, existing.version, tags)
            self.client.update_model_version(name, existing.version, description=description)
            return self.version(task, existing.version)
        source, model_id = self._model_source(run)
        mv = self.client.create_model_version(
            name, source, run_id=run.run_id, tags=tags, description=description, model_id=model_id
        )
        if str(mv.status) != "READY":
            raise RegistryError(f"{name} version {mv.version} is {mv.status}, not READY: {mv.status_message}")
        return _version_record(mv)

    @_translated
    def tag_version(self, task: str, version: str, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_model_version_tag(self.model_name(task), str(version), key, value)

    def _ensure_model(self, task: str) -> None:
        try:
            self.client.create_registered_model(
                self.model_name(task),
                description=f"leukops {task!r} classifier; aliases: {', '.join(ALIASES)}",
            )
        except MlflowException as err:
            if err.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                raise

    def _model_source(self, run: RunRecord) -> tuple[str, str | None]:
        """Where the run's canonical model lives: its MLflow 3 logged model, else run artifacts ``model/``.

        The logged model comes first: MLflow 3's ``list_artifacts(run, "model")`` also lists a logged
        model's files, while the run-artifact path it suggests holds nothing to load.
        """
        logged = self.client.search_logged_models(
            [run.experiment_id], filter_string=f"name = {quoted(MODEL_ARTIFACT_PATH)}"
        )
        mine = [m for m in logged if m.source_run_id == run.run_id]
        if mine:
            return logged_model_uri(mine[-1].model_id), mine[-1].model_id
        if self.client.list_artifacts(run.run_id, MODEL_ARTIFACT_PATH):
            return f"{run.artifact_uri}/{MODEL_ARTIFACT_PATH}", None
        raise RegistryError(f"run {run.run_id} has no model at artifact path {MODEL_ARTIFACT_PATH!r}")

    # --- aliases ----------------------------------------------------------------------------------

    @_translated
    def move_aliases(self, task: str, moves: Iterable[tuple[str, str | None]], audit: dict[str, str]) -> dict[str, str]:
        """Apply (alias, version-or-None-to-delete) moves in order, verified, restored on any error.

        ``audit`` (action, who, why) is written with the time and the before/after aliases as an
        ``audit.<n>`` tag on each version whose aliases changed. Returns the aliases after the move.
        """
        moves = list(moves)
        name = self.model_name(task)
        for alias, version in moves:
            if alias not in ALIASES:
                raise RegistryError(f"unknown alias {alias!r} for {name}; use one of {', '.join(ALIASES)}")
            if version is not None:
                self._require_ready(task, version)
        before = self.aliases(task)
        expected = dict(before)
        for alias, version in moves:
            if version is None:
                expected.pop(alias, None)
            else:
                expected[alias] = str(version)
        try:
            for alias, version in moves:
                self._apply(name, alias, version, before)
            after = self.aliases(task)
            if after != expected:
                raise RegistryError(f"{name} aliases read back as {after}, expected {expected}")
        except Exception as err:
            restored = self._restore(task, before)
            raise RegistryError(f"moving aliases of {name} failed ({err}); {restored}") from err
        try:  # the aliases have moved and been verified: a failed audit tag must not report a failed move
            self.write_audit(task, before, after, audit)
        except Exception as err:  # noqa: BLE001 - logged; the move itself stands
            log.warning("aliases of %s moved to %s, but the audit tag was not written: %s", name, after, err)
        return after

    def _require_ready(self, task: str, version: str) -> None:
        record = self.version(task, version)
        if record.status != "READY":
            raise RegistryError(f"{record.name} version {version} is {record.status}; only READY versions get aliases")

    def _apply(self, name: str, alias: str, version: str | None, before: dict[str, str]) -> None:
        if version is not None:
            self.client.set_registered_model_alias(name, alias, str(version))
        elif alias in before:
            self.client.delete_registered_model_alias(name, alias)

    def _restore(self, task: str, before: dict[str, str]) -> str:
        """Put every alias back to ``before`` (champion first); says what could not be restored."""
        name = self.model_name(task)
        failures = []
        for alias in _RESTORE_ORDER:
            try:
                current = self.aliases(task).get(alias)
                if before.get(alias) == current:
                    continue
                if alias in before:
                    self.client.set_registered_model_alias(name, alias, before[alias])
                else:
                    self.client.delete_registered_model_alias(name, alias)
            except Exception as err:  # keep restoring the others; report every alias left behind
                failures.append(f"@{alias} ({err})")
        return f"restore failed for {', '.join(failures)}" if failures else f"restored aliases to {before}"

    def write_audit(self, task: str, before: dict[str, str], after: dict[str, str], audit: dict[str, str]) -> None:
        """One ``audit.<n>`` tag (``audit`` + when + before/after) on every version whose aliases changed."""
        record = {
            **audit,
            "when": datetime.now(UTC).isoformat(timespec="seconds"),
            "before": before,
            "after": after,
        }
        changed = {v for a in ALIASES if before.get(a) != after.get(a) for v in (before.get(a), after.get(a)) if v}
        for version in sorted(changed, key=int):
            seq = len(self.version(task, version).audit) + 1
            self.tag_version(task, version, {f"{AUDIT_PREFIX}{seq:04d}": json.dumps(record, sort_keys=True)})
