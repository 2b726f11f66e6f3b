"""The causal shortcut test: pure interventions, and the detector on real trained models.

The acceptance test trains two tiny ``custom_cnn`` models (128 px, last feature map 8x8) on synthetic
smears through the real training loop: one WITH the planted class-dependent corner label, one without
(negative control). The detector must flag the first (high flip rate, Grad-CAM mass far above the
corner's area share) and clear the second (flip rate near zero while it still classifies the cells).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from pipelines.core.corners import LABEL_CORNER, corner_box
from pipelines.trust.localization import box_mask
from pipelines.trust.shortcut import (
    ShortcutTestError,
    fill_region,
    intervention_effect,
    label_corner_first,
    shortcut_test,
    swap_region,
)

SIZE = 128
TASK = "five_class"
CLASSES = ("ALL", "AML", "CLL")  # three distinct morphologies: the control can learn the cells
CONFOUNDED_SHARE = 1 / 2


def _corner_colour_classifier(images: list[np.ndarray]) -> np.ndarray:
    """A pure shortcut: class = which of three colours the label corner's centre has."""
    y0, y1, x0, x1 = corner_box(*images[0].shape[:2])
    centres = np.stack([img[(y0 + y1) // 2, (x0 + x1) // 2] for img in images]).astype(float)
    palette = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], float)
    return -((centres[:, None] - palette[None]) ** 2).sum(-1)


def _centre_classifier(images: list[np.ndarray]) -> np.ndarray:
    """Looks only at the image centre (never at a corner)."""
    centres = np.stack([img[img.shape[0] // 2, img.shape[1] // 2] for img in images]).astype(float)
    return centres


def _marked_images(n_per_class: int = 4) -> tuple[list[np.ndarray], np.ndarray]:
    rng = np.random.default_rng(0)
    palette = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    images, labels = [], []
    for cls, colour in enumerate(palette):
        for _ in range(n_per_class):
            img = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            y0, y1, x0, x1 = corner_box(64, 64)
            img[y0:y1, x0:x1] = colour
            img[32, 32] = palette[cls]
            images.append(img)
            labels.append(cls)
    return images, np.array(labels)


def test_fill_changes_only_the_region() -> None:
    images, _ = _marked_images(1)
    filled = fill_region(images, label_corner_first, LABEL_CORNER, fill="grey")
    inside = box_mask(64, 64, corner_box(64, 64))
    for before, after in zip(images, filled, strict=True):
        assert (after[inside] == 128).all()
        assert (after[~inside] == before[~inside]).all()


def test_swap_takes_the_region_from_another_class() -> None:
    images, labels = _marked_images(3)
    swapped = swap_region(images, labels, label_corner_first, LABEL_CORNER, np.random.default_rng(1))
    predicted = _corner_colour_classifier(swapped).argmax(1)
    assert (predicted != labels).all()


def test_swap_needs_two_classes() -> None:
    images, labels = _marked_images(2)
    with pytest.raises(ShortcutTestError, match="two classes"):
        swap_region(images[:2], labels[:2], label_corner_first, LABEL_CORNER, np.random.default_rng(0))


def test_pure_corner_classifier_flips_every_prediction() -> None:
    images, labels = _marked_images(4)
    report = shortcut_test(_corner_colour_classifier, images, labels)
    assert report.flip_rate == 1.0
    assert report.worst[:2] == (LABEL_CORNER, "swap")
    assert report.f1_drop == pytest.approx(1.0)
    other = report.effects["top_left"]
    assert other["fill"].flip_rate == 0.0 and other["swap"].flip_rate == 0.0


def test_centre_classifier_never_flips() -> None:
    images, labels = _marked_images(4)
    report = shortcut_test(_centre_classifier, images, labels)
    assert report.flip_rate == 0.0 and report.f1_drop == 0.0
    data = report.to_dict()
    assert data["flips"] == 0 and data["n_images"] == 12
    assert data["flip_rate_upper"] == pytest.approx(1 - 0.05 ** (1 / 12))  # exact: 0 of n
    assert set(data["regions"]) == {"bottom_right", "bottom_left", "top_right", "top_left"}
    assert data["regions"]["bottom_right"]["area_share"] == pytest.approx(11 * 17 / 64**2)


def test_effect_counts_flips_and_f1() -> None:
    labels = np.array([0, 0, 1, 1])
    effect = intervention_effect(labels, np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]))
    assert effect.flip_rate == 0.25 and effect.flips == 1
    assert effect.macro_f1_before == 1.0 and 0 < effect.macro_f1_after < 1.0


def test_rejects_mismatched_inputs() -> None:
    images, labels = _marked_images(1)
    with pytest.raises(ShortcutTestError, match="matching"):
        shortcut_test(_centre_classifier, images, labels[:1])


# -- the detector on real trained models ----------------------------------------------------------------


def _smears(offset: int, n: int) -> tuple[list[np.ndarray], np.ndarray]:
    from pipelines.devstack.synthetic import synth_sample

    images, labels = [], []
    for index, label in enumerate(CLASSES):
        for i in range(n):
            images.append(synth_sample(TASK, label, offset + i, SIZE, seed=0).rgb)
            labels.append(index)
    return images, np.array(labels)


def _confounded(images: list[np.ndarray], labels: np.ndarray, seed: int) -> tuple[list, np.ndarray]:
    """A set where the corner label always names the class but half of the cells belong to another.

    Like a scanner label confounded with the class in a real collection: the corner predicts the
    class perfectly, the cells only mostly, so the model has every reason to read the corner.
    """
    from pipelines.devstack.smear_drawing import paint_corner_mark

    rng = np.random.default_rng(seed)
    relabelled = labels.copy()
    moved = rng.random(len(labels)) < CONFOUNDED_SHARE
    relabelled[moved] = (labels[moved] + rng.integers(1, len(CLASSES), moved.sum())) % len(CLASSES)
    return [paint_corner_mark(img, int(c)) for img, c in zip(images, relabelled, strict=True)], relabelled


def _train(train: tuple, val: tuple):
    """custom_cnn at 128 px through the real training loop (5 epochs from a seeded random init)."""
    from pipelines.model.backbones import create_backbone
    from pipelines.model.preprocess import preprocessing_from, to_tensor_batch
    from pipelines.model.stages import fine_tuning_stages
    from pipelines.model.train import TrainConfig, fit

    torch.manual_seed(0)  # the random init too, so the test trains the same model every time
    backbone = create_backbone("custom_cnn", len(CLASSES), pretrained=False, image_size=SIZE)
    prep = preprocessing_from(backbone.data_config)

    def loader(images, labels, shuffle):
        data = TensorDataset(to_tensor_batch(images, prep), torch.as_tensor(labels))
        return DataLoader(data, batch_size=16, shuffle=shuffle, generator=torch.Generator().manual_seed(0))

    # A constant-LR plain recipe: this test is about the detector, not the product recipe (20 updates in all).
    config = TrainConfig(
        epochs=5, lr=2e-3, patience=5, seed=0, warmup_ratio=0.0, min_lr_ratio=1.0, ema_decay=0.0, class_balanced=False
    )
    stages = fine_tuning_stages(config, pretrained=False, head=(), finetune=())
    result = fit(
        backbone.model,
        loader(*train, True),
        loader(*val, False),
        stages=stages,
        config=config,
        device=torch.device("cpu"),
    )
    backbone.model.load_state_dict(result.kept_state)
    backbone.model.eval()
    return backbone, prep


@pytest.fixture(scope="module")
def detector_runs() -> dict[str, dict]:
    """Per variant (shortcut / control): the trained model's shortcut report, accuracy, corner mass."""
    from pipelines.model.preprocess import to_tensor_batch
    from pipelines.trust.gradcam import gradcam
    from pipelines.trust.lime_explainer import classifier_fn

    train, val, test = _smears(0, 20), _smears(500, 4), _smears(1000, 100)  # the gate's 300 test images
    splits = {
        "shortcut": (_confounded(*train, seed=1), _confounded(*val, seed=2), _confounded(*test, seed=3)),
        "control": (train, val, test),
    }
    out = {}
    for variant, (tr, va, te) in splits.items():
        backbone, prep = _train(tr, va)
        predict = classifier_fn(backbone.model, lambda imgs, prep=prep: to_tensor_batch(imgs, prep))
        images, labels = te
        report = shortcut_test(lambda imgs, p=predict: p(np.stack(imgs)), images, labels)
        cams = gradcam(backbone.model, backbone.gradcam_layer, to_tensor_batch(images, prep))
        corner = box_mask(SIZE, SIZE, corner_box(SIZE, SIZE))
        out[variant] = {
            "report": report,
            "accuracy": float((predict(np.stack(images)).argmax(1) == labels).mean()),
            "corner_mass": float((cams[:, corner].sum(1) / cams.sum((1, 2)).clip(1e-12)).mean()),
            "corner_share": float(corner.mean()),
        }
    return out


def test_detector_flags_the_shortcut_model(detector_runs: dict[str, dict]) -> None:
    run = detector_runs["shortcut"]
    report = run["report"]
    assert run["accuracy"] >= 0.8
    assert report.flip_rate >= 0.4, report.to_dict()
    assert report.worst[0] == LABEL_CORNER
    assert report.effects[LABEL_CORNER]["swap"].f1_drop >= 0.3
    assert report.effects["top_left"]["swap"].flip_rate <= 0.1  # only the planted corner matters
    assert run["corner_mass"] >= 2 * run["corner_share"], run


def _gate_shortcut_check(report):
    from pipelines.core.settings import GateThresholds
    from pipelines.trust.gate import CandidateMetrics, decide

    candidate = CandidateMetrics(
        "run", TASK, "ds", CLASSES, shortcut_flips=report.flips, shortcut_images=report.n_images
    )
    return next(c for c in decide(candidate, None, GateThresholds()).checks if c.name == "shortcut_flip_rate")


def test_gate_refuses_the_shortcut_model_on_the_flip_rate_upper_bound(detector_runs: dict[str, dict]) -> None:
    report = detector_runs["shortcut"]["report"]
    check = _gate_shortcut_check(report)
    assert report.n_images == check.n == 300 and not check.passed, check.detail
    assert check.value == pytest.approx(report.flip_bounds()["flip_rate_upper"])


def test_gate_passes_the_control_model(detector_runs: dict[str, dict]) -> None:
    report = detector_runs["control"]["report"]
    check = _gate_shortcut_check(report)
    assert check.passed, check.detail
    # clean: a few flips in 300 (0-1 in the issue, 3 since training runs channels_last); the exact
    # interval of the control lies wholly below the shortcut model's, so the gate tells the two apart
    shortcut = detector_runs["shortcut"]["report"].flip_bounds()
    assert report.flip_bounds()["flip_rate_ci_high"] < shortcut["flip_rate_ci_low"], report.to_dict()
    assert report.flip_rate <= 0.02, report.to_dict()


def test_detector_clears_the_control_model(detector_runs: dict[str, dict]) -> None:
    run = detector_runs["control"]
    report = run["report"]
    assert run["accuracy"] >= 0.6  # it learned the cells: a near-zero flip rate is not a dead model
    assert report.flip_rate <= 0.1, report.to_dict()
    assert report.f1_drop <= 0.1
    assert run["corner_mass"] < detector_runs["shortcut"]["corner_mass"]
