"""Warm start: a retrain on a grown dataset (a new lab's images added) may fine-tune the model that serves
instead of restarting from ImageNet (``retrain.warm_start``). Only the same network qualifies: the
@champion's backbone, input size and classes must be the candidate's, so its weights load as they are.

Reading the champion checks its attestation, which is the trust wing's (``pipelines.trust.champion_start``):
training takes that reader injected (`ChampionReader`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from pipelines.core.taxonomy import get_task

if TYPE_CHECKING:
    from pipelines.core.settings import Settings
    from pipelines.model.candidate import CandidateSpec

WARM_START_TAG = "warm_start"  # run tag: which model the weights came from


@dataclass(frozen=True)
class WarmStart:
    label: str  # which model the weights came from, e.g. "champion v3 (run abc)", or why none did; tags the run
    state: dict[str, torch.Tensor] | None  # None: the champion was refused (not verified)


def same_network(bundle_fields: tuple[str, int, tuple[str, ...]], spec: CandidateSpec) -> bool:
    """A saved model (backbone, input size, classes) whose weights fit the candidate's module as they are."""
    return bundle_fields == (spec.backbone, spec.image_size, get_task(spec.task).classes)


# (settings, candidate) -> the weights to start from, or None (no champion, another network)
ChampionReader = Callable[["Settings", "CandidateSpec"], "WarmStart | None"]
