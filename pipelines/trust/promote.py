"""Promotion, selection, sign-off and rollback of trained runs; the gate report and model card they leave.

``promote_run`` reads a training run's metrics, gathers the per-image test predictions of the candidate
and of the task's ``@champion`` on the SAME (the candidate's) test images (``pipelines.trust.evidence``:
cached run artifacts, else forward passes), gates the candidate on one-sided bounds, stores the gate
report (JSON + markdown) with the candidate's run, registers the run as a version of ``leukops-<task>``
tagged with the gate's key results, and moves aliases as the very last step:

- passed → ``@champion`` (the old champion becomes ``@previous``); with ``require_approval`` it waits as
  ``@challenger`` until ``approve``;
- failed but passed every value check → ``@challenger``; otherwise no alias.

A refused candidate is still registered, so the registry holds every gate result (``list_models``).
The model card of a passed version is ``pipelines.trust.model_card``'s. Whatever makes a version
``@champion`` (promote, approve, rollback) first signs it with a new promotion sequence number
(``pipelines.trust.attestation``: stored, read back and verified before any alias moves); serving loads
only the newest signed version.

Each entry point holds the model's promotion lease (``trust/journal.promotion_lease``) from its first read
of the aliases to its last move: two promotions of one model at once run in turn (the second is gated
against the first's outcome), or the second fails naming the holder after ``PROMOTION_WAIT_S``.
"""

from __future__ import annotations

import getpass
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

from pipelines.core.errors import LeukopsError
from pipelines.core.settings import Settings, get_settings
from pipelines.io.layout import GATE_REPORT_JSON, GATE_REPORT_MD
from pipelines.io.registry import Registry, RunRecord, VersionRecord
from pipelines.trust.attestation import attest
from pipelines.trust.evidence import candidate_metrics as evidence_metrics
from pipelines.trust.evidence import holdout_figures, holdout_sources, required_tag, test_predictions
from pipelines.trust.gate import CandidateMetrics, GateDecision, decide
from pipelines.trust.journal import finish_unfinished, journaled_move, promotion_lease
from pipelines.trust.model_card import write_model_card

if TYPE_CHECKING:
    from pipelines.io.storage import ObjectStore

KEY_CHECKS = ("macro_f1", "non_inferiority", "nucleus_enrichment", "shortcut_flip_rate")


class PromotionError(LeukopsError):
    pass


@dataclass(frozen=True)
class Promotion:
    run_id: str
    task: str
    version: str
    decision: GateDecision
    aliases: tuple[str, ...]
    report_uri: str
    model_card_uri: str | None
    attestation_sequence: int | None = None  # the promotion it was signed as (None: not made champion)

    @property
    def promoted(self) -> bool:
        return "champion" in self.aliases

    def to_dict(self) -> dict[str, Any]:
        checks = [asdict(c) for c in self.decision.checks]
        return {
            "promoted": self.promoted,
            "version": int(self.version),
            "aliases": list(self.aliases),
            "checks": checks,
            # JSON's own types: Airflow's XCom serde would turn a tuple into a {"__classname__": ...} object
            "sites": json.loads(json.dumps([asdict(site) for site in self.decision.sites])),
            "passed": self.decision.passed,
            "failed": self.decision.failed,
            "awaiting_approval": self.decision.passed and not self.promoted,
            "run_id": self.run_id,
            "task": self.task,
            "champion_before": self.decision.champion,
            "gate_report": self.report_uri,
            "model_card": self.model_card_uri,
            "attestation_sequence": self.attestation_sequence,
        }


# --- pure pieces ------------------------------------------------------------------------------------


def version_tags(decision: GateDecision, report_uri: str) -> dict[str, str]:
    """The gate's key results as registry version tags (strings, short enough for MLflow's limits):
    ``gate.<check>`` the estimate, ``gate.<check>.bound`` the judged bound, ``gate.<check>.n`` its images."""
    checks = {c.name: c for c in decision.checks}
    tags = {
        "gate.passed": str(decision.passed).lower(),
        "gate.passed_value_checks": str(decision.passed_value_checks).lower(),
        "gate.failed": ",".join(decision.failed),
        "gate.report": report_uri,
        "gate.dataset_version": decision.dataset_version,
        "gate.champion_version": (decision.champion or {}).get("version") or "",
    }
    for name in KEY_CHECKS:
        check = checks.get(name)
        if check is not None and check.value is not None:
            tags[f"gate.{name}.bound"] = f"{check.value:.4f}"
            if check.point is not None:
                tags[f"gate.{name}"] = f"{check.point:.4f}"
            if check.n is not None:
                tags[f"gate.{name}.n"] = str(check.n)
    return tags


def version_description(decision: GateDecision, report_uri: str, ui_url: str) -> str:
    verdict = "passed" if decision.passed else f"refused ({', '.join(decision.failed)})"
    key = ", ".join(
        f"{c.name}={_fmt(c.point)} (bound {_fmt(c.value)}, n={c.n})" for c in decision.checks if c.name in KEY_CHECKS
    )
    return (
        f"Gate {verdict} on the test split of dataset {decision.dataset_version}: {key}. "
        f"Gate report: {report_uri} ({ui_url})"
    )


def promotion_moves(aliases: dict[str, str], version: str, approval_required: bool) -> list[tuple[str, str | None]]:
    """Alias moves that make ``version`` champion (or challenger awaiting sign-off), champion always valid.

    @previous is set before @champion so that at every instant @champion names a real version: first
    the old one, then in one MLflow call the new one.
    """
    if approval_required:
        return [("challenger", version)]
    moves: list[tuple[str, str | None]] = []
    if aliases.get("champion"):
        moves.append(("previous", aliases["champion"]))
    moves.append(("champion", version))
    if aliases.get("challenger") == version:
        moves.append(("challenger", None))
    return moves


def gate_moves(
    decision: GateDecision, aliases: dict[str, str], version: str, approval_required: bool
) -> list[tuple[str, str | None]]:
    """Passed: champion (or challenger awaiting sign-off); value checks only: challenger; else nothing."""
    if decision.passed:
        return promotion_moves(aliases, version, approval_required)
    if decision.passed_value_checks:
        return [("challenger", version)]
    return []


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


# --- adapters -----------------------------------------------------------------------------------------


def _actor(settings: Settings) -> str:
    return settings.actor or getpass.getuser()


def _ui_url(settings: Settings, run: RunRecord, artifact: str) -> str:
    base = settings.mlflow_tracking_uri.rstrip("/")
    return f"{base}/#/experiments/{run.experiment_id}/runs/{run.run_id}/artifacts/{artifact}"


def _champion_metrics(
    registry: Registry, settings: Settings, store: ObjectStore, champion: VersionRecord, candidate: CandidateMetrics
) -> CandidateMetrics:
    """The champion predicted on the candidate's test images (its cache when it was gated on them)."""
    if not champion.run_id:
        raise PromotionError(f"{champion.name} v{champion.version} (@champion) has no training run to compare with")
    run = registry.read_run(champion.run_id)
    test = test_predictions(registry, settings, store, run.run_id, candidate.task, candidate.dataset_version)
    champ = evidence_metrics(run, test, version=champion.version)
    origin = "logged" if champ.dataset_version == candidate.dataset_version else "re-evaluated"
    return replace(champ, dataset_version=candidate.dataset_version, origin=origin)


def _gate(registry: Registry, settings: Settings, run: RunRecord) -> tuple[CandidateMetrics, GateDecision]:
    from pipelines.io.storage import ObjectStore

    store = ObjectStore.from_settings(settings)
    task, dataset_version = required_tag(run, "task"), required_tag(run, "dataset_version")
    finish_unfinished(registry, store, task, by="promote")  # a half move of an earlier one: gate vs its end
    champion = registry.champion(task)
    if champion is not None and champion.run_id == run.run_id:
        raise PromotionError(f"run {run.run_id} is already @champion ({champion.name} v{champion.version})")
    test = test_predictions(registry, settings, store, run.run_id, task, dataset_version)
    candidate = evidence_metrics(run, test, holdout_figures(run, holdout_sources(settings, task)))
    if champion is None:
        return candidate, decide(candidate, None, settings.gate)
    champ = _champion_metrics(registry, settings, store, champion, candidate)
    return candidate, decide(candidate, champ, settings.gate)


def _attest_champion(
    registry: Registry, settings: Settings, task: str, moves: list[tuple[str, str | None]], action: str, why: str
) -> int | None:
    """Sign the version the moves make @champion (before they run); its sequence, None if none becomes it."""
    target = dict(moves).get("champion")
    if target is None:
        return None
    return attest(registry, settings, task, target, action, why, _actor(settings)).sequence


def _journaled(
    registry: Registry, settings: Settings, task: str, moves: list[tuple[str, str | None]], audit: dict[str, str]
) -> dict[str, str]:
    """The alias moves, announced in the promotion journal first (a half move is ended by the next one)."""
    from pipelines.io.storage import ObjectStore

    return journaled_move(registry, ObjectStore.from_settings(settings), task, moves, audit)


def _finish_unfinished(registry: Registry, settings: Settings, task: str, by: str) -> None:
    from pipelines.io.storage import ObjectStore

    finish_unfinished(registry, ObjectStore.from_settings(settings), task, by)


@contextmanager
def _exclusive(registry: Registry, settings: Settings, task: str) -> Iterator[None]:
    """The body alone moves the task's aliases (other promote/approve/rollback/repair of it wait)."""
    from pipelines.io.storage import ObjectStore

    with promotion_lease(ObjectStore.from_settings(settings), registry.model_name(task)):
        yield


def _store_reports(registry: Registry, run: RunRecord, decision: GateDecision) -> str:
    registry.log_text(run.run_id, decision.to_markdown(), GATE_REPORT_MD)
    return registry.log_text(run.run_id, decision.to_json(), GATE_REPORT_JSON)


def _promote_one(registry: Registry, settings: Settings, run: RunRecord, reason: str) -> Promotion:
    candidate, decision = _gate(registry, settings, run)
    task = candidate.task
    report_uri = _store_reports(registry, run, decision)
    description = version_description(decision, report_uri, _ui_url(settings, run, GATE_REPORT_MD))
    tags = version_tags(decision, report_uri) | {"gate.by": _actor(settings), "gate.reason": reason}
    version = registry.register(task, run, tags, description)
    card_uri = write_model_card(registry, settings, run, version, decision) if decision.passed else None
    registry.set_run_tags(
        run.run_id,
        {"leukops.gate": "passed" if decision.passed else "refused", "leukops.version": version.version},
    )
    before = registry.aliases(task)
    if before.get("champion") != (decision.champion or {}).get("version"):
        raise PromotionError(
            f"@champion of {registry.model_name(task)} moved to v{before.get('champion')} while run "
            f"{run.run_id} was being gated; promote it again to gate it against the new champion"
        )
    moves = gate_moves(decision, before, version.version, settings.require_approval)
    after, sequence = before, None
    if moves:
        action = "promote" if decision.passed and not settings.require_approval else "challenger"
        sequence = _attest_champion(registry, settings, task, moves, action, reason)
        audit = {"action": action, "who": _actor(settings), "why": reason, "run_id": run.run_id}
        after = _journaled(registry, settings, task, moves, audit)
    aliases = tuple(sorted(a for a, v in after.items() if v == version.version))
    return Promotion(run.run_id, task, version.version, decision, aliases, report_uri, card_uri, sequence)


# --- entry points --------------------------------------------------------------------------------------


def promote_run(run_id: str, reason: str, settings: Settings | None = None) -> dict[str, Any]:
    """Gate one training run and register it; on pass it becomes @champion (@challenger if sign-off is on)."""
    settings = settings or get_settings()
    registry = Registry.from_settings(settings)
    run = registry.read_run(run_id)
    with _exclusive(registry, settings, required_tag(run, "task")):
        return _promote_one(registry, settings, run, reason).to_dict()


def select_and_promote(run_ids: Sequence[str], reason: str, settings: Settings | None = None) -> dict[str, Any]:
    """Rank runs by validation (`validation_rank`; never test), gate them in that order; the first that passes wins."""
    settings = settings or get_settings()
    registry = Registry.from_settings(settings)
    runs = [registry.read_run(r) for r in dict.fromkeys(run_ids)]
    if not runs:
        raise PromotionError("no runs to select from")
    tasks = {required_tag(r, "task") for r in runs}
    if len(tasks) > 1:
        raise PromotionError(f"runs of several tasks ({', '.join(sorted(tasks))}) cannot be ranked together")
    unranked = [r.run_id for r in runs if "val_macro_f1" not in r.metrics]
    if unranked:
        raise PromotionError(f"runs without val_macro_f1 cannot be ranked: {', '.join(unranked)}")
    ranked = sorted(runs, key=validation_rank)
    task = next(iter(tasks))
    with _exclusive(registry, settings, task):
        return _select_leased(registry, settings, task, ranked, reason)


def validation_rank(run: RunRecord) -> tuple[float, float]:
    """The sort key of a candidate: the higher validation macro-F1 first, then the lower validation loss.
    The loss breaks ties: a short grid on an easy split often gives every candidate val F1 1.000."""
    return -run.metrics["val_macro_f1"], run.metrics.get("val_loss", float("inf"))


def _select_leased(
    registry: Registry, settings: Settings, task: str, ranked: list[RunRecord], reason: str
) -> dict[str, Any]:
    ranking = [{"run_id": r.run_id, **{k: r.metrics.get(k) for k in ("val_macro_f1", "val_loss")}} for r in ranked]
    champion = registry.champion(task)
    if champion is not None and champion.run_id in {r.run_id for r in ranked}:  # a rerun after it promoted one
        return {
            "task": task,
            "promoted": True,
            "selected_run_id": champion.run_id,
            "version": int(champion.version),
            "ranking": ranking,
            "results": [],
            "note": f"run {champion.run_id} is already @champion",
        }
    results = []
    for run in ranked:
        result = _promote_one(
            registry,
            settings,
            run,
            f"{reason} (selected by validation rank {len(results) + 1}/{len(ranked)})",
        )
        results.append(result.to_dict())
        if result.decision.passed:
            break
    chosen = next((r for r in results if r["passed"]), None)
    return {
        "task": task,
        "promoted": bool(chosen and chosen["promoted"]),
        "selected_run_id": chosen["run_id"] if chosen else None,
        "version": chosen["version"] if chosen else None,
        "ranking": ranking,
        "results": results,
    }


def approve(task: str, version: str | int, reason: str, settings: Settings | None = None) -> dict[str, Any]:
    """Human sign-off: a version that passed the gate (against the current champion) becomes @champion."""
    settings = settings or get_settings()
    registry = Registry.from_settings(settings)
    record = registry.version(task, str(version))
    with _exclusive(registry, settings, task):
        return _approve_leased(registry, settings, task, record, reason)


def _approve_leased(
    registry: Registry, settings: Settings, task: str, record: VersionRecord, reason: str
) -> dict[str, Any]:
    _finish_unfinished(registry, settings, task, by="approve")
    aliases = registry.aliases(task)
    if record.tags.get("gate.passed") != "true":
        raise PromotionError(
            f"{record.name} v{record.version} did not pass the gate "
            f"(failed: {record.tags.get('gate.failed') or 'not gated'})"
        )
    if aliases.get("champion") == record.version:
        raise PromotionError(f"{record.name} v{record.version} is already @champion")
    gated_against = record.tags.get("gate.champion_version") or None
    if aliases.get("champion") != gated_against:
        raise PromotionError(
            f"{record.name} v{record.version} was gated against champion v{gated_against}, @champion is now "
            f"v{aliases.get('champion')}; run `leukops promote --run-id {record.run_id}` again"
        )
    moves = promotion_moves(aliases, record.version, approval_required=False)
    sequence = _attest_champion(registry, settings, task, moves, "approve", reason)
    after = _journaled(
        registry,
        settings,
        task,
        moves,
        {"action": "approve", "who": _actor(settings), "why": reason, "run_id": record.run_id or ""},
    )
    return {
        "task": task,
        "version": int(record.version),
        "promoted": True,
        "aliases": after,
        "attestation_sequence": sequence,
    }


def rollback(task: str, reason: str, settings: Settings | None = None) -> dict[str, Any]:
    """@champion goes back to @previous, which then holds the rolled-back version (a rollback undoes one)."""
    settings = settings or get_settings()
    registry = Registry.from_settings(settings)
    with _exclusive(registry, settings, task):
        return _rollback_leased(registry, settings, task, reason)


def _rollback_leased(registry: Registry, settings: Settings, task: str, reason: str) -> dict[str, Any]:
    _finish_unfinished(registry, settings, task, by="rollback")
    aliases = registry.aliases(task)
    name = registry.model_name(task)
    if "champion" not in aliases or "previous" not in aliases:
        raise PromotionError(
            f"{name} has no @champion and @previous to roll back between (aliases: {aliases or 'none'})"
        )
    moves = [("champion", aliases["previous"]), ("previous", aliases["champion"])]
    sequence = _attest_champion(registry, settings, task, moves, "rollback", reason)  # a new, newest sequence
    audit = {"action": "rollback", "who": _actor(settings), "why": reason}
    after = _journaled(registry, settings, task, moves, audit)
    return {
        "task": task,
        "champion": int(after["champion"]),
        "rolled_back": int(aliases["champion"]),
        "aliases": after,
        "attestation_sequence": sequence,
    }


def list_models(task: str, settings: Settings | None = None) -> dict[str, Any]:
    """Every version of the task's model with its aliases, gate results and audit trail."""
    settings = settings or get_settings()
    registry = Registry.from_settings(settings)
    aliases = registry.aliases(task)
    versions = [
        {
            "version": int(v.version),
            "run_id": v.run_id,
            "created_ms": v.created_ms,
            "aliases": sorted(a for a, ver in aliases.items() if ver == v.version),
            "gate": {k.removeprefix("gate."): val for k, val in sorted(v.tags.items()) if k.startswith("gate.")},
            "model_card": v.tags.get("model_card"),
            "audit": v.audit,
        }
        for v in registry.versions(task)
    ]
    return {"task": task, "name": registry.model_name(task), "aliases": aliases, "versions": versions}
