"""The DAGs' run params: Airflow's schema check of a conf, and the settings the task bodies build from it."""

from __future__ import annotations

import pytest
from airflow.sdk import ParamsDict
from airflow.sdk.exceptions import ParamValidationError

from pipelines.core.settings import RetrainConfig, Settings
from pipelines.orchestration.params import (
    RETRAIN_OVERRIDES,
    ParamsError,
    gate_overrides,
    ingest_params,
    overrides_of,
    retrain_params,
    with_overrides,
    with_retrain_requests,
)


def _validated(params: dict, conf: dict) -> dict:
    """What Airflow does with a trigger's conf: merge into the DAG's params, validate every value."""
    merged = ParamsDict(params)
    merged.update(conf)
    return merged.validate()


def test_an_empty_conf_overrides_nothing():
    resolved = _validated(retrain_params(), {})
    assert resolved["force"] is False and resolved["reason"] == ""
    assert overrides_of(resolved) == {}
    settings = Settings(profile="dev")
    assert with_overrides(settings, resolved) is settings


def test_the_demo_conf_reaches_the_grid_and_the_gate():
    conf = {
        "tasks": ["wbc"],
        "backbones": ["efficientnet_lite0"],
        "augmentations": ["none", "mixup"],
        "epochs": 3,
        "time_budget_min": 2.5,
        "macro_f1_min": 0.3,
        "class_recall_min": 0.1,
        "min_check_images": 8,
    }
    resolved = _validated(retrain_params(), conf)
    settings = with_overrides(Settings(profile="dev"), resolved)
    assert settings.retrain.tasks == ["wbc"] and settings.retrain.augmentations == ["none", "mixup"]
    assert (settings.retrain.epochs, settings.retrain.time_budget_min) == (3, 2.5)
    assert settings.retrain.image_size == Settings(profile="dev").retrain.image_size  # not overridden
    assert (settings.gate.macro_f1_min, settings.gate.class_recall_min, settings.gate.min_check_images) == (0.3, 0.1, 8)
    assert overrides_of(resolved) == conf


@pytest.mark.parametrize(
    "conf",
    [
        {"epochs": 0},
        {"epochs": "three"},
        {"epochs": 2.5},
        {"image_size": 8},
        {"time_budget_min": 0},
        {"backbones": []},
        {"backbones": ["resnet18; rm -rf /"]},
        {"augmentations": "mixup"},
        {"macro_f1_min": 1.5},
        {"class_recall_min": -0.1},
        {"shortcut_flip_rate_max": 2},
        {"force": "yes"},
    ],
)
def test_airflow_refuses_a_conf_outside_the_schema(conf):
    with pytest.raises(ParamValidationError):
        _validated(retrain_params(), conf)


def test_the_settings_refuse_what_the_schema_let_through():
    """A conf that skipped Airflow's check (tests, a hand-built context) still gets a clear error."""
    with pytest.raises(ParamsError, match=r"settings\.retrain: epochs"):
        with_overrides(Settings(profile="dev"), {"epochs": "many"})


def test_every_override_is_a_setting_and_every_numeric_gate_setting_is_a_param():
    assert set(RETRAIN_OVERRIDES) <= set(RetrainConfig.model_fields)
    gate = gate_overrides()
    assert {"macro_f1_min", "class_recall_min", "non_inferiority_margin", "shortcut_flip_rate_max"} <= set(gate)
    assert all(p.value is None for p in gate.values())  # None = the settings' value


def test_ingest_params_bound_the_wait_for_new_files():
    assert _validated(ingest_params(), {})["wait_for_files_min"] == 0
    assert _validated(ingest_params(), {"source": "lab-a", "wait_for_files_min": 5})["source"] == "lab-a"
    for bad in ({"wait_for_files_min": -1}, {"wait_for_files_min": 120}, {"source": "../etc"}):
        with pytest.raises(ParamValidationError):
            _validated(ingest_params(), bad)


def test_a_retrain_request_names_the_tasks_and_the_reason_unless_the_run_does():
    params = _validated(retrain_params(), {})
    requests = [{"action": "retrain", "message": "retrain requested for wbc", "tasks": ["wbc"]}]
    completed = with_retrain_requests(params, requests)
    assert completed["tasks"] == ["wbc"] and completed["reason"] == "retrain requested for wbc"
    assert with_overrides(Settings(profile="dev"), completed).retrain.tasks == ["wbc"]
    own = with_retrain_requests(_validated(retrain_params(), {"tasks": ["all_subtypes"], "reason": "mine"}), requests)
    assert own["tasks"] == ["all_subtypes"] and own["reason"] == "mine"
    assert with_retrain_requests(params, []) == params  # a cron run: the settings' tasks


def test_stain_and_site_options_travel_in_the_conf_and_bad_ones_are_refused():
    conf = {"stain_augment": "hed", "stain_normalize": "reinhard", "site_balance": 1.0}
    retrain = with_overrides(Settings(profile="dev"), _validated(retrain_params(), conf)).retrain
    assert (retrain.stain_augment, retrain.stain_normalize, retrain.site_balance) == ("hed", "reinhard", 1.0)
    for bad in ({"stain_augment": "purple"}, {"site_balance": 2}):
        with pytest.raises(ParamValidationError):
            _validated(retrain_params(), bad)


def test_a_run_param_applies_to_every_task_over_its_own_recipe():
    from pipelines.core.settings import TaskRecipe
    from pipelines.model.candidate import candidate_spec

    recipe = TaskRecipe(cell_crop=2.0, image_size=160, stain_augment="hed", warm_start=True)
    settings = Settings(profile="dev", retrain={"image_size": 128, "per_task": {"wbc": recipe}})
    assert candidate_spec(settings.retrain, "wbc", "efficientnet_lite0").image_size == 160
    assert candidate_spec(settings.retrain, "all_subtypes", "efficientnet_lite0").image_size == 128
    run = with_overrides(settings, {"image_size": 64})
    for task in ("wbc", "all_subtypes"):
        assert candidate_spec(run.retrain, task, "efficientnet_lite0").image_size == 64
    spec = candidate_spec(run.retrain, "wbc", "efficientnet_lite0")
    assert (spec.cell_crop, spec.stain_augment) == (2.0, "hed")  # what the run did not name stays the task's
    assert (
        spec.warm_start
        and not candidate_spec(
            with_overrides(settings, {"warm_start": False}).retrain, "wbc", "efficientnet_lite0"
        ).warm_start
    ), "a run that asks for a cold start gets one on every task"
