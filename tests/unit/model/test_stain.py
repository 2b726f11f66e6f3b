"""Stain robustness: HED jitter (training), reference-fitted normalisers saved in the bundle, fallback."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pipelines.model.augment import AugmentationError, Chain, build_augmentation
from pipelines.model.backbones import create_backbone
from pipelines.model.bundle import BundleError, ModelBundle, read_bundle, save_bundle
from pipelines.model.predict import predict
from pipelines.model.preprocess import (
    STAIN_KEY,
    PreprocessError,
    normalise,
    prepare_image,
    preprocessing_from,
    to_tensor_batch,
    with_stain_normalizer,
)
from pipelines.model.stain import (
    HedJitter,
    StainError,
    StainNormalizer,
    check_stain_options,
    fit_normalizer,
    hed_jitter,
    reference_sample,
)

DATA_CONFIG = {"input_size": (3, 64, 64), "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
SHIFT = ((1.15, 0.85, 1.0), (0.08, -0.05, 0.03))  # a fixed stain shift (H, E, D scale; shift in OD)
BLANK = np.full((48, 48, 3), 255, np.uint8)


@pytest.fixture(scope="module")
def smears(shared_data: Path) -> list[np.ndarray]:
    """Six PBC smears at 96 px (one lab, one stain)."""
    paths = sorted((shared_data / "pbc" / "neutrophil").glob("*.jpg"))[:6]
    return [np.asarray(Image.open(p).convert("RGB").resize((96, 96))) for p in paths]


def lab_stats(rgb: np.ndarray) -> np.ndarray:
    """Per-channel LAB means and standard deviations: the colour summary a stain shift moves."""
    from skimage.color import rgb2lab

    lab = rgb2lab(rgb).reshape(-1, 3)
    return np.concatenate([lab.mean(0), lab.std(0)])


def stain_distance(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(lab_stats(a) - lab_stats(b)).sum())


def two_stain_image(scale: tuple[float, float] = (1.0, 1.0), seed: int = 0) -> np.ndarray:
    """A 64 px image that follows Macenko's model exactly: Io·exp(−HE·C) with torchstain's default H&E
    vectors and random concentrations (× ``scale``); a quarter of it is unstained background."""
    he = np.array([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]])
    rng = np.random.default_rng(seed)
    concentrations = rng.uniform(0, 1.2, (2, 64 * 64)) * np.asarray(scale)[:, None]
    concentrations[:, : 64 * 16] = 0.0
    return np.clip(240 * np.exp(-he @ concentrations), 0, 255).T.reshape(64, 64, 3).astype(np.uint8)


# --- augmentation -----------------------------------------------------------------------------------


def test_hed_jitter_changes_colour_but_keeps_shape_dtype_and_range(smears: list[np.ndarray]) -> None:
    image = Image.fromarray(smears[0])
    torch.manual_seed(0)
    out = np.asarray(HedJitter(0.1)(image))
    assert out.shape == smears[0].shape and out.dtype == np.uint8
    assert 0 <= out.min() and out.max() <= 255
    assert stain_distance(out, smears[0]) > 1.0  # colour moved
    assert np.array_equal(hed_jitter(smears[0], (1, 1, 1), (0, 0, 0)), smears[0])  # no jitter: exact round trip


def test_hed_jitter_is_seeded_by_torch_and_stronger_moves_further(smears: list[np.ndarray]) -> None:
    image = Image.fromarray(smears[1])

    def draw(seed: int, strength: float = 0.1) -> np.ndarray:
        torch.manual_seed(seed)
        return np.asarray(HedJitter(strength)(image))

    assert np.array_equal(draw(3), draw(3))
    assert not np.array_equal(draw(3), draw(4))
    light = np.mean([stain_distance(draw(s, 0.02), smears[1]) for s in range(8)])
    strong = np.mean([stain_distance(draw(s, 0.2), smears[1]) for s in range(8)])
    assert strong > 3 * light


def test_build_augmentation_runs_the_stain_jitter_first_and_refuses_bad_options() -> None:
    hed_only = build_augmentation("none", 4, 64, stain="hed", stain_strength=0.05)
    assert hed_only.pil_transform == HedJitter(0.05) and hed_only.stain == "hed" and hed_only.batch_mixer is None
    chained = build_augmentation("randaug", 4, 64, stain="hed")
    assert isinstance(chained.pil_transform, Chain) and isinstance(chained.pil_transform.first, HedJitter)
    assert build_augmentation("mixup", 4, 64, stain="hed").soft_targets
    assert build_augmentation("none", 4, 64).pil_transform is None  # the default is unchanged: no jitter
    with pytest.raises(AugmentationError, match="unknown stain augmentation 'macenko'"):
        build_augmentation("none", 4, 64, stain="macenko")
    with pytest.raises(AugmentationError, match=r"strength must be in \(0, 1\], got 0"):
        build_augmentation("none", 4, 64, stain="hed", stain_strength=0)
    with pytest.raises(StainError, match="unknown stain normaliser 'vahadane'"):
        check_stain_options("none", 0.1, "vahadane", 32)


# --- normalisers --------------------------------------------------------------------------------------


def test_reinhard_round_trip_on_real_smears(smears: list[np.ndarray]) -> None:
    reference = smears[0]
    normalizer = fit_normalizer("reinhard", [reference])
    itself = normalizer.apply(reference)
    assert itself.note is None and np.abs(itself.rgb.astype(int) - reference).mean() < 1.5  # ≈ identity
    shifted = hed_jitter(reference, *SHIFT)
    before = stain_distance(shifted, reference)
    after = stain_distance(normalizer.apply(shifted).rgb, reference)
    assert before > 5 and after < 0.2 * before, (before, after)


def test_macenko_round_trip_on_two_stain_images() -> None:
    """On images that follow its two-stain model (on real MGG smears it does not help: module docstring)."""
    reference = two_stain_image()
    normalizer = fit_normalizer("macenko", [reference])
    assert np.abs(normalizer.apply(reference).rgb.astype(int) - reference).mean() < 2.0  # ≈ identity
    shifted = two_stain_image(scale=(1.6, 0.6), seed=1)
    before = stain_distance(shifted, reference)
    assert stain_distance(normalizer.apply(shifted).rgb, reference) < 0.3 * before


def test_the_reference_is_the_median_of_a_fixed_sample(smears: list[np.ndarray]) -> None:
    fitted = fit_normalizer("reinhard", smears)
    single = [fit_normalizer("reinhard", [s]).targets["lab_means"] for s in smears]
    assert fitted.reference_images == 6
    assert np.allclose(fitted.targets["lab_means"], np.median(single, axis=0))
    macenko = fit_normalizer("macenko", smears)
    assert np.allclose(np.linalg.norm(macenko.targets["stain_matrix"], axis=0), 1.0)  # unit stain vectors
    paths = [f"img-{i:02d}.png" for i in range(20)]
    assert reference_sample(paths, 5, seed=0) == reference_sample(list(reversed(paths)), 5, seed=0)
    assert reference_sample(paths, 5, seed=0) != reference_sample(paths, 5, seed=1)
    assert reference_sample(paths[:3], 5, seed=0) == paths[:3]


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_a_blank_image_falls_back_to_itself_with_a_note(method: str, smears, caplog) -> None:
    normalizer = fit_normalizer(method, smears[:2])
    result = normalizer.apply(BLANK)
    assert result.rgb is BLANK and method in result.note and "kept unnormalised" in result.note
    preprocessing = preprocessing_from(DATA_CONFIG, roi_crop=False) | {STAIN_KEY: normalizer.to_dict()}
    batch_images = [BLANK, smears[0]]
    with caplog.at_level(logging.WARNING, logger="pipelines.model.stain"):
        batch = to_tensor_batch(batch_images, preprocessing)  # the batch survives the blank image
    assert batch.shape == (2, 3, 64, 64) and torch.isfinite(batch).all()
    assert [r.message for r in caplog.records if "kept unnormalised" in r.message]
    plain = preprocessing_from(DATA_CONFIG, roi_crop=False)
    assert torch.equal(batch[0], to_tensor_batch([BLANK], plain)[0])  # blank: exactly the unnormalised input


def test_fitting_skips_blank_references_and_refuses_none_fitted(smears: list[np.ndarray]) -> None:
    assert fit_normalizer("macenko", [BLANK, smears[0]]).reference_images == 1
    with pytest.raises(StainError, match="no reference image could fit the macenko normaliser"):
        fit_normalizer("macenko", [BLANK, BLANK])
    with pytest.raises(StainError, match="stain_matrix must be finite of shape"):
        StainNormalizer("macenko", {"stain_matrix": [[1, 0]], "max_concentrations": [1, 1]})


# --- the preprocessing and the bundle ---------------------------------------------------------------


def _frame(shared_data: Path, n: int = 8) -> list[Path]:
    return sorted((shared_data / "pbc" / "lymphocyte").glob("*.jpg"))[:n]


def test_with_stain_normalizer_fits_on_prepared_references(shared_data: Path, tmp_path: Path) -> None:
    base = preprocessing_from(DATA_CONFIG)
    paths = _frame(shared_data)
    assert with_stain_normalizer(base, "none", paths, 4, 0) is base
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    fitted = with_stain_normalizer(base, "reinhard", [*paths, broken], 100, 0)
    assert fitted[STAIN_KEY]["reference_images"] == len(paths)  # the undecodable file was skipped
    prepared = [np.asarray(prepare_image(np.asarray(Image.open(p).convert("RGB")), base)) for p in paths]
    assert fitted[STAIN_KEY] == fit_normalizer("reinhard", prepared).to_dict()
    with pytest.raises(PreprocessError, match="stain_normalizer"):
        to_tensor_batch(prepared[:1], base | {STAIN_KEY: {"method": "reinhard"}})


def test_the_bundle_keeps_the_normaliser_and_predict_applies_it(shared_data: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    backbone = create_backbone("custom_cnn", 8, pretrained=False, image_size=32)
    base = preprocessing_from(backbone.data_config)
    preprocessing = with_stain_normalizer(base, "reinhard", _frame(shared_data), 4, 0)
    classes = ["basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet"]
    bundle = ModelBundle.for_backbone("wbc", classes, backbone, preprocessing)
    save_bundle(bundle, backbone.model.state_dict(), tmp_path)
    loaded = read_bundle(tmp_path)
    assert loaded.bundle.stain_normalizer == StainNormalizer.from_dict(preprocessing[STAIN_KEY])
    assert loaded.bundle.format == 4

    cellavision = sorted((shared_data / "wbc_seg_cellavision" / "lymphocyte").glob("*.bmp"))[:2]
    rgb = [np.asarray(Image.open(p).convert("RGB")) for p in cellavision]
    by_hand = torch.stack([_normalised_by_hand(image, base, loaded.bundle.stain_normalizer) for image in rgb])
    assert torch.equal(loaded.batch(rgb), by_hand)
    assert not torch.equal(to_tensor_batch(rgb, base), by_hand)  # the normaliser did change the input
    expected = predict(loaded.module, by_hand, loaded.inference).proba
    assert np.allclose(loaded.predict_proba(rgb), expected, atol=1e-6)


def _normalised_by_hand(rgb: np.ndarray, base: dict, normalizer: StainNormalizer) -> torch.Tensor:
    resized = np.asarray(prepare_image(rgb, base))  # ROI crop + resize, no stain
    return normalise(normalizer.apply(resized).rgb, base)


def test_a_malformed_saved_normaliser_is_refused_when_the_bundle_is_read(tmp_path: Path) -> None:
    backbone = create_backbone("custom_cnn", 2, pretrained=False, image_size=32)
    preprocessing = preprocessing_from(backbone.data_config) | {STAIN_KEY: {"method": "reinhard", "targets": {}}}
    with pytest.raises(BundleError, match="lab_means must be finite"):
        ModelBundle.for_backbone("binary_all", ["ALL", "Healthy"], backbone, preprocessing)


def test_build_run_fits_the_normaliser_on_the_train_split_and_jitters_train_only(shared_data: Path) -> None:
    from pipelines.core.settings import RetrainConfig
    from pipelines.model.candidate import build_run, candidate_spec, train_config

    rows = []
    for label in ("Benign", "Early", "Pre", "Pro"):
        files = sorted((shared_data / "all_taleqani" / label).glob("*.jpg"))[:3]
        rows += [{"path": f, "label": label, "split": s} for f, s in zip(files, ["train", "val", "test"], strict=True)]
    retrain = RetrainConfig(image_size=32, batch_size=4, stain_augment="hed", stain_normalize="reinhard")
    spec = candidate_spec(retrain, "all_subtypes", "custom_cnn", device="cpu", stain_reference_images=2)
    assert (spec.stain_augment, spec.stain_strength, spec.stain_normalize) == ("hed", 0.1, "reinhard")
    run = build_run(spec, train_config(retrain, epochs=1), pd.DataFrame(rows), "v-test", "folder")
    assert run.preprocessing[STAIN_KEY]["reference_images"] == 2
    assert run.resolved_config()["candidate"]["stain_normalize"] == "reinhard"  # keys the run
    assert run.loaders["train"].dataset.transform.augmentation == HedJitter(0.1)
    assert run.loaders["test"].dataset.transform.augmentation is None
    assert candidate_spec(RetrainConfig(), "all_subtypes", "custom_cnn").stain_augment == "none"  # default
