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
    label: str  # which model the weights came from, e.g. "champion v3 (run abc)"; tags the run
    state: dict[str, torch.Tensor]


def same_network(bundle_fields: tuple[str, int, tuple[str, ...]], spec: CandidateSpec) -> bool:
    """A saved model (backbone, input size, classes) whose weights fit the candidate's module as they are."""
    return bundle_fields == (spec.backbone, spec.image_size, get_task(spec.task).classes)


def champion_start(settings: Settings, spec: CandidateSpec) -> WarmStart | None:
    """The task's @champion weights when it is the candidate's network, so a retrain on a grown dataset
    (a new lab's images added) fine-tunes the model that serves instead of restarting from ImageNet;
    None before the first promotion or when the grid changed the backbone, size or classes."""
    from pipelines.io.registry import Registry
    from pipelines.model.bundle import load_model

    champion = Registry.from_settings(settings).champion(spec.task)
    if champion is None:
        return None
    loaded = load_model(champion.model_uri, settings=settings)
    bundle = loaded.bundle
    if not same_network((bundle.backbone, bundle.image_size, tuple(bundle.classes)), spec):
        log.info(
            "warm start: champion v%s is %s at %s px; starting from ImageNet",
            champion.version,
            bundle.backbone,
            bundle.image_size,
        )
        return None
    return WarmStart(f"champion v{champion.version} (run {champion.run_id})", loaded.module.state_dict())
