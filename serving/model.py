"""The live model: which registry version serves, hot reload when ``@champion`` moves, batched inference.

A request takes one reference to the current ``ServedModel`` and uses only that object, so swapping the
reference (a single attribute assignment) never disturbs a request in flight: it finishes on the model it
started with. A version that fails to load leaves the old model serving; the failure shows in
``/readyz``. The registry source loads only a version whose promotion attestation verifies with the
public key of serving's own settings (``pipelines.trust.attestation``); a refused version is counted,
audited (logger ``leukops.audit``) and reported by ``/readyz`` as "refused: not attested", nothing more.
Inference runs on one worker thread that gathers concurrent requests into micro-batches: on CPU one
forward pass over N images is cheaper than N passes, and one thread avoids oversubscribing the cores
PyTorch already parallelises over.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from pipelines.core.errors import LeukopsError
from pipelines.core.settings import SettingsError, env_name
from pipelines.model.predict import predict
from pipelines.trust.attestation import UNATTESTED, NotAttestedError, Statement, load_verified, verifying_key

if TYPE_CHECKING:
    from pipelines.core.settings import Settings
    from pipelines.model.bundle import LoadedModel

log = logging.getLogger("leukops.serving")
audit_log = logging.getLogger("leukops.audit")
REFUSED = "refused: not attested"  # all /readyz says of a refusal: the reason and detail go to the audit log


class ModelUnavailableError(LeukopsError):
    """No model version could be loaded yet (the app answers 503 until one is)."""


@dataclass(frozen=True)
class ModelVersion:
    """A registered model version as the registry describes it."""

    name: str
    version: str
    aliases: tuple[str, ...] = ()
    tags: dict[str, str] = field(default_factory=dict)
    run_id: str | None = None


class ModelSource(Protocol):
    """Where the served model comes from: an alias to poll and a way to load a version."""

    name: str
    task: str

    def resolve(self) -> str:
        """The version the alias points at now."""

    def describe(self, version: str) -> ModelVersion: ...

    def load(self, version: str) -> LoadedModel: ...

    def attestation(self, version: str) -> dict[str, Any]:
        """What ``GET /v1/model`` reports of the loaded version's attestation (``UNATTESTED`` if none)."""


class ChampionSource:
    """The ``@champion`` version of ``leukops-<task>`` in the MLflow registry, loaded by version number.

    Loading the resolved version (not the alias) makes the loaded weights exactly the version that
    ``resolve`` saw, even if the alias moves again during the download. Only the newest attested
    promotion loads: ``newest_sequence`` (the served version's) only grows.
    """

    def __init__(self, settings: Settings, task: str | None = None) -> None:
        from pipelines.io.registry import Registry

        self.task = task or settings.serving.task
        self.name = settings.registered_model_name(self.task)
        self.registry = Registry.from_settings(settings)
        self.settings = settings
        self.public_key = _public_key(settings)
        self.newest_sequence = 0
        self._statements: dict[str, Statement] = {}

    def resolve(self) -> str:
        champion = self.registry.champion(self.task)
        if champion is None:
            raise ModelUnavailableError(f"{self.name} has no @champion version (promote a model first)")
        return champion.version

    def describe(self, version: str) -> ModelVersion:
        record = self.registry.version(self.task, version)
        return ModelVersion(self.name, record.version, record.aliases, record.tags, record.run_id)

    def load(self, version: str) -> LoadedModel:
        """The version's canonical model, read from its training run's model bundle.

        The run's model is what the version was registered from; reading it by run id does not depend
        on how the registry recorded the version's source (a run-artifact path or a logged-model id).
        """
        loaded, statement = load_verified(
            self.registry, self.settings, self.task, version, self.public_key, self.newest_sequence
        )
        self.newest_sequence = statement.sequence
        self._statements[version] = statement
        return loaded

    def attestation(self, version: str) -> dict[str, Any]:
        statement = self._statements.get(version)
        return statement.summary() if statement else dict(UNATTESTED)


def _public_key(settings: Settings):
    """Serving's verifying key. Outside dev a missing key, or a signing key within reach, stops start-up."""
    key = verifying_key(settings)
    if settings.profile != "dev":
        if key is None:
            raise SettingsError(f"{env_name('serving.attestation_public_key')} is not set: serving verifies promotions")
        if settings.promotion_signing_key is not None:
            raise SettingsError(
                f"{env_name('promotion_signing_key')} is set for serving: the signing key stays with promotion"
            )
    if key is None:
        log.warning("no attestation public key: every version of %s will be refused", settings.serving.task)
    return key


@dataclass
class ServedModel:
    """One loaded version. ``lock`` serialises work on its module (Grad-CAM hooks vs. batched forwards)."""

    version: ModelVersion
    model: LoadedModel
    loaded_at: float
    lock: threading.Lock = field(default_factory=threading.Lock)
    attestation: dict[str, Any] = field(default_factory=lambda: dict(UNATTESTED))

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.model.classes)


@dataclass
class ReloadStatus:
    last_check: float | None = None
    last_error: str | None = None
    failed_version: str | None = None
    refused_version: str | None = None  # the last version refused as not attested
    refusals: int = 0
    reloads: int = 0


class ModelHolder:
    """Holds the current ``ServedModel`` and polls the source for a new version in a daemon thread."""

    def __init__(
        self, source: ModelSource, reload_interval_s: float, on_refusal: Callable[[str], None] | None = None
    ) -> None:
        self.source = source
        self.reload_interval_s = reload_interval_s
        self.on_refusal = on_refusal or (lambda reason: None)  # e.g. a Prometheus counter, by reason
        self.status = ReloadStatus()
        self._current: ServedModel | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def current(self) -> ServedModel | None:
        return self._current

    def require(self) -> ServedModel:
        served = self._current
        if served is None:
            raise ModelUnavailableError(
                f"no version of {self.source.name} is loaded yet: {self.status.last_error or 'still loading'}"
            )
        return served

    def start(self) -> None:
        """Load the current version now (failures are recorded, not raised), then poll in the background."""
        self.check_for_update()
        self._thread = threading.Thread(target=self._poll, name="leukops-model-poller", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _poll(self) -> None:
        while not self._stop.wait(self.reload_interval_s):
            self.check_for_update()

    def check_for_update(self) -> bool:
        """Swap in the alias's version if it changed; True when a new version went live."""
        self.status.last_check = time.time()
        try:
            version = self.source.resolve()
        except Exception as err:  # noqa: BLE001 - a registry outage must not kill the poller
            self._record_failure(self.status.failed_version, f"cannot resolve the alias of {self.source.name}: {err}")
            return False
        current = self._current
        if current is not None and current.version.version == version:
            self.status.last_error = self.status.failed_version = self.status.refused_version = None
            return False
        if version == self.status.failed_version and (current is not None or version == self.status.refused_version):
            return False  # already failed to load; the old model serves until the alias moves again
        # with no model loaded at all, a failed version is retried on every poll (e.g. S3 was briefly down);
        # a refused one is not: its attestation will not change by waiting
        try:
            served = self._load(version)
        except NotAttestedError as err:
            self._refuse(version, err)
            return False
        except Exception as err:  # noqa: BLE001 - any load failure keeps the old model serving
            self._record_failure(version, f"loading {self.source.name} version {version} failed: {err}")
            return False
        self._current = served
        self.status.reloads += 1
        self.status.last_error = self.status.failed_version = self.status.refused_version = None
        log.info("serving %s version %s", self.source.name, version)
        return True

    def _load(self, version: str) -> ServedModel:
        model = self.source.load(version)
        model.module.to(memory_format=torch.channels_last)  # NHWC convolutions are faster on CPU (and GPU)
        return ServedModel(
            self.source.describe(version), model, time.time(), attestation=self.source.attestation(version)
        )

    def _refuse(self, version: str, err: NotAttestedError) -> None:
        """Keep the current model; count, audit and report the refusal (its details only in the audit log)."""
        self._record_failure(version, REFUSED)
        self.status.refused_version = version
        self.status.refusals += 1
        self.on_refusal(err.reason)
        record = {
            "action": "refuse",
            "who": "serving",
            "model": self.source.name,
            "version": version,
            "reason": err.reason,
            "detail": err.detail,
            "serving": self._current.version.version if self._current else None,
            "when": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        audit_log.warning(json.dumps(record, sort_keys=True))

    def _record_failure(self, version: str | None, message: str) -> None:
        self.status.last_error = message
        self.status.failed_version = version
        log.warning("%s%s", message, "; keeping the current model" if self._current else "")

    def describe_current(self) -> ModelVersion:
        """The live version with fresh aliases and tags (they move after load); cached on registry errors."""
        served = self.require()
        try:
            return self.source.describe(served.version.version)
        except Exception as err:  # noqa: BLE001 - describing is best effort; serving does not depend on it
            log.warning("describing %s version %s failed: %s", self.source.name, served.version.version, err)
            return served.version

    def readiness(self) -> dict[str, Any]:
        served = self._current
        return {
            "ready": served is not None,
            "model": self.source.name,
            "version": served.version.version if served else None,
            "loaded_at": served.loaded_at if served else None,
            "last_check": self.status.last_check,
            "reloads": self.status.reloads,
            "reload_error": self.status.last_error,
            "failed_version": self.status.failed_version,
            "reload_state": REFUSED if self.status.refused_version else None,  # /readyz shows this, not the error
            "refused_version": self.status.refused_version,
            "refusals": self.status.refusals,
        }


@dataclass(frozen=True)
class Prediction:
    proba: np.ndarray  # (n_classes,)
    embedding: np.ndarray | None
    served: ServedModel
    batch_size: int


def forward(served: ServedModel, batch: torch.Tensor, with_embeddings: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Class probabilities (the bundle's temperature and TTA) and optional pooled embeddings.

    Through the one predict function (`pipelines.model.predict.predict`), which takes the embedding (the
    head's GAP output, what ``LoadedModel.embed`` returns) from the same encoder pass as the logits.
    """
    with served.lock:
        x = batch.to(served.model.device).contiguous(memory_format=torch.channels_last)
        out = predict(served.model.module, x, served.model.inference, with_embeddings=with_embeddings)
    return out.proba, out.embedding


@dataclass
class _Job:
    served: ServedModel
    tensor: torch.Tensor  # one preprocessed image, 3xHxW
    future: Future


class BatchPredictor:
    """One inference thread that runs up to ``max_batch`` queued images per forward pass.

    A job carries the model it was preprocessed for, so a batch never mixes versions and a request that
    started before a hot reload finishes on its own version.
    """

    def __init__(self, max_batch: int, wait_ms: float, with_embeddings: bool) -> None:
        self.max_batch = max(1, max_batch)
        self.wait_s = wait_ms / 1000.0
        self.with_embeddings = with_embeddings
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="leukops-inference", daemon=True)
        self._thread.start()

    def submit(self, served: ServedModel, tensor: torch.Tensor) -> Future:
        future: Future = Future()
        self._jobs.put(_Job(served, tensor, future))
        return future

    def stop(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while (first := self._jobs.get()) is not None:
            batch = [first, *self._gather()]
            jobs = [job for job in batch if job is not None]
            for served in {id(job.served): job.served for job in jobs}.values():
                self._predict([job for job in jobs if job.served is served])
            if batch[-1] is None:
                return

    def _gather(self) -> list[_Job | None]:
        """More jobs that arrive within the wait window (a ``None`` ends the batch and the thread)."""
        jobs: list[_Job | None] = []
        deadline = time.monotonic() + self.wait_s
        while len(jobs) + 1 < self.max_batch:
            try:
                job = self._jobs.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            jobs.append(job)
            if job is None:
                break
        return jobs

    def _predict(self, jobs: list[_Job]) -> None:
        # A request cancelled while queued (client gone, shutdown timeout) has a cancelled future:
        # drop it here, since setting a result on it would raise and kill this thread.
        jobs = [job for job in jobs if job.future.set_running_or_notify_cancel()]
        if not jobs:
            return
        try:
            batch = torch.stack([job.tensor for job in jobs])
            proba, embeddings = forward(jobs[0].served, batch, self.with_embeddings)
        except Exception as err:  # noqa: BLE001 - the error belongs to the requests, not to this thread
            for job in jobs:
                job.future.set_exception(err)
            return
        for i, job in enumerate(jobs):
            embedding = embeddings[i] if embeddings is not None else None
            job.future.set_result(Prediction(proba[i], embedding, job.served, len(jobs)))
