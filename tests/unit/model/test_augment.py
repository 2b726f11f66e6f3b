"""Augmentations built from timm: right shapes, soft targets with label smoothing, a trainable loss."""

from __future__ import annotations

import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.model.augment import AUGMENTATIONS, AugmentationError, build_augmentation
from pipelines.model.preprocess import build_transform, preprocessing_from
from pipelines.model.train import default_criterion

NUM_CLASSES = 4
SIZE = 64


@pytest.fixture(scope="module")
def smear(shared_data: Path) -> np.ndarray:
    path = shared_data / "all_taleqani" / "Pre" / "WBC-Malignant-Pre-001.jpg"
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.mark.parametrize("name", AUGMENTATIONS)
def test_each_augmentation_yields_a_trainable_batch(name: str, smear: np.ndarray) -> None:
    augmentation = build_augmentation(name, NUM_CLASSES, SIZE)
    preprocessing = preprocessing_from({"input_size": (3, SIZE, SIZE), "mean": (0.5,) * 3, "std": (0.5,) * 3})
    transform = pickle.loads(pickle.dumps(build_transform(preprocessing, augmentation.pil_transform)))
    random.seed(0)
    torch.manual_seed(0)
    images = torch.stack([transform(smear) for _ in range(6)])
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    if augmentation.batch_mixer is not None:
        images, targets = augmentation.batch_mixer(images, labels)
    else:
        targets = labels
    assert images.shape == (6, 3, SIZE, SIZE) and torch.isfinite(images).all()
    logits = torch.randn(6, NUM_CLASSES, requires_grad=True)
    loss = default_criterion(0.1, augmentation.batch_mixer)(logits, targets)
    loss.backward()
    assert torch.isfinite(loss) and logits.grad is not None


@pytest.mark.parametrize("name", ["mixup", "cutmix"])
@pytest.mark.parametrize("batch", [6, 5, 1])
def test_mixers_give_smoothed_soft_targets_for_any_batch_size(name: str, batch: int) -> None:
    augmentation = build_augmentation(name, NUM_CLASSES, SIZE)
    assert augmentation.soft_targets
    torch.manual_seed(1)
    images = torch.rand(batch, 3, SIZE, SIZE)
    original = images.clone()
    labels = torch.arange(batch) % NUM_CLASSES
    mixed, targets = augmentation.batch_mixer(images, labels)
    assert mixed.shape == original.shape and targets.shape == (batch, NUM_CLASSES)
    assert torch.allclose(targets.sum(dim=1), torch.ones(batch))
    floor = 0.1 / NUM_CLASSES  # label smoothing 0.1 spreads 0.025 to every class
    assert targets.min() >= floor - 1e-6 and targets.max() <= 1 - 0.1 + floor + 1e-6
    if batch % 2:
        assert torch.equal(mixed[-1], original[-1])  # the odd one out is kept as is
        assert targets[-1].argmax() == labels[-1]
    even = batch - batch % 2
    for i in range(even):  # timm's batch mode pairs image i with image even-1-i: mass only on their labels
        allowed = {int(labels[i]), int(labels[even - 1 - i])}
        others = [c for c in range(NUM_CLASSES) if c not in allowed]
        assert torch.allclose(targets[i, others], torch.full((len(others),), floor))


def test_mixup_blends_two_images() -> None:
    augmentation = build_augmentation("mixup", 2, SIZE, mixup_alpha=1.0)
    torch.manual_seed(3)
    images = torch.stack([torch.zeros(3, SIZE, SIZE), torch.ones(3, SIZE, SIZE)])
    mixed, targets = augmentation.batch_mixer(images, torch.tensor([0, 1]))
    partner_share = float(mixed[0, 0, 0, 0])  # image 0 = lam·zeros + (1 - lam)·ones
    assert 0 < partner_share < 1
    assert torch.allclose(mixed[0], torch.full_like(mixed[0], partner_share))
    assert abs(targets[0, 1] - (partner_share * 0.9 + 0.05)) < 1e-4  # smoothing 0.1 over 2 classes


@pytest.mark.parametrize("name", ["randaug", "augmix"])
def test_pil_augmentations_change_pixels_and_keep_the_size(name: str, smear: np.ndarray) -> None:
    augmentation = build_augmentation(name, NUM_CLASSES, SIZE)
    assert augmentation.batch_mixer is None and not augmentation.soft_targets
    image = Image.fromarray(smear).resize((SIZE, SIZE))
    random.seed(0)
    np.random.seed(0)
    outputs = [augmentation.pil_transform(image) for _ in range(4)]
    assert all(out.size == image.size and out.mode == "RGB" for out in outputs)
    assert any(not np.array_equal(np.asarray(out), np.asarray(image)) for out in outputs)


def test_every_randaug_op_works_at_its_largest_magnitude(smear: np.ndarray) -> None:
    randaug = build_augmentation("randaug", NUM_CLASSES, SIZE).pil_transform
    image = Image.fromarray(smear).resize((SIZE, SIZE))
    for op in randaug.ops:
        op.prob, op.magnitude_std = 1.0, 0.0
        op.magnitude = op.magnitude_max or 10  # the clip bound a gaussian draw can reach
        assert op(image).size == image.size, op.name


def test_none_and_unknown() -> None:
    none = build_augmentation("none", NUM_CLASSES, SIZE)
    assert none.pil_transform is None and none.batch_mixer is None and not none.soft_targets
    with pytest.raises(AugmentationError, match="unknown augmentation 'autoaug'"):
        build_augmentation("autoaug", NUM_CLASSES, SIZE)
