"""Signed promotions that serving verifies, on the real local MLflow server and S3 (issue 15, acceptance).

A candidate promoted through the real gate (scripted evidence, as in test_promote.py) is signed with the
session's dev key pair (made by the stack in its state dir) and served by the real app. Then what an
attacker with MLflow access could do: point ``@champion`` by hand at a registered but never-attested
version, and overwrite the weights of an attested version in the artifact store. Serving refuses both,
keeps the attested model, says only "refused: not attested" in /readyz and counts each refusal. A warm-started
retrain refuses the same champions: it fine-tunes only verified weights.
"""

from __future__ import annotations

import json
import uuid

import pytest
from fastapi.testclient import TestClient
from mlflow import MlflowClient

from pipelines.core.settings import RetrainConfig
from pipelines.io import layout
from pipelines.io.registry import Registry
from pipelines.io.storage import ObjectStore
from pipelines.model.candidate import candidate_spec
from pipelines.model.warm_start import WarmStart
from pipelines.trust.attestation import AttestationError, key_id, verify, verifying_key
from pipelines.trust.champion_start import champion_start
from pipelines.trust.promote import promote_run, rollback
from serving.app import create_app
from serving.model import REFUSED

from .test_promote import CANDIDATES, HITS, TASK, _log_candidate, snapshots  # noqa: F401 - a fixture


@pytest.fixture(scope="module")
def signed(settings, stack, snapshots) -> object:  # noqa: F811 - the imported fixture
    """Own registered-model prefix; serving polls only when a test asks (no race with the alias moves)."""
    serving = settings.serving.model_copy(update={"task": TASK, "reload_interval_s": 3600})
    return settings.model_copy(update={"registered_model_prefix": f"att{uuid.uuid4().hex[:8]}", "serving": serving})


def _auth(settings) -> dict[str, str]:
    return {"Authorization": f"Bearer {settings.secret('serving.token')}"}


def _refusals(client, settings, reason: str) -> float:
    text = client.get("/metrics", headers=_auth(settings)).text
    line = next(
        (ln for ln in text.splitlines() if ln.startswith(f'leukops_model_refusals_total{{reason="{reason}"}}')), None
    )
    return float(line.split()[-1]) if line else 0.0


def _weights_key(settings, run_id: str) -> str:
    """The S3 object of the run's logged-model weights in the MLflow artifact bucket."""
    run = MlflowClient(settings.mlflow_tracking_uri).get_run(run_id)
    store = ObjectStore.from_settings(settings, bucket=settings.artifacts_bucket)
    model_ids = [
        m.model_id
        for m in MlflowClient(settings.mlflow_tracking_uri).search_logged_models([run.info.experiment_id])
        if m.source_run_id == run_id
    ]
    keys = [
        k
        for k in store.list(f"{run.info.experiment_id}/")
        if k.endswith("weights.pt") and any(m in k for m in [run_id, *model_ids])
    ]
    assert len(keys) == 1, keys
    return keys[0]


def _warm_start(settings) -> WarmStart | None:
    """What a warm-started retrain of TASK (the candidates' network) would start from now."""
    return champion_start(settings, candidate_spec(RetrainConfig(image_size=32), TASK, "custom_cnn", warm_start=True))


def test_only_attested_unaltered_newest_promotions_are_served(signed, stack) -> None:
    registry = Registry.from_settings(signed)
    public = verifying_key(signed)
    good = _log_candidate(signed, "good", CANDIDATES["good"], hits=HITS["good"])
    promoted = promote_run(good, "first attested model", signed)
    assert promoted["promoted"] and promoted["attestation_sequence"] == 1
    envelope = registry.version(TASK, "1").tags[layout.ATTESTATION_TAG]
    statement = verify(envelope, public, "v1")
    assert registry.read_text(good, layout.attestation_path(1)) == envelope
    assert {"MLmodel", "artifacts/weights.pt", "artifacts/bundle.json"} <= set(statement.artifacts)
    start = _warm_start(signed)
    assert start.state is not None and start.label == f"champion v1 (run {good})"

    with TestClient(create_app(signed, log_requests=False)) as client:
        holder = client.app.state.services.holder
        info = client.get("/v1/model", headers=_auth(signed)).json()
        assert info["version"] == "1" and info["attestation"]["valid"] is True
        assert info["attestation"]["key_id"] == key_id(public) == statement.key_id
        assert info["attestation"]["gate_report_sha256"] == statement.gate_report_sha256

        # @champion moved by hand (admin credentials, the MLflow API) to a version the gate never signed
        worse = _log_candidate(signed, "worse", CANDIDATES["worse"], hits=HITS["worse"])
        by_hand = registry.register(TASK, registry.read_run(worse), {"gate.passed": "true"}, "not gated")
        MlflowClient(signed.mlflow_tracking_uri).set_registered_model_alias(
            signed.registered_model_name(TASK), "champion", by_hand.version
        )
        assert not holder.check_for_update()
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["version"] == "1"
        assert ready.json()["reload"] == REFUSED and "no_attestation" not in ready.text
        assert _refusals(client, signed, "no_attestation") == 1.0
        start = _warm_start(signed)  # a retrain does not fine-tune what serving refuses
        assert start.state is None and "(no_attestation)" in start.label and f"v{by_hand.version}" in start.label
        assert client.get("/v1/model", headers=_auth(signed)).json()["version"] == "1"

        # a newer attested promotion whose weights are overwritten in the artifact store
        better = _log_candidate(signed, "better", CANDIDATES["better"], hits=HITS["better"])
        newer = promote_run(better, "better model", signed)
        assert newer["promoted"] and newer["attestation_sequence"] == 2
        store = ObjectStore.from_settings(signed, bucket=signed.artifacts_bucket)
        key = _weights_key(signed, better)
        store.put_bytes(key, store.get_bytes(key)[:-64] + bytes(64))
        assert not holder.check_for_update()
        assert client.get("/readyz").json()["version"] == "1"
        assert _refusals(client, signed, "artifact_mismatch") == 1.0
        start = _warm_start(signed)
        assert start.state is None and "(artifact_mismatch)" in start.label and "weights.pt" in start.label

    # rollback re-signs, so it refuses a target the gate never passed (@previous is the by-hand version)
    with pytest.raises(AttestationError, match="no gate report"):
        rollback(TASK, "v3's weights were altered", signed)
    assert registry.aliases(TASK)["champion"] == str(newer["version"])


def test_rollback_signs_a_new_sequence_and_the_demoted_version_is_refused(signed, stack) -> None:
    fresh = signed.model_copy(update={"registered_model_prefix": f"rb{uuid.uuid4().hex[:8]}"})
    registry = Registry.from_settings(fresh)
    first = promote_run(_log_candidate(fresh, "good", CANDIDATES["good"], hits=HITS["good"]), "v1", fresh)
    second = promote_run(_log_candidate(fresh, "better", CANDIDATES["better"], hits=HITS["better"]), "v2", fresh)
    assert (first["attestation_sequence"], second["attestation_sequence"]) == (1, 2)
    with TestClient(create_app(fresh, log_requests=False)) as client:
        holder = client.app.state.services.holder
        assert client.get("/readyz").json()["version"] == "2"
        back = rollback(TASK, "v2 misclassifies smears from lab B", fresh)
        assert back["champion"] == 1 and back["attestation_sequence"] == 3
        assert holder.check_for_update() and client.get("/readyz").json()["version"] == "1"
        # re-aliasing the demoted v2 by hand: signed, but an older promotion than v1's new one
        MlflowClient(fresh.mlflow_tracking_uri).set_registered_model_alias(
            fresh.registered_model_name(TASK), "champion", "2"
        )
        assert not holder.check_for_update()
        assert client.get("/readyz").json()["version"] == "1"
        assert _refusals(client, fresh, "stale_sequence") == 1.0
    audit = registry.version(TASK, "1").audit
    assert [a["action"] for a in audit] == ["promote", "promote", "rollback"]
    assert json.loads(registry.version(TASK, "1").tags[layout.ATTESTATION_TAG])["statement"]["action"] == "rollback"
