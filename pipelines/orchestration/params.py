"""The run parameters of the leukops DAGs (``dag_run.conf``, validated by Airflow before a run starts) and
how the task bodies turn them back into settings.

A caller's overrides (the demo's short training and its gate floors, an operator's one-off run from
the UI) travel in the DAG run's conf, so every worker that runs a task of that run sees the same
values; the environment of the process that triggered the run plays no part. Every override is
optional: ``None`` means "the value in the settings" (``leukops.yaml`` / ``LEUKOPS_*``).

Imports only ``airflow.sdk`` and the settings module: the DAG files build their params at parse time.
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import Param
from pydantic import BaseModel, ValidationError

from pipelines.core.errors import LeukopsError
from pipelines.core.settings import GateThresholds, RetrainConfig, Settings, TaskRecipe

NAME_PATTERN = r"^[A-Za-z0-9_.\-]+$"  # backbone / augmentation / task names; allow-lists are checked by training


class ParamsError(LeukopsError):
    """A run parameter the settings refuse (Airflow's own schema check passed, the settings model did not)."""


def _optional(json_type: str, description: str, **schema: Any) -> Param:
    return Param(None, type=["null", json_type], description=f"{description} (empty = settings)", **schema)


def _names(description: str) -> Param:
    return _optional("array", description, items={"type": "string", "pattern": NAME_PATTERN}, minItems=1)


# retrain override -> its JSON schema; the keys are RetrainConfig fields
RETRAIN_OVERRIDES: dict[str, Param] = {
    "tasks": _names('classification tasks to retrain, e.g. ["all_subtypes"]'),
    "backbones": _names("backbones of the grid (timm names from the allow-list)"),
    "augmentations": _names("augmentations of the grid: none, mixup, cutmix, augmix, randaug"),
    "epochs": _optional("integer", "training epochs per candidate", minimum=1, maximum=500),
    "image_size": _optional("integer", "input size in pixels", minimum=32, maximum=1024),
    "batch_size": _optional("integer", "training batch size", minimum=1, maximum=1024),
    "max_images": _optional("integer", "cap on training images (stratified)", minimum=8),
    "time_budget_min": _optional("number", "wall-clock budget per candidate, minutes", exclusiveMinimum=0),
    "stain_augment": _optional("string", "stain jitter in training: none, hed", enum=[None, "none", "hed"]),
    "stain_normalize": _optional(
        "string",
        "stain normaliser saved with the model: none, reinhard, macenko",
        enum=[None, "none", "reinhard", "macenko"],
    ),
    "site_balance": _optional(
        "number", "draw weight n_site^-x across sources (0 = off, 1 = sites equal)", minimum=0, maximum=1
    ),
    "warm_start": _optional("boolean", "start from the @champion's weights when it is the same network"),
    "explain_samples": _optional("integer", "test images for Grad-CAM + shortcut test", minimum=1, maximum=5000),
    "explain_lime_images": _optional("integer", "test images explained with LIME", minimum=0, maximum=500),
}
# gate override -> (minimum, maximum); numeric GateThresholds fields not listed here are open-ended
GATE_RANGES: dict[str, tuple[float | None, float | None]] = {
    "macro_f1_min": (0.0, 1.0),
    "class_recall_min": (0.0, 1.0),
    "non_inferiority_margin": (0.0, 1.0),
    "nucleus_enrichment_min": (0.0, None),
    "cell_enrichment_min": (0.0, None),
    "shortcut_flip_rate_max": (0.0, 1.0),
    "lime_agreement_min": (0.0, 1.0),
    "holdout_macro_f1_min": (0.0, 1.0),
    "min_check_images": (1, None),
    "confidence": (0.5, 0.9999),
    "bootstrap_resamples": (100, 100_000),
    "shortcut_images": (1, None),
}
NUMERIC_TYPES = ("integer", "number")


def _json_type(schema: dict[str, Any]) -> str | None:
    """integer/number for a numeric (optionally nullable) settings field, else None."""
    types = [schema.get("type")] + [option.get("type") for option in schema.get("anyOf", [])]
    return next((t for t in types if t in NUMERIC_TYPES), None)


def gate_overrides() -> dict[str, Param]:
    """One optional number per numeric promotion-gate setting (``settings.gate``; per-task ``floors`` stay
    in the settings: ``macro_f1_min`` / ``class_recall_min`` override them for every task)."""
    params = {}
    for name, schema in GateThresholds.model_json_schema()["properties"].items():
        json_type = _json_type(schema)
        if json_type is None:
            continue
        low, high = GATE_RANGES.get(name, (None, None))
        bounds = {k: v for k, v in (("minimum", low), ("maximum", high)) if v is not None}
        params[name] = _optional(json_type, f"gate: {name.replace('_', ' ')}", **bounds)
    return params


def retrain_params() -> dict[str, Param]:
    """The nightly retrain's params: force + reason, the grid overrides and the gate floors."""
    return {
        "force": Param(False, type="boolean", description="retrain even if the snapshot is unchanged"),
        "reason": Param("", type="string", maxLength=500, description="why (required with force; kept in tags)"),
        **RETRAIN_OVERRIDES,
        **gate_overrides(),
    }


def ingest_params() -> dict[str, Param]:
    return {
        "source": _optional("string", "one registered source; empty = every source", pattern=NAME_PATTERN),
        "wait_for_files_min": Param(
            0,
            type="number",
            minimum=0,
            maximum=60,
            description="how long a source with nothing new is polled before its branch is skipped (0 = once)",
        ),
    }


def with_retrain_requests(params: dict[str, Any], requests: list[dict[str, Any]]) -> dict[str, Any]:
    """A retrain run's params completed by the drift runs' retrain requests it consumed (asset events'
    extra): their tasks when the run names none (drift in ``wbc`` retrains ``wbc``, whatever the nightly
    grid's tasks), their messages as the reason when it gives none."""
    params = dict(params)
    messages = [r["message"] for r in requests if r.get("message")]
    if not params.get("reason") and messages:
        params["reason"] = "; ".join(messages)
    requested = sorted({t for r in requests for t in r.get("tasks") or []})
    if not params.get("tasks") and requested:
        params["tasks"] = requested
    return params


def drift_params() -> dict[str, Param]:
    return {"tasks": RETRAIN_OVERRIDES["tasks"]}


def _section(model: BaseModel, params: dict[str, Any], names: dict[str, Any], section: str) -> BaseModel:
    overrides = {name: params[name] for name in names if params.get(name) is not None}
    if not overrides:
        return model
    try:
        return type(model).model_validate(model.model_dump() | overrides)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise ParamsError(f"run params refused by settings.{section}: {problems}") from None


def _without_task_recipes(retrain: RetrainConfig, params: dict[str, Any]) -> RetrainConfig:
    """A run's param (image_size, stain_augment, ...) applies to every task: the tasks' own values of it go."""
    given = {name for name in TaskRecipe.model_fields if params.get(name) is not None}
    if not given:
        return retrain
    per_task = {task: recipe.model_copy(update=dict.fromkeys(given)) for task, recipe in retrain.per_task.items()}
    return retrain.model_copy(update={"per_task": per_task})


def with_overrides(settings: Settings, params: dict[str, Any]) -> Settings:
    """The settings with the run's non-empty retrain and gate overrides applied (validated again by the
    settings models, so a conf that skipped Airflow's check, e.g. from a test, is still refused clearly)."""
    retrain = _without_task_recipes(_section(settings.retrain, params, RETRAIN_OVERRIDES, "retrain"), params)
    gate = _section(settings.gate, params, gate_overrides(), "gate")
    if retrain is settings.retrain and gate is settings.gate:
        return settings
    return settings.model_copy(update={"retrain": retrain, "gate": gate})


def overrides_of(params: dict[str, Any]) -> dict[str, Any]:
    """The non-empty overrides among a run's params (what a run's tags and logs should name)."""
    names = [*RETRAIN_OVERRIDES, *gate_overrides()]
    return {name: params[name] for name in names if params.get(name) is not None}
