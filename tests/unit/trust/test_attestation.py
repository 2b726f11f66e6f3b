"""Promotion attestations: keys, signing, verification and every refusal, on an in-memory registry.

The registry here is a dict-backed stand-in with the methods ``attest`` and ``verified_download`` call;
model downloads copy a real folder of files (the real MLflow + S3 path is tests/integration/trust/).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import stat
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from pipelines.core.settings import ServingSettings, Settings, SettingsError
from pipelines.io import layout, tracking
from pipelines.io.registry import VersionRecord
from pipelines.trust import attestation
from pipelines.trust.attestation import (
    AttestationError,
    NotAttestedError,
    artifact_mismatches,
    attest,
    canonical_json,
    file_digests,
    generate_key_pair,
    key_id,
    newest_sequence,
    read_private_key,
    read_public_key,
    sign,
    verified_download,
    verify,
)
from serving.model import REFUSED, ModelHolder, ModelVersion

TASK = "binary_all"
NAME = f"leukops-{TASK}"
REPORT = json.dumps({"passed": True, "dataset_version": "ds1", "thresholds": {"macro_f1_min": 0.7}})


class MemoryRegistry:
    """Versions with tags and run text artifacts, as ``pipelines.io.registry.Registry`` exposes them."""

    def __init__(self, versions: int) -> None:
        self.tags = {str(v): {} for v in range(1, versions + 1)}
        self.texts: dict[tuple[str, str], str] = {(f"run-{v}", layout.GATE_REPORT_JSON): REPORT for v in self.tags}

    def version(self, task: str, version: str) -> VersionRecord:
        return VersionRecord(NAME, version, f"run-{version}", "src", "READY", 0, (), dict(self.tags[version]), "")

    def versions(self, task: str) -> list[VersionRecord]:
        return [self.version(task, v) for v in self.tags]

    def read_text(self, run_id: str, artifact_file: str) -> str | None:
        return self.texts.get((run_id, artifact_file))

    def log_text(self, run_id: str, text: str, artifact_file: str) -> str:
        self.texts[(run_id, artifact_file)] = text
        return layout.run_artifact_uri(run_id, artifact_file)

    def tag_version(self, task: str, version: str, tags: dict[str, str]) -> None:
        self.tags[version].update(tags)

    def champion(self, task: str) -> VersionRecord:
        return self.version(task, max(self.tags, key=int))


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return generate_key_pair(tmp_path / "keys")


@pytest.fixture
def settings(keys, tmp_path: Path) -> Settings:
    serving = ServingSettings(attestation_public_key=keys[1])
    return Settings(profile="test", state_dir=tmp_path / "state", promotion_signing_key=keys[0], serving=serving)


@pytest.fixture
def model_files(tmp_path: Path, monkeypatch) -> Path:
    """The 'MLflow model' every version downloads: a folder of real files, which tests may tamper with."""
    folder = tmp_path / "model"
    (folder / "artifacts").mkdir(parents=True)
    (folder / "MLmodel").write_text("flavors: {}\n")
    (folder / "artifacts" / "bundle.json").write_text('{"temperature": 1.3}')
    (folder / "artifacts" / "weights.pt").write_bytes(bytes(range(256)) * 8)

    def download(settings, uri: str, dst: Path):
        shutil.copytree(folder, dst / "model")
        return dst / "model", uri.split("/")[1]

    monkeypatch.setattr(tracking, "download_model", download)
    return folder


def _attest(registry, settings, version: str, action: str = "promote"):
    return attest(registry, settings, TASK, version, action, "tests", "tester")


def _download(registry, settings, version: str, tmp_path: Path, floor: int = 0):
    key = read_public_key(settings.serving.attestation_public_key)
    dst = tmp_path / f"dl-{version}-{len(list(tmp_path.iterdir()))}"
    dst.mkdir()
    return verified_download(registry, settings, TASK, version, key, floor, dst)


def test_key_pair_files_private_0600_never_overwritten(keys) -> None:
    private, public = keys
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    key = read_private_key(private)
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert key_id(read_public_key(public)) == hashlib.sha256(raw).hexdigest()[:16]
    with pytest.raises(AttestationError, match="refusing to overwrite"):
        generate_key_pair(private.parent)
    with pytest.raises(AttestationError, match="not a readable Ed25519 private key"):
        read_private_key(public)


def test_canonical_json_ignores_key_order() -> None:
    assert canonical_json({"b": 1, "a": {"d": 2, "c": 3}}) == canonical_json({"a": {"c": 3, "d": 2}, "b": 1})
    assert canonical_json({"a": 1}) == b'{"a":1}'


def test_attest_signs_every_model_file_stores_tag_and_artifact(settings, model_files) -> None:
    registry = MemoryRegistry(2)
    statement = _attest(registry, settings, "1")
    assert statement.sequence == 1 and statement.model == NAME and statement.run_id == "run-1"
    assert set(statement.artifacts) == {"MLmodel", "artifacts/bundle.json", "artifacts/weights.pt"}
    assert statement.gate_report_sha256 == hashlib.sha256(REPORT.encode()).hexdigest()
    assert statement.thresholds == {"macro_f1_min": 0.7} and statement.dataset_version == "ds1"
    envelope = registry.tags["1"][layout.ATTESTATION_TAG]
    assert registry.texts[("run-1", layout.attestation_path(1))] == envelope
    assert verify(envelope, read_public_key(settings.serving.attestation_public_key), "v1") == statement
    assert _attest(registry, settings, "2").sequence == 2  # the next promotion, whatever the version


def test_a_changed_statement_or_another_key_does_not_verify(settings, model_files, tmp_path) -> None:
    registry = MemoryRegistry(1)
    _attest(registry, settings, "1")
    envelope = json.loads(registry.tags["1"][layout.ATTESTATION_TAG])
    public = read_public_key(settings.serving.attestation_public_key)
    envelope["statement"]["sequence"] = 99
    with pytest.raises(AttestationError, match="does not verify"):
        verify(json.dumps(envelope), public, "v1")
    other = read_public_key(generate_key_pair(tmp_path / "other")[1])
    with pytest.raises(AttestationError, match="does not verify"):
        verify(registry.tags["1"][layout.ATTESTATION_TAG], other, "v1")
    with pytest.raises(AttestationError, match="not a leukops attestation"):
        verify("{}", public, "v1")


def test_newest_sequence_ignores_forgeries(settings, model_files, tmp_path) -> None:
    registry = MemoryRegistry(1)
    statement = _attest(registry, settings, "1")
    forged = sign(replace(statement, sequence=50), read_private_key(generate_key_pair(tmp_path / "x")[0]))
    public = read_public_key(settings.serving.attestation_public_key)
    assert newest_sequence([registry.tags["1"][layout.ATTESTATION_TAG], forged, "junk"], public) == 1


def test_the_gate_must_have_passed(settings, model_files) -> None:
    registry = MemoryRegistry(2)
    registry.texts[("run-1", layout.GATE_REPORT_JSON)] = json.dumps({"passed": False, "failed": ["macro_f1"]})
    del registry.texts[("run-2", layout.GATE_REPORT_JSON)]
    with pytest.raises(AttestationError, match="did not pass"):
        _attest(registry, settings, "1")
    with pytest.raises(AttestationError, match="no gate report"):
        _attest(registry, settings, "2")
    assert registry.tags == {"1": {}, "2": {}}


def test_no_signing_key_names_the_variable(tmp_path) -> None:
    with pytest.raises(SettingsError, match="LEUKOPS_PROMOTION_SIGNING_KEY"):
        attestation.signing_key(Settings(profile="prod", state_dir=tmp_path, _env_file=None))


def test_dev_profile_falls_back_to_the_state_dir_pair(tmp_path) -> None:
    dev = Settings(profile="dev", state_dir=tmp_path, _env_file=None)
    assert attestation.verifying_key(dev) is None  # no pair yet: every version refused
    attestation.ensure_dev_key_pair(dev)
    assert key_id(attestation.verifying_key(dev)) == key_id(attestation.signing_key(dev).public_key())
    assert attestation.verifying_key(replace_profile(dev, "prod")) is None  # only dev falls back


def replace_profile(settings: Settings, profile: str) -> Settings:
    return settings.model_copy(update={"profile": profile})


def test_a_verified_download_passes_and_every_refusal_has_its_reason(settings, model_files, tmp_path) -> None:
    registry = MemoryRegistry(3)
    _attest(registry, settings, "1")
    local, run_id, statement = _download(registry, settings, "1", tmp_path)
    assert run_id == "run-1" and statement.sequence == 1 and (local / "artifacts" / "weights.pt").exists()

    def reason(version: str, floor: int = 0) -> str:
        with pytest.raises(NotAttestedError) as refused:
            _download(registry, settings, version, tmp_path, floor)
        return refused.value.reason

    assert reason("2") == "no_attestation"
    _attest(registry, settings, "2")
    assert reason("1") == "stale_sequence"  # demoted: v2 holds a newer promotion
    assert reason("2", floor=5) == "stale_sequence"  # below what this process already served
    registry.tags["3"][layout.ATTESTATION_TAG] = registry.tags["2"][layout.ATTESTATION_TAG]  # copied tag
    assert reason("3") == "wrong_version"
    registry.tags["3"][layout.ATTESTATION_TAG] = registry.tags["2"][layout.ATTESTATION_TAG].replace('"2"', '"3"')
    assert reason("3") == "bad_signature"
    (model_files / "artifacts" / "weights.pt").write_bytes(b"tampered")
    assert reason("2") == "artifact_mismatch"
    with pytest.raises(NotAttestedError) as refused:
        verified_download(registry, settings, TASK, "2", None, 0, tmp_path)
    assert refused.value.reason == "no_public_key"


def test_file_digests_and_mismatches(tmp_path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "w.pt").write_bytes(b"x")
    digests = file_digests(tmp_path)
    assert digests == {"a/w.pt": hashlib.sha256(b"x").hexdigest()}
    assert artifact_mismatches(digests, digests) == []
    assert artifact_mismatches(digests, {**digests, "extra": "0"}) == ["extra"]
    assert artifact_mismatches(digests, {"a/w.pt": "0"}) == ["a/w.pt"]


class RefusingSource:
    """Version 1 loads; every other version is refused as not attested."""

    name = NAME
    task = TASK

    def __init__(self) -> None:
        self.alias, self.loads = "1", 0

    def resolve(self) -> str:
        return self.alias

    def describe(self, version: str) -> ModelVersion:
        return ModelVersion(NAME, version)

    def load(self, version: str):
        self.loads += 1
        if version != "1":
            raise NotAttestedError(version, "no_attestation", f"{NAME} v{version} has no tag (s3://secret/bucket)")
        return _FakeLoaded()

    def attestation(self, version: str) -> dict:
        return {"valid": True, "key_id": "k", "signed_at": "t", "gate_report_sha256": "g", "sequence": 1}


class _FakeLoaded:
    class module:  # noqa: N801 - stands in for an nn.Module
        @staticmethod
        def to(**_kwargs):
            return None


def test_holder_keeps_the_current_model_counts_audits_and_says_only_refused(caplog) -> None:
    source, reasons = RefusingSource(), []
    holder = ModelHolder(source, 3600, on_refusal=reasons.append)
    assert holder.check_for_update() and holder.current.attestation["valid"] is True
    source.alias = "2"
    with caplog.at_level(logging.WARNING, logger="leukops.audit"):
        assert not holder.check_for_update()
        assert not holder.check_for_update()  # not retried: waiting does not attest it
    assert holder.current.version.version == "1" and source.loads == 2
    ready = holder.readiness()
    assert ready["ready"] and ready["reload_state"] == REFUSED and ready["failed_version"] == "2"
    assert reasons == ["no_attestation"]
    audit = [json.loads(r.message) for r in caplog.records if r.name == "leukops.audit"]
    assert audit == [audit[0]] and audit[0]["action"] == "refuse" and audit[0]["version"] == "2"
    assert audit[0]["serving"] == "1" and "s3://secret" in audit[0]["detail"]
    source.alias = "1"
    assert not holder.check_for_update() and holder.readiness()["reload_state"] is None


def test_serving_outside_dev_needs_the_public_key_and_never_the_signing_key(keys, tmp_path) -> None:
    from serving.model import ChampionSource

    bare = Settings(profile="prod", state_dir=tmp_path, _env_file=None)
    with pytest.raises(SettingsError, match="LEUKOPS_SERVING__ATTESTATION_PUBLIC_KEY"):
        ChampionSource(bare)
    both = bare.model_copy(
        update={"promotion_signing_key": keys[0], "serving": ServingSettings(attestation_public_key=keys[1])}
    )
    with pytest.raises(SettingsError, match="LEUKOPS_PROMOTION_SIGNING_KEY is set for serving"):
        ChampionSource(both)
    assert ChampionSource(both.model_copy(update={"promotion_signing_key": None})).public_key is not None


def test_evaluate_champion_refuses_altered_files_before_evaluating(settings, model_files, monkeypatch, capsys) -> None:
    from pipelines.cli import main
    from pipelines.core import settings as settings_module
    from pipelines.io.registry import Registry
    from pipelines.model import holdout

    registry = MemoryRegistry(1)
    _attest(registry, settings, "1")
    monkeypatch.setattr(settings_module, "get_settings", lambda: settings)
    monkeypatch.setattr(Registry, "from_settings", classmethod(lambda cls, s: registry))
    evaluated = []
    monkeypatch.setattr(holdout, "evaluate_on_source", lambda *a, **k: evaluated.append(a) or {})
    (model_files / "artifacts" / "bundle.json").write_text('{"temperature": 9.9}')
    code = main(["evaluate", "--model", "champion", "--task", TASK, "--source", "lab-b"])
    assert code == 2 and "refused (artifact_mismatch)" in capsys.readouterr().err
    assert evaluated == []
