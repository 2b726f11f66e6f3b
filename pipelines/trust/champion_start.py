"""The warm start's champion read (`pipelines.model.warm_start`): the @champion's weights, taken through the
attestation check serving uses, so a retrain never fine-tunes a model that would not be served."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from pipelines.model.warm_start import WarmStart, same_network

if TYPE_CHECKING:
    from pipelines.core.settings import Settings
    from pipelines.model.candidate import CandidateSpec

log = logging.getLogger(__name__)


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
