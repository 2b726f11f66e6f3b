"""Temperature scaling on synthetic logits with a known temperature, and the one predict function's TTA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.model.backbones import create_backbone
from pipelines.model.calibration import (
    MIN_CALIBRATION_IMAGES,
    TEMPERATURE_BOUNDS,
    calibrate,
    fit_calibration,
    fit_temperature,
)
from pipelines.model.evaluate import expected_calibration_error
from pipelines.model.predict import InferenceConfig, InferenceError, loader_logits, predict, probabilities


def _logits_with_temperature(n: int, temperature: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Calibrated logits z (labels drawn from softmax(z)), returned multiplied by ``temperature``: the
    logits of a model whose true temperature is ``temperature``."""
    rng = np.random.default_rng(seed)
    calibrated = rng.normal(0.0, 2.0, (n, 4))
    labels = np.array([rng.choice(4, p=p) for p in probabilities(calibrated)])
    return calibrated * temperature, labels


def test_fitting_recovers_a_known_temperature() -> None:
    for true_t in (0.5, 2.5):
        logits, labels = _logits_with_temperature(4000, true_t, seed=int(true_t * 10))
        assert fit_temperature(logits, labels) == pytest.approx(true_t, rel=0.08)


def test_ece_and_nll_drop_after_calibrating_overconfident_logits() -> None:
    logits, labels = _logits_with_temperature(3000, 3.0)  # three times too confident
    calibration = calibrate(logits, labels)
    assert calibration.temperature == pytest.approx(3.0, rel=0.1)
    assert calibration.ece_before > 0.1 and calibration.ece_after < 0.03
    assert calibration.nll_after < calibration.nll_before
    # fitted on one sample, it generalises to a fresh sample of the same model
    fresh, fresh_labels = _logits_with_temperature(3000, 3.0, seed=7)
    after = expected_calibration_error(fresh_labels, probabilities(fresh, calibration.temperature))
    assert after < 0.03 < expected_calibration_error(fresh_labels, probabilities(fresh))
    assert {"calibration_temperature", "val_ece", "val_ece_uncalibrated"} <= set(calibration.to_metrics())


def test_too_few_val_images_keep_temperature_one_and_error_free_ones_claim_the_rule_of_succession() -> None:
    logits, labels = _logits_with_temperature(MIN_CALIBRATION_IMAGES - 1, 3.0)
    small = calibrate(logits, labels)
    assert small.temperature == 1.0 and "val images" in small.note
    truth = np.arange(200) % 4
    perfect = calibrate(np.eye(4)[truth] * 5, truth)  # every val image right: the NLL has no minimum
    # softmax of a 5-logit margin over 4 classes is 0.980 at T = 1: sharpened to (n+1)/(n+2) = 201/202
    assert perfect.temperature < 1.0 and "no error" in perfect.note
    confidence = probabilities(np.eye(4)[truth] * 5, perfect.temperature).max(axis=1).mean()
    assert confidence == pytest.approx(201 / 202, abs=1e-5)
    assert perfect.ece_after < perfect.ece_before
    rng = np.random.default_rng(3)  # logits unrelated to the labels: the NLL wants a uniform softmax
    noise = calibrate(rng.normal(0, 3, (300, 4)), rng.integers(0, 4, 300))
    assert noise.temperature == pytest.approx(TEMPERATURE_BOUNDS[1], rel=0.01) and "at the bound" in noise.note


def test_inference_settings_are_checked() -> None:
    with pytest.raises(InferenceError, match="temperature"):
        InferenceConfig(temperature=0.0)
    with pytest.raises(InferenceError, match="rot90"):
        InferenceConfig(tta=("rot90",))


def _module() -> torch.nn.Module:
    torch.manual_seed(0)
    module = create_backbone("custom_cnn", 3, pretrained=False, image_size=32).model.eval()
    with torch.no_grad():  # a fresh head's logits hardly depend on the input: make them
        module.head.fc2.weight.mul_(50.0)
    return module


def test_predict_with_tta_is_the_average_of_the_flipped_passes() -> None:
    module, batch = _module(), torch.randn(5, 3, 32, 32)
    inference = InferenceConfig(temperature=1.7, tta=("hflip", "vflip"))
    out = predict(module, batch, inference, with_embeddings=True)
    with torch.no_grad():
        passes = [module(batch), module(batch.flip(-1)), module(batch.flip(-2))]
        expected_logits = torch.stack(passes).mean(dim=0).numpy()
        expected_embedding = module.embed(batch).numpy()
    assert np.allclose(out.logits, expected_logits, atol=1e-5)
    assert np.allclose(out.proba, probabilities(expected_logits, 1.7), atol=1e-6)
    assert np.allclose(out.embedding, expected_embedding, atol=1e-5)  # the identity view's
    assert not np.allclose(out.logits, passes[0].numpy(), atol=1e-4)  # the flips did change the logits
    plain = predict(module, batch, InferenceConfig())
    assert np.allclose(plain.proba, torch.softmax(passes[0], dim=1).numpy(), atol=1e-6)


def test_fit_calibration_reads_the_loader_through_the_predict_path() -> None:
    module, device = _module(), torch.device("cpu")
    images = torch.randn(40, 3, 32, 32)
    loader = [(images[i : i + 16], torch.arange(i, min(i + 16, 40)) % 3) for i in range(0, 40, 16)]
    labels, logits = loader_logits(module, loader, device, ("hflip",))
    assert np.array_equal(labels, np.arange(40) % 3)
    assert np.allclose(logits, predict(module, images, InferenceConfig(tta=("hflip",))).logits, atol=1e-5)
    calibration = fit_calibration(module, loader, device, ("hflip",))
    assert calibration.inference.tta == ("hflip",) and calibration.n == 40
    assert calibration.nll_after <= calibration.nll_before + 1e-9


def test_serving_drift_and_the_shortcut_test_get_the_same_calibrated_probabilities() -> None:
    from pipelines.model.bundle import LoadedModel, ModelBundle
    from pipelines.model.preprocess import preprocessing_from
    from pipelines.monitor.features import model_outputs
    from pipelines.trust.shortcut import predicted_classes
    from serving.model import ModelVersion, ServedModel, forward

    torch.manual_seed(0)
    backbone = create_backbone("custom_cnn", 3, pretrained=False, image_size=32)
    with torch.no_grad():
        backbone.model.head.fc2.weight.mul_(50.0)
    inference = InferenceConfig(temperature=0.3, tta=("vflip",))
    preprocessing = preprocessing_from(backbone.data_config)
    bundle = ModelBundle.for_backbone("wbc", ["a", "b", "c"], backbone, preprocessing, inference)
    backbone.model.eval()
    loaded = LoadedModel(backbone, bundle)
    images = [np.random.default_rng(i).integers(0, 255, (40, 40, 3), dtype=np.uint8) for i in range(4)]
    expected = predict(loaded.module, loaded.batch(images), inference).proba

    served_proba, _ = forward(ServedModel(ModelVersion("m", "1"), loaded, 0.0), loaded.batch(images), False)
    _, drift_proba = model_outputs(loaded, images)
    assert np.allclose(served_proba, expected, atol=1e-6) and np.allclose(drift_proba, expected, atol=1e-6)
    assert np.array_equal(predicted_classes(loaded.predict_proba, images), expected.argmax(axis=1))
    assert not np.allclose(expected, predict(loaded.module, loaded.batch(images), InferenceConfig()).proba)
