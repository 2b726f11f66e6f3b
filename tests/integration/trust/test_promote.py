"""Promotion, rollback, sign-off and alias safety on the real local MLflow server.

Candidate runs are real MLflow runs with a real (untrained, tiny) leukops model logged through
``pipelines.model.pyfunc.log_model`` and the metric/tag names of the tracking contract; their explanation
counts and per-image test predictions (the gate's evidence artifact, ``layout.gate_predictions_path``) are
scripted so each scenario (worse, better, shortcut) is exact; one run gets its explanation metrics from
the real ``explain.explain_run``, and where no predictions are logged the gate predicts the real images.
Every test gets its own registered-model prefix: the runs are shared, each registry starts empty.
"""

from __future__ import annotations

import json
import uuid

import cv2
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from pipelines.core.settings import GateThresholds
from pipelines.io import layout
from pipelines.io.registry import Registry, RegistryError
from pipelines.io.storage import sha256_hex
from pipelines.trust.gate import SplitPredictions
from pipelines.trust.promote import approve, list_models, promote_run, rollback, select_and_promote
from pipelines.trust.statistics import clopper_pearson

TASK = "binary_all"
CLASSES = ("ALL", "Healthy")
DATASET = "ds-test-v1"
GROWN_DATASET = "ds-test-v2"  # the test split grew: the champion must be re-evaluated on it


TEST_IMAGES = 100  # per class, in the scripted test predictions


def _metrics(f1: float, val: float, flips: int = 0) -> dict[str, float]:
    return {
        "val_macro_f1": val,
        "test_macro_f1": f1,
        "test_accuracy": f1,
        "test_f1_ci_low": f1 - 0.05,
        "test_f1_ci_high": min(f1 + 0.05, 1.0),
        **{f"test_recall_{c}": f1 for c in CLASSES},
        "gradcam_nucleus_enrichment": 2.1,
        "gradcam_n_images": 32,
        "gradcam_artefact_mass": 0.5 if flips > 30 else 0.04,
        "shortcut_flip_rate": flips / 300,
        "shortcut_flips": flips,
        "shortcut_n_images": 300,
    }


def _predictions(hits: int) -> SplitPredictions:
    """TEST_IMAGES per class, the first ``hits`` of each right (the same images for every scenario)."""
    labels = [c for c in CLASSES for _ in range(TEST_IMAGES)]
    predicted = [c if i % TEST_IMAGES < hits else CLASSES[CLASSES.index(c) - 1] for i, c in enumerate(labels)]
    return SplitPredictions.from_labels(CLASSES, [f"{i:064x}" for i in range(len(labels))], labels, predicted)


HITS = {"good": 92, "worse": 80, "better": 97, "shortcut": 99}
CANDIDATES = {
    "good": _metrics(0.92, 0.84),
    "worse": _metrics(0.80, 0.83),
    "better": _metrics(0.97, 0.88),
    "shortcut": _metrics(0.99, 0.96, flips=135),
}


def _log_candidate(
    settings, name: str, metrics: dict[str, float], dataset: str = DATASET, hits: int | None = None
) -> str:
    from pipelines.io.tracking import TrainingTracker
    from pipelines.model.backbones import create_backbone
    from pipelines.model.bundle import ModelBundle
    from pipelines.model.preprocess import preprocessing_from
    from pipelines.model.pyfunc import log_model

    backbone = create_backbone("custom_cnn", len(CLASSES), pretrained=False, image_size=32)
    bundle = ModelBundle.for_backbone(TASK, CLASSES, backbone, preprocessing_from(backbone.data_config))
    image = cv2.imencode(".png", np.full((32, 32, 3), 200, np.uint8))[1].tobytes()
    tags = {
        "task": TASK,
        "dataset_version": dataset,
        "backbone": "custom_cnn",
        "augment": "none",
        "pretrained": "false",
    }
    with TrainingTracker(settings, run_key=f"promote-test-{name}-{uuid.uuid4().hex}", run_name=name, tags=tags) as run:
        run.log_metrics(metrics)
        log_model(run, bundle, backbone.model.state_dict(), image)
        if hits is not None:
            run.log_text(_predictions(hits).to_json(), layout.gate_predictions_path(dataset))
    return run.run_id


@pytest.fixture(scope="module")
def snapshots(store, shared_data) -> pd.DataFrame:
    """Two real snapshots in S3 over real images: v1, and v2 whose test split holds every image."""
    rows = []
    for folder, label in (("Benign", "Healthy"), ("Early", "ALL")):
        for path in sorted((shared_data / "all_taleqani" / folder).glob("*.jpg"))[:4]:
            data = path.read_bytes()
            sha = sha256_hex(data)
            store.put_bytes(layout.raw_key(sha, "jpg"), data)
            rows.append({"sha256": sha, "key": layout.raw_key(sha, "jpg"), "label": label, "source": "all_taleqani"})
    frame = pd.DataFrame(rows)
    v1 = frame.assign(split=["train", "train", "val", "test"] * 2)
    store.put_parquet(f"manifests/datasets/{TASK}/{DATASET}.parquet", v1)
    store.put_parquet(f"manifests/datasets/{TASK}/{GROWN_DATASET}.parquet", frame.assign(split="test"))
    return frame


@pytest.fixture(scope="module")
def runs(stack, settings, snapshots) -> dict[str, str]:
    logged = {name: _log_candidate(settings, name, m, hits=HITS[name]) for name, m in CANDIDATES.items()}
    # trained on the grown dataset and not explained yet (test_explanation_metrics... explains it)
    unexplained = {k: v for k, v in _metrics(0.86, 0.85).items() if not k.startswith(("gradcam_", "shortcut_"))}
    logged["grown"] = _log_candidate(settings, "grown", unexplained, dataset=GROWN_DATASET)
    return logged


@pytest.fixture
def fresh(settings):
    """Settings whose registered models are new (own prefix): each test starts from an empty registry."""
    return settings.model_copy(update={"registered_model_prefix": f"t{uuid.uuid4().hex[:8]}"})


def _aliases(settings) -> dict[str, str]:
    return Registry.from_settings(settings).aliases(TASK)


def test_first_candidate_becomes_champion_with_report_card_and_audit(runs, fresh):
    result = promote_run(runs["good"], "first model", fresh)
    assert result["promoted"] and result["aliases"] == ["champion"] and result["version"] == 1
    assert {c["name"] for c in result["checks"]} == {
        "macro_f1",
        "recall[ALL]",
        "recall[Healthy]",
        "nucleus_enrichment",
        "shortcut_flip_rate",
    }, "no champion yet: value checks only"
    registry = Registry.from_settings(fresh)
    assert registry.aliases(TASK) == {"champion": "1"}
    version = registry.version(TASK, "1")
    assert version.tags["gate.passed"] == "true"
    assert version.tags["gate.report"] == f"runs:/{runs['good']}/gate/report.json"
    assert "gate/report.md" in version.description
    assert version.audit[0]["action"] == "promote" and version.audit[0]["why"] == "first model"
    assert version.audit[0]["after"] == {"champion": "1"} and version.audit[0]["who"]
    client = MlflowClient(fresh.mlflow_tracking_uri)
    artifacts = {a.path for a in client.list_artifacts(runs["good"], "gate")}
    assert artifacts == {"gate/predictions", "gate/report.json", "gate/report.md"}
    card = client.download_artifacts(runs["good"], "model_card.md")
    text = open(card).read()
    assert text.startswith(f"# Model card: {fresh.registered_model_name(TASK)} v1")
    for needle in (
        "| train | 2 | 2 | 4 |",
        "`all_taleqani` (8)",
        "## Task and classes",
        "`ALL`",
        DATASET,
        "custom_cnn",
        "95% CI 0.870–0.970",
        "| macro_f1 | value | 200 |",
        "| ALL |",
        "pretrained=false",
    ):
        assert needle in text, needle


def test_champion_is_re_evaluated_on_the_candidates_grown_test_split(runs, fresh, store, snapshots):
    from pipelines.model.bundle import load_model
    from pipelines.model.evaluate import evaluate_model

    promote_run(runs["good"], "first", fresh)  # champion measured on v1 (logged test F1 0.85)
    result = promote_run(runs["grown"], "new data arrived", fresh)
    champion = result["champion_before"]
    assert champion["origin"] == "re-evaluated" and champion["dataset_version"] == GROWN_DATASET
    expected = evaluate_model(load_model(f"runs:/{runs['good']}/model"), store, snapshots).macro_f1
    assert champion["macro_f1"] == pytest.approx(expected), "the champion's F1 on the candidate's test split"
    grown = evaluate_model(load_model(f"runs:/{runs['grown']}/model"), store, snapshots).macro_f1
    check = next(c for c in result["checks"] if c["name"] == "non_inferiority")
    assert check["point"] == pytest.approx(grown - expected) and "re-evaluated" in check["detail"]
    assert check["n"] == 8 and not check["passed"] and "insufficient evidence" in check["detail"]
    cached = Registry.from_settings(fresh).read_text(runs["good"], layout.gate_predictions_path(GROWN_DATASET))
    assert SplitPredictions.from_json(cached, "cache").n == 8, "the champion's predictions on the new split are kept"


def test_explanation_metrics_come_from_the_real_explain_run(runs, fresh, settings):
    """An unexplained run is refused (not measured); after explain_run the gate reads its real metrics."""
    from pipelines.trust.explain import explain_run

    before = promote_run(runs["grown"], "not explained yet", fresh)
    assert {"nucleus_enrichment", "shortcut_flip_rate"} <= set(before["failed"])
    assert next(c for c in before["checks"] if c["name"] == "nucleus_enrichment")["value"] is None
    report = explain_run(runs["grown"], samples=8, lime_images=0)  # LIME is the explain tests' cost
    # an untrained model localizes nothing: open the explanation bounds so that the card gets written
    lenient = fresh.model_copy(
        update={
            "gate": GateThresholds(
                nucleus_enrichment_min=0.0,
                shortcut_flip_rate_max=1.0,
                macro_f1_min=0.0,
                class_recall_min=0.0,
                min_check_images=0,
            )
        }
    )
    after = promote_run(runs["grown"], "explained", lenient)
    assert after["promoted"]
    checks = {c["name"]: c for c in after["checks"]}
    assert checks["shortcut_flip_rate"]["point"] == pytest.approx(report["shortcut"]["flip_rate"])
    assert checks["shortcut_flip_rate"]["value"] == pytest.approx(report["shortcut"]["flip_rate_upper"])
    assert checks["shortcut_flip_rate"]["n"] == 8, "min(|test split|, 300) images"
    assert checks["nucleus_enrichment"]["value"] == pytest.approx(report["gradcam"]["nucleus_enrichment"])
    assert after["version"] == before["version"], "the same run keeps its version; its gate tags are updated"
    version = Registry.from_settings(fresh).version(TASK, str(after["version"]))
    assert version.tags["gate.shortcut_flip_rate"] == f"{report['shortcut']['flip_rate']:.4f}"
    card = MlflowClient(settings.mlflow_tracking_uri).download_artifacts(runs["grown"], "model_card.md")
    assert "](explain/overlays/ALL.png)" in open(card).read()


def test_worse_candidate_is_refused_and_champion_stays(runs, fresh):
    promote_run(runs["good"], "first", fresh)
    result = promote_run(runs["worse"], "nightly", fresh)
    assert not result["promoted"] and result["failed"] == ["non_inferiority"]
    check = next(c for c in result["checks"] if c["name"] == "non_inferiority")
    assert check["point"] == pytest.approx(0.80 - 0.92) and check["threshold"] == pytest.approx(-0.02)
    assert check["value"] < check["point"] and check["n"] == 2 * TEST_IMAGES and "McNemar" in check["detail"]
    assert _aliases(fresh) == {"champion": "1", "challenger": "2"}, "passed value checks: kept as challenger"
    shortcut = promote_run(runs["shortcut"], "nightly", fresh)
    assert not shortcut["promoted"] and shortcut["aliases"] == [], "failed a value check: no alias"
    assert _aliases(fresh) == {"champion": "1", "challenger": "2"}
    assert promote_run(runs["worse"], "gated again", fresh)["version"] == 2, "a run is registered once"
    listed = list_models(TASK, fresh)
    assert [(v["version"], v["gate"]["passed"]) for v in listed["versions"]] == [
        (1, "true"),
        (2, "false"),
        (3, "false"),
    ]


def test_better_candidate_moves_champion_and_rollback_restores(runs, fresh):
    promote_run(runs["good"], "first", fresh)
    result = promote_run(runs["better"], "nightly", fresh)
    assert result["promoted"] and result["version"] == 2
    assert _aliases(fresh) == {"champion": "2", "previous": "1"}
    back = rollback(TASK, "v2 misclassifies smears from lab B", fresh)
    assert back["champion"] == 1 and back["rolled_back"] == 2
    assert _aliases(fresh) == {"champion": "1", "previous": "2"}
    audit = Registry.from_settings(fresh).version(TASK, "2").audit
    assert [a["action"] for a in audit] == ["promote", "rollback"]
    assert audit[-1]["why"] == "v2 misclassifies smears from lab B" and audit[-1]["when"]


def test_shortcut_candidate_is_refused_by_the_shortcut_check_and_clean_one_passes(runs, fresh):
    shortcut = promote_run(runs["shortcut"], "nightly", fresh)
    assert not shortcut["promoted"] and shortcut["failed"] == ["shortcut_flip_rate"]
    check = next(c for c in shortcut["checks"] if c["name"] == "shortcut_flip_rate")
    assert check["point"] == pytest.approx(0.45) and "artefact mass 0.5000" in check["detail"]
    assert check["value"] == pytest.approx(clopper_pearson(135, 300, side="upper")[1])
    assert "champion" not in _aliases(fresh)
    clean = promote_run(runs["better"], "nightly", fresh)
    assert clean["promoted"]
    assert next(c for c in clean["checks"] if c["name"] == "shortcut_flip_rate")["passed"]


def test_selection_ranks_by_validation_f1_and_keeps_every_gate_result(runs, fresh):
    ids = [runs["worse"], runs["shortcut"], runs["better"], runs["good"]]
    result = select_and_promote(ids, "nightly selection", fresh)
    assert [r["run_id"] for r in result["ranking"]] == [
        runs["shortcut"],
        runs["better"],
        runs["good"],
        runs["worse"],
    ]
    assert [r["passed"] for r in result["results"]] == [False, True], "stops at the first that passes"
    assert result["selected_run_id"] == runs["better"] and result["promoted"]
    assert _aliases(fresh)["champion"] == str(result["version"])
    rerun = select_and_promote(ids, "nightly selection (Airflow retry)", fresh)
    assert rerun["promoted"] and rerun["version"] == result["version"] and rerun["results"] == []
    assert _aliases(fresh)["champion"] == str(result["version"])


def test_sign_off_keeps_a_passing_candidate_as_challenger_until_approved(runs, fresh):
    gated = fresh.model_copy(update={"require_approval": True, "actor": "alice"})
    result = promote_run(runs["good"], "needs review", gated)
    assert not result["promoted"] and result["awaiting_approval"] and result["aliases"] == ["challenger"]
    approved = approve(TASK, 1, "reviewed the model card", gated)
    assert approved["aliases"] == {"champion": "1"}
    audit = Registry.from_settings(fresh).version(TASK, "1").audit
    assert audit[-1]["action"] == "approve" and audit[-1]["who"] == "alice"
    with pytest.raises(RegistryError, match="not found|no version"):
        approve(TASK, 9, "typo", gated)


@pytest.mark.parametrize("fail_on_call", [1, 2, 3])
def test_mlflow_failure_between_alias_steps_leaves_champion_valid(runs, fresh, monkeypatch, fail_on_call):
    """Sign-off moves three aliases (previous->1, champion->2, challenger deleted); any one call fails."""
    gated = fresh.model_copy(update={"require_approval": True})
    promote_run(runs["good"], "first", fresh)
    promote_run(runs["better"], "awaits sign-off", gated)
    before = _aliases(fresh)
    assert before == {"champion": "1", "challenger": "2"}
    calls = {"n": 0}
    real_set, real_delete = (
        MlflowClient.set_registered_model_alias,
        MlflowClient.delete_registered_model_alias,
    )

    def flaky(real):
        def call(self, *args, **kwargs):
            calls["n"] += 1
            if calls["n"] == fail_on_call:
                raise MlflowException("injected: server went away")
            return real(self, *args, **kwargs)

        return call

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", flaky(real_set))
    monkeypatch.setattr(MlflowClient, "delete_registered_model_alias", flaky(real_delete))
    with pytest.raises(RegistryError, match="injected"):
        approve(TASK, 2, "signed off", gated)
    monkeypatch.undo()
    after = _aliases(fresh)
    assert after == before, f"alias call {fail_on_call} failed: every alias is restored"
    champion = Registry.from_settings(fresh).version(TASK, after["champion"])
    assert champion.status == "READY" and champion.run_id == runs["good"]
    assert approve(TASK, 2, "signed off, MLflow is back", gated)["aliases"] == {
        "champion": "2",
        "previous": "1",
    }


def test_failure_after_champion_moved_is_rolled_back(runs, fresh, store, monkeypatch):
    """The read-back after the moves fails: every alias, champion first, goes back to where it was, and the
    restored champion is signed anew (its target was signed with a newer sequence before the moves)."""
    from pipelines.trust.attestation import verify_champion
    from pipelines.trust.journal import UNDONE, entries

    first = promote_run(runs["good"], "first", fresh)
    real_get = MlflowClient.get_registered_model
    state = {"moved": False}
    real_set = MlflowClient.set_registered_model_alias

    def set_alias(self, name, alias, version):
        real_set(self, name, alias, version)
        state["moved"] |= alias == "champion"

    def read_back(self, name):
        if state["moved"] and not state.get("failed"):
            state["failed"] = True
            raise MlflowException("injected: read-back timed out")
        return real_get(self, name)

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", set_alias)
    monkeypatch.setattr(MlflowClient, "get_registered_model", read_back)
    with pytest.raises(RegistryError, match="read-back timed out"):
        promote_run(runs["better"], "nightly", fresh)
    monkeypatch.undo()
    assert _aliases(fresh) == {"champion": "1"}
    model = fresh.registered_model_name(TASK)
    (undone,) = [e for e in entries(store, TASK) if e.model == model and e.state == UNDONE]
    statement = verify_champion(fresh, TASK)  # raised stale_sequence: v2 was signed as promotion 2
    assert (statement.version, statement.action) == ("1", "undo promote")
    assert statement.sequence == first["attestation_sequence"] + 2 and undone.entry_id in statement.why


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    from pipelines.cli import main

    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_promote_json_and_models_list(runs, fresh, monkeypatch, capsys):
    from pipelines.core.settings import get_settings

    monkeypatch.setenv("LEUKOPS_REGISTERED_MODEL_PREFIX", fresh.registered_model_prefix)
    get_settings.cache_clear()
    try:
        code, out, err = _cli(capsys, "promote", "--run-id", runs["good"], "--reason", "cli", "--json")
        assert code == 0, err
        data = json.loads(out)
        assert {"promoted", "version", "aliases", "checks"} <= set(data)
        assert data["promoted"] is True and data["version"] == 1 and data["aliases"] == ["champion"]
        assert all({"name", "value", "threshold", "passed"} <= set(c) for c in data["checks"])
        code, out, _ = _cli(capsys, "promote", "--run-id", runs["shortcut"], "--json")
        assert code == 1 and json.loads(out)["promoted"] is False
        code, out, _ = _cli(capsys, "models", "list", "--task", TASK, "--json")
        assert [v["aliases"] for v in json.loads(out)["versions"]] == [["champion"], []]
        code, _, err = _cli(capsys, "rollback", "--task", TASK, "--reason", "x")
        assert code == 2 and "no @champion and @previous" in err
        code, _, err = _cli(capsys, "promote", "--run-id", "0" * 32)
        assert code == 2 and f"MLflow run '{'0' * 32}' not found" in err
    finally:
        get_settings.cache_clear()
