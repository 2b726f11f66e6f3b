"""Promotion attestation: a signed statement that a registered version passed the gate, and its check.

When a version is about to become ``@champion`` (promote, approve, rollback), the promotion job signs a
statement with its Ed25519 private key: the registered model and version, the sha256 of every file of the
version's model (weights, ``bundle.json``, MLmodel, environment files), the sha256 of the gate report JSON,
its dataset version and thresholds, a promotion sequence number, and who/when/why. The canonical JSON
(sorted keys, no spaces) is what is signed; the envelope (statement, signature, key id) is stored as run
artifact ``layout.attestation_path(sequence)`` and as version tag ``layout.ATTESTATION_TAG``, and both
are read back and verified before any alias moves.

Serving (and ``leukops evaluate --model champion``) verify with the PUBLIC key from their own settings,
never one found in MLflow or S3: a version is refused unless its envelope verifies, names this very
model, version and run, carries the newest sequence (the highest among every version's verifying
envelope, and never below what this process already served: an attested but since-demoted version
cannot simply be re-aliased), and the files downloaded hash exactly as signed. Ed25519, not an HMAC: a
verifier holding an HMAC key could sign.

Keys: ``settings.promotion_signing_key`` (the job only) and ``settings.serving.attestation_public_key``;
in the ``dev`` profile both default to the pair in ``<state_dir>/keys`` (``leukops keys generate``, made by
``leukops stack up``). Without a key nothing is signed and every version is refused.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from pipelines.core.errors import LeukopsError
from pipelines.core.settings import Settings, SettingsError, env_name
from pipelines.io import tracking
from pipelines.io.layout import ATTESTATION_TAG, GATE_REPORT_JSON, attestation_path, run_model_uri

if TYPE_CHECKING:
    from pipelines.io.registry import Registry
    from pipelines.model.bundle import LoadedModel

STATEMENT_FORMAT = "leukops.attestation/1"
DEV_KEY_DIR = "keys"  # under the state dir
PRIVATE_KEY_FILE = "promotion-signing.pem"
PUBLIC_KEY_FILE = "promotion-signing.pub.pem"
# why a version is refused: bounded codes (a metrics label); the detail goes to the logs and the audit record
REFUSAL_REASONS = (
    "no_public_key",
    "no_attestation",
    "bad_signature",
    "wrong_version",
    "stale_sequence",
    "artifact_mismatch",
)


class AttestationError(LeukopsError):
    """A key or an attestation that cannot be used; the message names the file or version and why."""


class NotAttestedError(AttestationError):
    """A version that must not be served; ``reason`` is one of ``REFUSAL_REASONS``."""

    def __init__(self, version: str, reason: str, detail: str) -> None:
        super().__init__(f"version {version} refused ({reason}): {detail}")
        self.version, self.reason, self.detail = version, reason, detail


@dataclass(frozen=True)
class Statement:
    """What the promotion job vouches for; every field is signed."""

    model: str
    version: str
    run_id: str
    artifacts: dict[str, str]  # relative path in the model folder -> sha256
    gate_report_sha256: str
    dataset_version: str
    thresholds: dict[str, Any]
    sequence: int
    action: str  # promote | approve | rollback
    who: str
    why: str
    signed_at: str
    key_id: str
    format: str = STATEMENT_FORMAT

    def summary(self) -> dict[str, Any]:
        """What ``GET /v1/model`` reports of a verified statement."""
        return {
            "valid": True,
            "key_id": self.key_id,
            "signed_at": self.signed_at,
            "gate_report_sha256": self.gate_report_sha256,
            "sequence": self.sequence,
        }


UNATTESTED = {"valid": False, "key_id": None, "signed_at": None, "gate_report_sha256": None, "sequence": None}


# --- pure pieces ------------------------------------------------------------------------------------


def canonical_json(data: dict[str, Any]) -> bytes:
    """The signed bytes: sorted keys, no whitespace, UTF-8, no NaN."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def key_id(public_key: Ed25519PublicKey) -> str:
    """First 16 hex digits of the sha256 of the raw 32-byte public key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def sign(statement: Statement, private_key: Ed25519PrivateKey) -> str:
    """The envelope (JSON text) stored as run artifact and version tag."""
    body = asdict(statement)
    signature = base64.b64encode(private_key.sign(canonical_json(body))).decode()
    return json.dumps({"statement": body, "signature": signature, "key_id": statement.key_id}, sort_keys=True)


def verify(envelope: str, public_key: Ed25519PublicKey, where: str) -> Statement:
    """The statement of ``envelope`` if ``public_key`` signed it; AttestationError naming ``where`` if not."""
    try:
        data = json.loads(envelope)
        body, signature = data["statement"], base64.b64decode(data["signature"], validate=True)
        public_key.verify(signature, canonical_json(body))
        statement = Statement(**body)
    except InvalidSignature as err:
        raise AttestationError(f"{where}: the signature does not verify with key {key_id(public_key)}") from err
    except (ValueError, KeyError, TypeError) as err:
        raise AttestationError(f"{where}: not a leukops attestation ({err})") from err
    if statement.format != STATEMENT_FORMAT or statement.key_id != key_id(public_key):
        raise AttestationError(f"{where}: format {statement.format!r} / key {statement.key_id} is not ours")
    return statement


def newest_sequence(envelopes: Iterable[str], public_key: Ed25519PublicKey) -> int:
    """The highest sequence among the envelopes that verify (0 when none does); forgeries do not count."""
    sequences = [0]
    for envelope in envelopes:
        try:
            sequences.append(verify(envelope, public_key, "a version tag").sequence)
        except AttestationError:
            continue
    return max(sequences)


def file_digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder``, by POSIX path relative to it."""
    digests = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        with path.open("rb") as f:
            digests[path.relative_to(folder).as_posix()] = hashlib.file_digest(f, "sha256").hexdigest()
    return digests


def artifact_mismatches(signed: dict[str, str], downloaded: dict[str, str]) -> list[str]:
    """Files whose bytes differ from the statement, or that only one side has."""
    return sorted(p for p in signed.keys() | downloaded.keys() if signed.get(p) != downloaded.get(p))


def check_servable(statement: Statement, model: str, version: str, run_id: str | None, newest: int) -> None:
    """Refuse a verified statement that is about another version or is not the newest promotion."""
    if (statement.model, statement.version, statement.run_id) != (model, version, run_id):
        raise NotAttestedError(
            version, "wrong_version", f"signed for {statement.model} v{statement.version} run {statement.run_id}"
        )
    if statement.sequence < newest:
        raise NotAttestedError(
            version, "stale_sequence", f"sequence {statement.sequence} is older than promotion {newest}"
        )


# --- keys ---------------------------------------------------------------------------------------------


def generate_key_pair(directory: Path) -> tuple[Path, Path]:
    """A new Ed25519 pair as PEM files in ``directory``: the private key 0600 (never overwritten), the public
    key 0644. Returns (private, public)."""
    directory.mkdir(parents=True, exist_ok=True)
    private, public = directory / PRIVATE_KEY_FILE, directory / PUBLIC_KEY_FILE
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    try:
        fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as err:
        raise AttestationError(f"{private} exists; refusing to overwrite a signing key") from err
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    public.chmod(0o644)
    return private, public


def ensure_dev_key_pair(settings: Settings) -> Path:
    """The dev profile's pair in ``<state_dir>/keys``, made once (the local stack and the demo call this)."""
    directory = settings.state_dir.resolve() / DEV_KEY_DIR
    if not (directory / PRIVATE_KEY_FILE).exists():
        generate_key_pair(directory)
    return directory


def read_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as err:
        raise AttestationError(f"{path}: not a readable Ed25519 private key ({err})") from err
    if not isinstance(key, Ed25519PrivateKey):
        raise AttestationError(f"{path}: a {type(key).__name__}, not an Ed25519 private key")
    return key


def read_public_key(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError, TypeError) as err:
        raise AttestationError(f"{path}: not a readable Ed25519 public key ({err})") from err
    if not isinstance(key, Ed25519PublicKey):
        raise AttestationError(f"{path}: a {type(key).__name__}, not an Ed25519 public key")
    return key


def _configured(settings: Settings, value: Path | None, file_name: str) -> Path | None:
    """The configured path; in dev the state dir's pair when one exists."""
    if value is not None:
        return value
    dev_file = settings.state_dir.resolve() / DEV_KEY_DIR / file_name
    return dev_file if settings.profile == "dev" and dev_file.exists() else None


def signing_key(settings: Settings) -> Ed25519PrivateKey:
    path = _configured(settings, settings.promotion_signing_key, PRIVATE_KEY_FILE)
    if path is None:
        raise SettingsError(
            f"{env_name('promotion_signing_key')} is not set (profile {settings.profile!r}): promotions are signed; "
            "make a pair with `leukops keys generate --out DIR`"
        )
    return read_private_key(path)


def verifying_key(settings: Settings) -> Ed25519PublicKey | None:
    """Serving's public key (None: not configured, every version is refused)."""
    path = _configured(settings, settings.serving.attestation_public_key, PUBLIC_KEY_FILE)
    return None if path is None else read_public_key(path)


# --- adapters ---------------------------------------------------------------------------------------------


def _gate_report(registry: Registry, run_id: str, where: str) -> tuple[str, dict[str, Any]]:
    text = registry.read_text(run_id, GATE_REPORT_JSON)
    if text is None:
        raise AttestationError(f"{where}: run {run_id} has no gate report ({GATE_REPORT_JSON}); gate it first")
    report = json.loads(text)
    if report.get("passed") is not True:
        raise AttestationError(f"{where}: its gate report says it did not pass (failed: {report.get('failed')})")
    return hashlib.sha256(text.encode()).hexdigest(), report


def _model_digests(settings: Settings, run_id: str) -> dict[str, str]:
    with tempfile.TemporaryDirectory(prefix="leukops-attest-") as tmp:
        local, _ = tracking.download_model(settings, run_model_uri(run_id), Path(tmp))
        return file_digests(local)


def attest(
    registry: Registry, settings: Settings, task: str, version: str, action: str, why: str, who: str
) -> Statement:
    """Sign ``version`` as the newest promotion of the task's model, store it, read it back and verify it.

    Called before ``@champion`` moves to ``version``; any error here leaves the aliases untouched.
    """
    key = signing_key(settings)
    record = registry.version(task, version)
    where = f"{record.name} v{record.version}"
    if not record.run_id:
        raise AttestationError(f"{where} has no training run to attest")
    report_sha, report = _gate_report(registry, record.run_id, where)
    public = key.public_key()
    statement = Statement(
        model=record.name,
        version=record.version,
        run_id=record.run_id,
        artifacts=_model_digests(settings, record.run_id),
        gate_report_sha256=report_sha,
        dataset_version=str(report.get("dataset_version", "")),
        thresholds=report.get("thresholds") or {},
        sequence=newest_sequence(version_envelopes(registry, task), public) + 1,
        action=action,
        who=who,
        why=why,
        signed_at=datetime.now(UTC).isoformat(timespec="seconds"),
        key_id=key_id(public),
    )
    envelope = sign(statement, key)
    registry.log_text(record.run_id, envelope, attestation_path(statement.sequence))
    registry.tag_version(task, version, {ATTESTATION_TAG: envelope})
    stored = (
        registry.version(task, version).tags.get(ATTESTATION_TAG),
        registry.read_text(record.run_id, attestation_path(statement.sequence)),
    )
    if stored != (envelope, envelope) or verify(envelope, public, where) != statement:
        raise AttestationError(f"{where}: the attestation read back differs from the one written")
    return statement


def version_envelopes(registry: Registry, task: str) -> list[str]:
    return [v.tags[ATTESTATION_TAG] for v in registry.versions(task) if ATTESTATION_TAG in v.tags]


def verified_download(
    registry: Registry,
    settings: Settings,
    task: str,
    version: str,
    public_key: Ed25519PublicKey | None,
    floor: int,
    dst: Path,
) -> tuple[Path, str | None, Statement]:
    """Download ``version``'s model into ``dst`` and prove it is the newest attested promotion.

    Returns (model folder, run id, statement); NotAttestedError says why a version is refused.
    ``floor``: the sequence this process already trusts (a served version's), which no version may undercut.
    """
    if public_key is None:
        raise NotAttestedError(version, "no_public_key", f"{env_name('serving.attestation_public_key')} is not set")
    record = registry.version(task, version)
    where = f"{record.name} v{record.version}"
    envelope = record.tags.get(ATTESTATION_TAG)
    if envelope is None:
        raise NotAttestedError(version, "no_attestation", f"{where} has no {ATTESTATION_TAG!r} tag")
    try:
        statement = verify(envelope, public_key, where)
    except AttestationError as err:
        raise NotAttestedError(version, "bad_signature", str(err)) from err
    newest = max(floor, newest_sequence(version_envelopes(registry, task), public_key))
    check_servable(statement, record.name, record.version, record.run_id, newest)
    local, run_id = tracking.download_model(settings, run_model_uri(statement.run_id), dst)
    differing = artifact_mismatches(statement.artifacts, file_digests(local))
    if differing:
        raise NotAttestedError(
            version, "artifact_mismatch", f"{where}: files differ from the signed hashes: {differing}"
        )
    return local, run_id, statement


def load_verified(
    registry: Registry, settings: Settings, task: str, version: str, public_key: Ed25519PublicKey | None, floor: int
) -> tuple[LoadedModel, Statement]:
    """The model of ``version`` read from the very files whose hashes were verified."""
    from pipelines.model.bundle import BUNDLE_DIR_IN_MODEL, read_bundle

    with tempfile.TemporaryDirectory(prefix="leukops-model-") as tmp:
        local, run_id, statement = verified_download(registry, settings, task, version, public_key, floor, Path(tmp))
        return read_bundle(local / BUNDLE_DIR_IN_MODEL, run_id), statement


def verify_champion(settings: Settings, task: str) -> Statement:
    """The task's ``@champion`` proven the newest attested promotion with intact files (QA's check before
    evaluating it); NotAttestedError says why not."""
    from pipelines.io.registry import Registry

    registry = Registry.from_settings(settings)
    champion = registry.champion(task)
    if champion is None:
        raise AttestationError(f"{settings.registered_model_name(task)} has no @champion version")
    with tempfile.TemporaryDirectory(prefix="leukops-verify-") as tmp:
        key = verifying_key(settings)
        return verified_download(registry, settings, task, champion.version, key, 0, Path(tmp))[2]
