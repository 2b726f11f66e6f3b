"""The training loop: injected model, loaders and callbacks; staged fine-tuning, checkpoints, resume.

``fit`` knows nothing about S3, MLflow or the CLI. It trains ``model`` through a list of ``Stage``s
(the paper's two-stage transfer learning: head only, then the last blocks at a lower learning rate; from
random init a single stage trains everything), selects the epoch with the best validation macro-F1, and
writes a checkpoint after every epoch so that a crashed run resumes where it stopped. Each epoch reseeds
the RNGs and the shuffling from (seed, epoch), so a resumed run replays the epochs an uninterrupted run
would have run.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader
from tqdm import tqdm

from pipelines.model.evaluate import macro_f1

BatchMixer = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
CHECKPOINT_FORMAT = 1


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings; everything here is logged as run params and keys the checkpoint."""

    epochs: int = 10
    lr: float = 1e-3
    finetune_lr_factor: float = 0.1
    head_epochs: int = 2
    unfreeze_blocks: int = 2
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    patience: int = 4
    plateau_patience: int = 1
    plateau_factor: float = 0.3
    seed: int = 0
    time_budget_min: float | None = None


@dataclass(frozen=True)
class Stage:
    """One training phase: which parameters learn (name prefixes; ``""`` = all), at which LR, how long."""

    name: str
    epochs: int
    lr: float
    trainable: tuple[str, ...]


@dataclass
class EpochRecord:
    epoch: int
    stage: str
    train_loss: float
    val_loss: float
    val_macro_f1: float
    val_accuracy: float
    lr: float
    images_per_s: float
    seconds: float  # training + validation
    train_seconds: float = 0.0
    images: int = 0


@dataclass
class FitResult:
    best_state: dict[str, torch.Tensor]
    best_epoch: int
    best_val_f1: float
    history: list[EpochRecord]
    stop_reason: str  # "completed" | "early_stopping" | "time_budget"
    resumed_from_epoch: int | None
    train_seconds: float
    images_per_s: float


class Callback(Protocol):
    def on_epoch_end(self, record: EpochRecord) -> None: ...


@dataclass
class _State:
    """Everything a resumed run needs; saved after every epoch."""

    stage_index: int = 0
    stage_epoch: int = 0
    epoch: int = 0
    best_val_f1: float = -1.0
    best_epoch: int = -1
    best_state: dict[str, torch.Tensor] = field(default_factory=dict)
    stale_epochs: int = 0
    history: list[EpochRecord] = field(default_factory=list)
    train_seconds: float = 0.0
    images_seen: int = 0


# -- planning -------------------------------------------------------------------------------------


def fine_tuning_stages(
    config: TrainConfig, *, pretrained: bool, head: Sequence[str], finetune: Sequence[str]
) -> list[Stage]:
    """The paper's schedule: ``head`` (parameter prefixes of the new classifier head) alone at ``lr``, then
    ``finetune`` (the last encoder blocks and what follows them) with the head at ``lr × finetune_lr_factor``.
    From random init there is nothing to protect: one stage trains everything."""
    if not pretrained:
        return [Stage("full", config.epochs, config.lr, ("",))]
    head_epochs = min(config.head_epochs, config.epochs // 2)
    stages = [Stage("head", head_epochs, config.lr, tuple(head))] if head_epochs else []
    finetune_lr = config.lr * config.finetune_lr_factor
    stages.append(Stage("finetune", config.epochs - head_epochs, finetune_lr, (*finetune, *head)))
    return stages


def _is_trainable(name: str, prefixes: Iterable[str]) -> bool:
    return any(p == "" or name == p or name.startswith(p + ".") for p in prefixes)


def _apply_stage(model: nn.Module, stage: Stage) -> list[nn.Parameter]:
    params = []
    for name, param in model.named_parameters():
        param.requires_grad_(_is_trainable(name, stage.trainable))
        if param.requires_grad:
            params.append(param)
    if not params:
        raise ValueError(f"stage {stage.name!r} trains no parameter (prefixes {stage.trainable})")
    return params


def _freeze_frozen_batchnorm(model: nn.Module) -> None:
    """Frozen BatchNorm layers keep their ImageNet running statistics (train mode would overwrite them)."""
    for module in model.modules():
        if isinstance(module, _BatchNorm) and not any(p.requires_grad for p in module.parameters()):
            module.eval()


# -- determinism and devices ----------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(requested: str | None = None) -> torch.device:
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    batch = batch.to(device, non_blocking=True)
    return batch.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else batch


def _autocast(device: torch.device) -> torch.autocast:
    return torch.autocast(device_type=device.type, dtype=torch.float16, enabled=device.type == "cuda")


# -- one epoch ------------------------------------------------------------------------------------


def default_criterion(label_smoothing: float, mixer: BatchMixer | None) -> Criterion:
    """timm's losses: soft-target cross-entropy behind a mixer (its soft targets already carry the
    smoothing), label-smoothed cross-entropy on integer labels otherwise."""
    return SoftTargetCrossEntropy() if mixer is not None else LabelSmoothingCrossEntropy(label_smoothing)


@dataclass
class _Loop:
    """What stays fixed through one `fit`: the module, data, device, loss and budget."""

    model: nn.Module
    train_loader: DataLoader
    val_loader: DataLoader
    config: TrainConfig
    device: torch.device
    criterion: Criterion
    mixer: BatchMixer | None
    scaler: torch.amp.GradScaler
    budget_s: float | None


def _train_epoch(
    loop: _Loop, optimizer: torch.optim.Optimizer, deadline: float | None, description: str
) -> tuple[float, int, bool]:
    """Returns (mean loss, images seen, whether the deadline cut the epoch short)."""
    model, device = loop.model, loop.device
    model.train()
    _freeze_frozen_batchnorm(model)
    total_loss, seen = torch.zeros((), device=device), 0  # summed on the device: no sync per step
    bar = tqdm(loop.train_loader, desc=description, leave=False, disable=not sys.stderr.isatty(), unit="batch")
    for step, (images, targets) in enumerate(bar):
        images, targets = _to_device(images, device), targets.to(device, non_blocking=True)
        if loop.mixer is not None:
            images, targets = loop.mixer(images, targets)
        with _autocast(device):
            logits = model(images)
        loss = loop.criterion(logits.float(), targets)
        optimizer.zero_grad(set_to_none=True)
        loop.scaler.scale(loss).backward()
        loop.scaler.step(optimizer)
        loop.scaler.update()
        total_loss += loss.detach() * len(images)
        seen += len(images)
        if not bar.disable and step % 10 == 0:
            bar.set_postfix(loss=f"{total_loss.item() / seen:.3f}")
        if deadline is not None and time.monotonic() >= deadline:
            return total_loss.item() / max(seen, 1), seen, True
    return total_loss.item() / max(seen, 1), seen, False


@torch.no_grad()
def predict_proba(model: nn.Module, loader: DataLoader, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """(integer labels, class probabilities) over a whole loader, in loader order."""
    model.eval()
    labels, probs = [], []
    for images, targets in loader:
        with _autocast(device):
            logits = model(_to_device(images, device))
        probs.append(torch.softmax(logits.float(), dim=-1).cpu().numpy())
        labels.append(targets.numpy())
    return np.concatenate(labels), np.concatenate(probs)


def _validate(model: nn.Module, loader: DataLoader, device: torch.device) -> tuple[float, float, float]:
    """(loss, macro-F1 over the classes present, accuracy) on the validation loader, as pipelines.model.evaluate."""
    labels, probs = predict_proba(model, loader, device)
    loss = float(-np.mean(np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None))))
    predicted = probs.argmax(axis=1)
    return loss, macro_f1(labels, predicted), float(np.mean(predicted == labels))


# -- checkpoints ----------------------------------------------------------------------------------


def _save_checkpoint(path: Path, state: _State, model, optimizer, scheduler, scaler, config: TrainConfig) -> None:
    payload = {
        "format": CHECKPOINT_FORMAT,
        "config": asdict(config),
        "state": {**asdict(state), "history": [asdict(r) for r in state.history]},
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)  # a crash mid-save leaves the previous checkpoint intact
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load_checkpoint(path: Path, config: TrainConfig) -> dict[str, Any] | None:
    if not path.exists():
        return None
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if payload.get("format") != CHECKPOINT_FORMAT or payload.get("config") != asdict(config):
        return None  # a checkpoint of another configuration is not ours to continue
    saved = payload["state"]
    saved["history"] = [EpochRecord(**r) for r in saved["history"]]
    payload["state"] = _State(**saved)
    return payload


# -- the loop -------------------------------------------------------------------------------------


def _make_optimizer(params: list[nn.Parameter], stage: Stage, config: TrainConfig):
    optimizer = torch.optim.AdamW(params, lr=stage.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="max", factor=config.plateau_factor, patience=config.plateau_patience
    )
    return optimizer, scheduler


def fit(
    model: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader,
    *,
    stages: Sequence[Stage],
    config: TrainConfig,
    checkpoint_path: Path | None = None,
    callbacks: Sequence[Callback] = (),
    mixer: BatchMixer | None = None,
    criterion: Criterion | None = None,
    device: torch.device | None = None,
) -> FitResult:
    """Train through ``stages``; return the best-validation-F1 weights and the epoch history.

    Stops early when val macro-F1 has not improved for ``config.patience`` epochs of the last stage, or
    when ``config.time_budget_min`` of training time (counted across resumes) is spent; in every case the
    returned ``best_state`` is the best epoch seen. ``mixer`` turns a batch into (images, soft targets);
    ``criterion`` defaults to `default_criterion` (timm's cross-entropy for integer or soft targets).
    """
    device = device or pick_device()
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda")
    criterion = criterion or default_criterion(config.label_smoothing, mixer)
    budget_s = config.time_budget_min * 60 if config.time_budget_min else None
    loop = _Loop(model, train_loader, val_loader, config, device, criterion, mixer, scaler, budget_s)
    saved = _load_checkpoint(checkpoint_path, config) if checkpoint_path else None
    state = saved["state"] if saved else _State()
    if saved:
        model.load_state_dict(saved["model"])
        scaler.load_state_dict(saved["scaler"])
    resumed_from = state.epoch if saved else None
    stop_reason = "completed"

    while state.stage_index < len(stages):
        stage = stages[state.stage_index]
        optimizer, scheduler = _make_optimizer(_apply_stage(model, stage), stage, config)
        if saved and state.stage_epoch > 0:
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
        saved = None
        last_stage = state.stage_index == len(stages) - 1
        while state.stage_epoch < stage.epochs:
            stop_reason = _stop_before_epoch(state, config, budget_s, last_stage)
            if stop_reason != "completed":
                break
            record, cut = _run_epoch(loop, optimizer, state, stage)
            scheduler.step(record.val_macro_f1)
            _advance(state, record, model, last_stage)
            for callback in callbacks:
                callback.on_epoch_end(record)
            if checkpoint_path:
                _save_checkpoint(checkpoint_path, state, model, optimizer, scheduler, scaler, config)
            if cut:
                stop_reason = "time_budget"
                break
        if stop_reason != "completed":
            break
        state.stage_index += 1
        state.stage_epoch = 0
        state.stale_epochs = 0

    model.load_state_dict(state.best_state)
    return FitResult(
        best_state=state.best_state,
        best_epoch=state.best_epoch,
        best_val_f1=state.best_val_f1,
        history=state.history,
        stop_reason=stop_reason,
        resumed_from_epoch=resumed_from,
        train_seconds=state.train_seconds,
        images_per_s=state.images_seen / max(state.train_seconds, 1e-9),
    )


def _stop_before_epoch(state: _State, config: TrainConfig, budget_s: float | None, last_stage: bool) -> str:
    """Checked before every epoch, so a resumed run also honours a budget or patience already spent."""
    if budget_s is not None and state.train_seconds >= budget_s:
        return "time_budget"
    if last_stage and state.stale_epochs >= config.patience:
        return "early_stopping"
    return "completed"


def _run_epoch(loop: _Loop, optimizer, state: _State, stage: Stage) -> tuple[EpochRecord, bool]:
    """Train one epoch (reseeded from (seed, epoch)) and validate; returns the record and whether the
    budget cut the epoch short."""
    seed = loop.config.seed + state.epoch
    seed_everything(seed)
    if loop.train_loader.generator is not None:
        loop.train_loader.generator.manual_seed(seed)
    started = time.monotonic()
    deadline = started + loop.budget_s - state.train_seconds if loop.budget_s is not None else None
    train_loss, seen, cut = _train_epoch(loop, optimizer, deadline, f"epoch {state.epoch + 1} ({stage.name})")
    train_seconds = time.monotonic() - started
    val_loss, val_f1, val_acc = _validate(loop.model, loop.val_loader, loop.device)
    record = EpochRecord(
        epoch=state.epoch,
        stage=stage.name,
        train_loss=train_loss,
        val_loss=val_loss,
        val_macro_f1=val_f1,
        val_accuracy=val_acc,
        lr=optimizer.param_groups[0]["lr"],
        images_per_s=seen / max(train_seconds, 1e-9),
        seconds=time.monotonic() - started,
        train_seconds=train_seconds,
        images=seen,
    )
    return record, cut


def _advance(state: _State, record: EpochRecord, model: nn.Module, last_stage: bool) -> None:
    state.history.append(record)
    state.epoch += 1
    state.stage_epoch += 1
    state.train_seconds += record.train_seconds
    state.images_seen += record.images
    if record.val_macro_f1 > state.best_val_f1:
        state.best_val_f1 = record.val_macro_f1
        state.best_epoch = record.epoch
        state.best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        state.stale_epochs = 0
    elif last_stage:
        state.stale_epochs += 1


def run_key(parts: dict[str, Any]) -> str:
    """A deterministic id for a training configuration: the same inputs resume the same checkpoint."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def checkpoint_file(state_dir: Path, key: str) -> Path:
    return Path(state_dir) / "checkpoints" / f"{key}.pt"
