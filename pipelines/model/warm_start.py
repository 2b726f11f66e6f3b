"""Warm start: a retrain on a grown dataset (a new lab's images added) may fine-tune the model that serves
instead of restarting from ImageNet (``retrain.warm_start``). Only the same network qualifies: the
@champion's backbone, input size and classes must be the candidate's, so its weights load as they are."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from pipelines.core.taxonomy import get_task

if TYPE_CHECKING:
    from pipelines.core.settings import Settings
    from pipelines.model.candidate import CandidateSpec

log = logging.getLogger(__name__)
WARM_START_TAG = "warm_start"  # run tag: which model the weights came from


@dataclass(frozen=True)
class WarmStart:
    label: str  # which model the weights came from, e.g. "champion v3 (run abc)", or why none did; tags the run
    state: dict[str, torch.Tensor] | None  # None: the champion was refused (not verified)


def same_network(bundle_fields: tuple[str, int, tuple[str, ...]], spec: CandidateSpec) -> bool:
    """A saved model (backbone, input size, classes) whose weights fit the candidate's module as they are."""
    return bundle_fields == (spec.backbone, spec.image_size, get_task(spec.task).classes)


def champion_start(settings: Settings, spec: CandidateSpec) -> WarmStart | None:
    """The task's @champion weights when it is the candidate's network, so a retrain on a grown dataset
    (a new lab's images added) fine-tunes the model that serves instead of restarting from ImageNet;
    None before the first promotion or when the grid changed the backbone, size or classes.

    The weights are read from the files whose hashes the champion's attestation signs (as serving reads
    them): a champion that is not the newest attested promotion, or whose files were altered, is not
    fine-tuned; the candidate starts from ImageNet and its tag says why."""
    from pipelines.io.registry import Registry
    from pipelines.trust.attestation import AttestationError, load_verified, verifying_key

    registry = Registry.from_settings(settings)
    champion = registry.champion(spec.task)
    if champion is None:
        return None
    where = f"champion v{champion.version} (run {champion.run_id})"
    try:
        loaded, _ = load_verified(registry, settings, spec.task, champion.version, verifying_key(settings), 0)
    except AttestationError as err:
        log.warning("warm start: %s is not verified, starting from ImageNet: %s", where, err)
        return WarmStart(f"refused {where}: {err}", None)
    bundle = loaded.bundle
    if not same_network((bundle.backbone, bundle.image_size, tuple(bundle.classes)), spec):
        log.info("warm start: %s is %s at %s px; starting from ImageNet", where, bundle.backbone, bundle.image_size)
        return None
    return WarmStart(where, loaded.module.state_dict())
