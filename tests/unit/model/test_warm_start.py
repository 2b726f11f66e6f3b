"""Warm start: the @champion's weights start a candidate only when they are the same network."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from pipelines.core.settings import RetrainConfig, Settings
from pipelines.core.taxonomy import get_task
from pipelines.model.candidate import build_run, candidate_spec, prepare_run, train_config
from pipelines.model.warm_start import same_network


def _spec(**options):
    return candidate_spec(RetrainConfig(image_size=32, batch_size=4), "all_subtypes", "custom_cnn", **options)


def test_only_the_same_backbone_size_and_classes_qualify():
    spec, classes = _spec(), get_task("all_subtypes").classes
    assert same_network(("custom_cnn", 32, classes), spec)
    assert not same_network(("custom_cnn", 64, classes), spec)
    assert not same_network(("efficientnet_lite0", 32, classes), spec)
    assert not same_network(("custom_cnn", 32, classes[:3]), spec)
    assert RetrainConfig().warm_start is False and _spec().warm_start is False  # opt-in
    wbc = candidate_spec(RetrainConfig(), "wbc", "efficientnet_lite0")
    assert wbc.warm_start is True, "wbc's recipe: a joining lab fine-tunes the champion"
    assert candidate_spec(RetrainConfig(), "wbc", "efficientnet_lite0", warm_start=False).warm_start is False


def test_a_run_built_from_an_initial_state_starts_from_those_weights(shared_data):
    rows = [
        {"path": f, "label": label, "split": split}
        for label in get_task("all_subtypes").classes
        for f, split in zip(
            sorted((shared_data / "all_taleqani" / label).glob("*.jpg"))[:3], ("train", "val", "test"), strict=True
        )
    ]
    spec, config = _spec(device="cpu"), train_config(RetrainConfig(), epochs=1)
    first = build_run(spec, config, pd.DataFrame(rows), "v", "folder")
    state = {k: v + 0.5 if v.is_floating_point() else v for k, v in first.backbone.model.state_dict().items()}
    warm = build_run(spec, config, pd.DataFrame(rows), "v", "folder", initial_state=state)
    name = next(k for k, v in state.items() if v.is_floating_point())
    assert torch.equal(warm.backbone.model.state_dict()[name], state[name])
    assert not torch.equal(first.backbone.model.state_dict()[name], state[name])


def test_a_warm_start_without_a_champion_reader_is_refused_not_silently_cold(tmp_path):
    """Training cannot read @champion itself (that check is the trust wing's): a warm-started spec must be
    given the reader, or the candidate would quietly restart from ImageNet."""
    spec, config = _spec(warm_start=True), train_config(RetrainConfig(), epochs=1)
    with pytest.raises(ValueError, match="all_subtypes: warm_start is on but no champion reader"):
        prepare_run(Settings(state_dir=tmp_path), spec, config)
