"""The training loop on tiny synthetic data: learning, staged freezing, early stopping, budget, resume,
the recipe's schedule and EMA, the progress line, and the one source of defaults."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from pipelines.data.datasets import ImageFileDataset, limit_rows, make_loader
from pipelines.model.checkpoint import run_key
from pipelines.model.stages import Stage, fine_tuning_stages
from pipelines.model.train import TrainConfig, default_criterion, fit

CPU = torch.device("cpu")


def _colour_images(n: int, seed: int) -> TensorDataset:
    """Class k = a noisy 16x16 image whose mean in channel k is raised: learnable in a few steps."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    images = torch.randn(n, 3, 16, 16, generator=gen) * 0.5
    images[torch.arange(n), labels] += 1.0
    return TensorDataset(images, labels)


def _tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 3),
    )


def _loaders(seed: int = 0):
    train = make_loader(_colour_images(96, 1), batch_size=16, train=True, device=CPU, seed=seed, workers=0)
    val = make_loader(_colour_images(30, 2), batch_size=16, train=False, device=CPU, seed=seed, workers=0)
    return train, val


def _fit(config: TrainConfig, **kwargs):
    train, val = _loaders(config.seed)
    stages = kwargs.pop("stages", [Stage("full", config.epochs, config.lr, ("",))])
    return fit(_tiny_net(), train, val, stages=stages, config=config, device=CPU, **kwargs)


def test_fit_learns_and_keeps_the_latest_epoch_within_one_standard_error_of_the_best() -> None:
    model = _tiny_net()
    train, val = _loaders()
    config = TrainConfig(epochs=4, lr=0.05, patience=10)
    result = fit(model, train, val, stages=[Stage("full", 4, 0.05, ("",))], config=config, device=CPU)
    assert result.stop_reason == "completed"
    assert len(result.history) == 4
    assert result.best_val_f1 >= 0.8
    assert result.best_val_f1 == max(r.val_macro_f1 for r in result.history)
    best = result.history[result.best_epoch]
    assert best.val_macro_f1 == result.best_val_f1 and 0 <= best.val_macro_f1_se < 0.2
    threshold = result.best_val_f1 - best.val_macro_f1_se
    assert result.kept_epoch >= result.best_epoch
    assert result.history[result.kept_epoch].val_macro_f1 == result.kept_val_f1 >= threshold
    assert all(r.val_macro_f1 < threshold for r in result.history[result.kept_epoch + 1 :])
    assert all(torch.equal(value, result.kept_state[key]) for key, value in model.state_dict().items())
    assert result.images_per_s > 0


def test_a_later_epoch_within_one_standard_error_replaces_the_kept_weights() -> None:
    from pipelines.model.train import EpochRecord, _advance, _State

    state, model = _State(), _tiny_net()
    scores = [(0.90, 0.02), (0.89, 0.03), (0.87, 0.02), (0.93, 0.01), (0.925, 0.02)]
    # 0.89 >= 0.90 - 0.02: kept; 0.87 < 0.90 - 0.02: not; 0.93: a new best; 0.925 >= 0.93 - 0.01: kept
    expected = [(0, 0), (1, 0), (1, 0), (3, 3), (4, 3)]  # (kept epoch, best epoch) after each epoch
    for epoch, (f1, standard_error) in enumerate(scores):
        _advance(state, EpochRecord(epoch, "full", 1.0, 1.0, f1, standard_error, 0.9, 1e-3, 10.0, 1.0), model, True)
        assert (state.kept_epoch, state.best_epoch) == expected[epoch]
        assert state.kept_val_f1 == scores[state.kept_epoch][0]
    assert state.stale_epochs == 1  # patience counts from the best epoch, not the kept one


def test_head_stage_trains_only_the_head_and_keeps_frozen_batchnorm_stats() -> None:
    model = _tiny_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = TrainConfig(epochs=1, lr=0.05)
    train, val = _loaders()
    fit(model, train, val, stages=[Stage("head", 1, 0.05, ("8",))], config=config, device=CPU)
    after = model.state_dict()
    assert not torch.equal(before["8.weight"], after["8.weight"])
    for frozen in ("0.weight", "3.weight", "1.running_mean", "4.running_var"):
        assert torch.equal(before[frozen], after[frozen]), frozen


def test_fine_tuning_plan_for_pretrained_and_random_init() -> None:
    config = TrainConfig(epochs=6, lr=1e-3, head_epochs=2, layer_lr_floor=0.2)
    head, finetune = fine_tuning_stages(config, pretrained=True, head=["classifier"])
    assert (head.name, head.epochs, head.lr, head.trainable) == ("head", 2, 1e-3, ("classifier",))
    assert (finetune.epochs, finetune.lr, finetune.trainable, finetune.layer_lr_floor) == (4, 1e-3, ("",), 0.2)
    partial = fine_tuning_stages(config, pretrained=True, head=["classifier"], finetune=["blocks.2"])[1]
    assert partial.trainable == ("blocks.2", "classifier")
    (full,) = fine_tuning_stages(config, pretrained=False, head=["classifier"])
    assert (full.epochs, full.trainable, full.layer_lr_floor) == (6, ("",), 1.0)  # random init: uniform LR
    (only_finetune,) = fine_tuning_stages(TrainConfig(epochs=6), pretrained=True, head=["h"])
    assert only_finetune.name == "finetune" and only_finetune.epochs == 6  # the default: no head-only stage


def test_early_stopping_stops_after_patience_without_improvement() -> None:
    # lr=0: the weights never change (only BatchNorm statistics drift), so F1 soon stops improving
    result = _fit(TrainConfig(epochs=20, lr=0.0, patience=2))
    assert result.stop_reason == "early_stopping"
    assert len(result.history) == result.best_epoch + 1 + 2
    assert result.best_epoch <= result.kept_epoch < len(result.history)
    assert all(r.val_macro_f1 <= result.best_val_f1 for r in result.history[result.best_epoch + 1 :])


def test_time_budget_ends_the_run_with_the_kept_checkpoint(tmp_path) -> None:
    result = _fit(TrainConfig(epochs=50, lr=0.05, time_budget_min=0.0005), checkpoint_path=tmp_path / "c.pt")
    assert result.stop_reason == "time_budget"
    assert 1 <= len(result.history) < 50
    assert result.kept_state and result.best_val_f1 == max(r.val_macro_f1 for r in result.history)


class _CrashAt:
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_end(self, record) -> None:
        if record.epoch == self.epoch:
            raise RuntimeError("injected crash")


def test_resume_after_a_crash_continues_from_the_checkpoint_epoch(tmp_path) -> None:
    config = TrainConfig(epochs=5, lr=0.05, patience=10)
    path = tmp_path / "run.pt"
    with pytest.raises(RuntimeError, match="injected crash"):
        _fit(config, checkpoint_path=path, callbacks=[_CrashAt(2)])
    assert path.exists()  # epochs 0 and 1 were checkpointed before the crash in epoch 2's callback
    resumed = _fit(config, checkpoint_path=path)
    assert resumed.resumed_from_epoch == 2
    assert [r.epoch for r in resumed.history] == [0, 1, 2, 3, 4]
    uninterrupted = _fit(config)
    assert resumed.best_val_f1 >= max(r.val_macro_f1 for r in resumed.history[:2])
    assert resumed.best_val_f1 == pytest.approx(uninterrupted.best_val_f1)
    assert resumed.kept_epoch == uninterrupted.kept_epoch
    assert resumed.history[-1].val_loss == pytest.approx(uninterrupted.history[-1].val_loss, rel=1e-4)


def test_checkpoint_of_another_configuration_is_not_resumed(tmp_path) -> None:
    path = tmp_path / "run.pt"
    _fit(TrainConfig(epochs=1, lr=0.05), checkpoint_path=path)
    other = _fit(TrainConfig(epochs=2, lr=0.01), checkpoint_path=path)
    assert other.resumed_from_epoch is None
    assert len(other.history) == 2


def test_run_key_is_deterministic_and_config_sensitive() -> None:
    assert run_key({"a": 1, "b": "x"}) == run_key({"b": "x", "a": 1})
    assert run_key({"a": 1}) != run_key({"a": 2})


def test_image_file_dataset_decodes_real_files(tmp_path) -> None:
    import cv2

    paths = []
    for i in range(2):
        path = tmp_path / f"{i}.png"
        cv2.imwrite(str(path), np.full((10, 12, 3), 40 * i, np.uint8))
        paths.append(path)
    dataset = ImageFileDataset(paths, [0, 1], lambda rgb: torch.from_numpy(rgb.copy()).permute(2, 0, 1).float())
    image, label = dataset[1]
    assert image.shape == (3, 10, 12) and label == 1 and float(image.mean()) == 40.0


def test_kept_prepared_images_are_what_the_files_give_and_need_no_file(shared_data, tmp_path) -> None:
    from pipelines.model.preprocess import build_transform, preprocessing_from

    config = {"input_size": (3, 48, 48), "interpolation": "bilinear", "mean": (0.5,) * 3, "std": (0.25,) * 3}
    paths = []
    for i, source in enumerate(sorted((shared_data / "pbc" / "lymphocyte").glob("*.jpg"))[:3]):
        paths.append(tmp_path / f"{i}.jpg")
        paths[-1].write_bytes(source.read_bytes())
    transform = build_transform(preprocessing_from(config, cell_crop=2.0), train=False)
    read_each_time = ImageFileDataset(paths, [0, 1, 2], transform)
    kept = ImageFileDataset(paths, [0, 1, 2], transform)
    assert kept.keep_prepared() and kept.prepared[0].shape == (48, 48, 3)
    expected = [read_each_time[i] for i in range(3)]
    for path in paths:
        path.unlink()  # later epochs read no file
    for i in range(3):
        assert torch.equal(kept[i][0], expected[i][0]) and kept[i][1] == i
    too_large = ImageFileDataset(paths, [0, 1, 2], transform)
    assert not too_large.keep_prepared(max_bytes=2 * 48 * 48 * 3) and too_large.prepared is None
    plain = ImageFileDataset(paths, [0, 1, 2], lambda rgb: torch.zeros(1))
    assert not plain.keep_prepared()  # a transform without a deterministic part: read every time


def test_limit_rows_keeps_every_split_and_class_deterministically() -> None:
    frame = pd.DataFrame(
        {
            "sha256": [f"{i:064x}" for i in range(200)],
            "label": ["a", "b"] * 100,
            "split": ["train"] * 160 + ["val"] * 20 + ["test"] * 20,
        }
    )
    small = limit_rows(frame, 20)
    assert 16 <= len(small) <= 24
    assert set(zip(small["split"], small["label"], strict=True)) == {
        (s, c) for s in ("train", "val", "test") for c in ("a", "b")
    }
    assert small.equals(limit_rows(frame.sample(frac=1, random_state=3), 20))


class _DictStore:
    """The two ObjectStore methods the cache uses, over a dict, counting reads."""

    def __init__(self, objects: dict[str, bytes]) -> None:
        self.objects, self.reads = objects, 0

    def get_bytes(self, key: str) -> bytes:
        self.reads += 1
        return self.objects[key]

    def uri(self, key: str) -> str:
        return f"s3://test/{key}"


def test_fill_cache_downloads_once_verifies_hashes_and_keeps_row_order(tmp_path) -> None:
    import hashlib

    from pipelines.data.datasets import CacheIntegrityError, fill_cache

    blobs = [b"first image", b"second image"]
    shas = [hashlib.sha256(b).hexdigest() for b in blobs]
    frame = pd.DataFrame({"sha256": shas, "key": [f"raw/{s}.jpg" for s in shas]})
    store = _DictStore(dict(zip(frame["key"], blobs, strict=True)))
    paths = fill_cache(store, frame, tmp_path)
    assert [p.read_bytes() for p in paths] == blobs
    assert paths[0] == tmp_path / "sha256" / shas[0][:2] / shas[0][2:4] / f"{shas[0]}.jpg"
    assert fill_cache(store, frame, tmp_path) == paths and store.reads == 2
    bad = pd.DataFrame({"sha256": ["0" * 64], "key": [frame["key"][0]]})
    with pytest.raises(CacheIntegrityError, match="hashes to"):
        fill_cache(store, bad, tmp_path)
    assert not list((tmp_path / "sha256" / "00").glob("**/*.jpg"))


def test_stages_for_real_backbones() -> None:
    from pipelines.model.backbones import create_backbone
    from pipelines.model.candidate import stages_for

    config = TrainConfig(epochs=4, head_epochs=1)
    (full,) = stages_for(create_backbone("custom_cnn", 4, pretrained=False, image_size=32), config)
    assert (full.trainable, full.layer_lr_floor) == (("",), 1.0)
    lite = create_backbone("efficientnet_lite0", 4, pretrained=True, image_size=64)
    head, finetune = stages_for(lite, config)
    assert (head.name, head.epochs, head.trainable) == ("head", 1, ("head",))
    assert (finetune.epochs, finetune.trainable, finetune.layer_lr_floor) == (3, ("",), config.layer_lr_floor)


@pytest.mark.parametrize("budget", [5, 12, 13, 40, 41])
def test_limit_rows_never_exceeds_the_budget_and_keeps_every_cell_when_it_can(budget):
    import hashlib

    rows = [
        {"sha256": hashlib.sha256(f"{split}{label}{i}".encode()).hexdigest(), "split": split, "label": label}
        for split, per_label in (("train", 33), ("val", 4), ("test", 5))
        for label in "ABCD"
        for i in range(per_label + (label == "A"))
    ]
    kept = limit_rows(pd.DataFrame(rows), budget)
    assert len(kept) == budget
    if budget >= 12:
        assert kept.groupby(["split", "label"]).ngroups == 12


def test_default_criterion_smooths_integer_labels_weights_classes_and_takes_soft_targets() -> None:
    logits, labels = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    smoothed = default_criterion(0.1, mixer=None)
    expected = nn.functional.cross_entropy(logits, labels, label_smoothing=0.1)
    assert smoothed(logits, labels).item() == pytest.approx(expected.item(), rel=1e-5)
    soft = default_criterion(0.1, mixer=lambda images, targets: (images, targets))  # the mixer smooths
    one_hot = nn.functional.one_hot(labels, 3).float()
    assert soft(logits, one_hot).item() == pytest.approx(nn.functional.cross_entropy(logits, labels).item(), rel=1e-5)
    weighted = default_criterion(0.0, mixer=None, class_weights=[2.0, 1.0, 1.0])
    per_image = nn.functional.cross_entropy(logits, labels, reduction="none")
    expected = (per_image * torch.tensor([2.0, 1.0, 1.0, 2.0])).sum() / 6.0
    assert weighted(logits, labels).item() == pytest.approx(expected.item(), rel=1e-5)


def test_balanced_class_weights_favour_the_small_class() -> None:
    from pipelines.model.recipe import balanced_class_weights

    weights = balanced_class_weights([0] * 10 + [1] * 30 + [2] * 20, 4)
    assert weights[0] == pytest.approx(2.0) and weights[1] == pytest.approx(60 / 90) and weights[3] == 1.0


def test_resume_restores_ema_scheduler_and_step_exactly(tmp_path) -> None:
    """A crash after epoch 1 then a resume ends with the uninterrupted run's EMA weights, LR curve and plan."""
    config = TrainConfig(epochs=4, lr=0.05, patience=10, ema_decay=0.9, time_budget_min=None)
    path = tmp_path / "run.pt"
    with pytest.raises(RuntimeError, match="injected crash"):
        _fit(config, checkpoint_path=path, callbacks=[_CrashAt(1)])
    saved = torch.load(path, weights_only=False)
    assert saved["ema"] is not None and saved["state"]["step"] == len(_loaders()[0])
    steps = 4 * len(_loaders()[0])
    assert saved["scheduler"]["t_initial"] == steps - round(0.05 * steps)  # the cosine after the warm-up
    resumed = _fit(config, checkpoint_path=path)
    uninterrupted = _fit(config)
    assert [r.lr for r in resumed.history] == pytest.approx([r.lr for r in uninterrupted.history])
    for key, value in uninterrupted.kept_state.items():
        assert torch.allclose(resumed.kept_state[key].float(), value.float(), atol=1e-6), key


def test_warmup_then_cosine_is_stepped_per_update() -> None:
    config = TrainConfig(epochs=4, lr=0.05, patience=10, warmup_ratio=0.25, min_lr_ratio=0.01, ema_decay=0.0)
    config = replace(config, time_budget_min=None)
    lrs = [r.lr for r in _fit(config).history]  # the LR after each epoch's last update
    assert lrs[0] == pytest.approx(0.05, rel=1e-6)  # a quarter of the steps = epoch 1: the peak at its end
    assert lrs[0] > lrs[1] > lrs[2] > lrs[3] and lrs[3] == pytest.approx(0.05 * 0.01, rel=1e-3)


def test_budget_plans_the_schedule_in_steps_from_the_probe_and_the_first_epoch(monkeypatch) -> None:
    from pipelines.model import recipe

    assert recipe.planned_steps(4000, 10, 600.0, 0.5) == 1210
    assert recipe.planned_steps(500, 10, 600.0, 0.5) == 500 and recipe.planned_steps(4000, 10, 0.1, 0.5) == 11
    plans = []

    def plan(max_steps, done, remaining_s, step_s):  # the probe (step 12), then after epoch 1 (step 6)
        plans.append(done)
        return 15

    monkeypatch.setattr(recipe, "planned_steps", plan)
    train, val = _loaders()
    config = TrainConfig(epochs=20, lr=0.05, patience=10, time_budget_min=5.0)
    big_train = make_loader(_colour_images(16 * 14, 1), batch_size=16, train=True, device=CPU, seed=0, workers=0)
    result = fit(_tiny_net(), big_train, val, stages=[Stage("full", 20, 0.05, ("",))], config=config, device=CPU)
    assert plans == [12, 14] and result.planned_steps == 15  # 14 steps an epoch: the probe, then epoch 1
    assert len(result.history) == 2 and result.stop_reason == "time_budget"  # the budget planned 15 of 280 steps
    assert result.history[-1].lr == pytest.approx(0.05 * TrainConfig().min_lr_ratio, rel=1e-3)


def test_each_epoch_logs_a_progress_line(caplog) -> None:
    with caplog.at_level("INFO", logger="pipelines.model.train"):
        _fit(TrainConfig(epochs=2, lr=0.05, patience=10, time_budget_min=None))
    lines = [r.getMessage() for r in caplog.records if r.name == "pipelines.model.train"]
    assert len(lines) == 2 and lines[0].startswith("epoch 1 (full, step 6/12): loss ")
    assert all(word in lines[1] for word in ("val macro-F1", "img/s", "ETA 0 s"))


def test_defaults_have_one_source_settings_retrain() -> None:
    from dataclasses import asdict, fields

    from pipelines.core.settings import RetrainConfig
    from pipelines.model.candidate import candidate_spec, train_config
    from pipelines.model.training_request import TrainingInputError

    retrain = RetrainConfig()
    assert asdict(TrainConfig()) == {f.name: getattr(retrain, f.name) for f in fields(TrainConfig)}
    assert retrain.time_budget_min <= 10
    custom = retrain.model_copy(update={"lr": 3e-4, "epochs": 7, "augmentations": ["mixup", "none"]})
    config = train_config(custom, epochs=None, time_budget_min=2.0)
    assert (config.lr, config.epochs, config.time_budget_min) == (3e-4, 7, 2.0)
    spec = candidate_spec(custom, "all_subtypes", "custom_cnn", augment=None, batch_size=8)
    assert (spec.augment, spec.image_size, spec.batch_size) == ("mixup", custom.image_size, 8)
    with pytest.raises(TrainingInputError, match="unfreeze_blocks"):
        train_config(custom, unfreeze_blocks=2)
