"""The training loop: injected model, loaders and callbacks; the recipe, checkpoints, resume.

``fit`` knows nothing about S3, MLflow or the CLI. It trains ``model`` through a list of ``Stage``s (by
default one stage that fine-tunes everything; an optional short head-only stage first) with the recipe of
`pipelines.model.recipe`: timm AdamW with layer-wise LR decay, warm-up + cosine stepped per update over
the planned run, weight EMA. It validates the EMA weights after every epoch, keeps the epoch that
`pipelines.model.validation` chooses (the latest within one standard error of the best), and writes a
checkpoint (model, EMA, optimizer, scheduler, step) after every epoch so that a crashed run resumes
exactly where it stopped. Each epoch reseeds the RNGs and the shuffling from (seed, epoch), so a resumed
run replays the epochs an uninterrupted run would have run.

The schedule is planned in optimizer steps. Without a time budget it spans ``epochs``; with one, it is
planned after the first few updates (as many steps as the remaining budget allows at their measured
speed, validation included) and re-planned once after the first epoch from its measured wall time; the
run ends when the plan's steps are done. The plan is checkpointed, so a resumed run keeps it.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from pipelines.model import checkpoint, recipe
from pipelines.model.devices import autocast, pick_device, seed_everything, to_device, to_layout
from pipelines.model.stages import Stage, apply_stage, freeze_frozen_batchnorm
from pipelines.model.validation import keeps, validate

log = logging.getLogger(__name__)

BatchMixer = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
CHECKPOINT_FORMAT = 3
PROBE_STEPS = (2, 12)  # the updates timed for the first plan (the first one pays the loader's start-up)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings; everything here is logged as run params and keys the checkpoint.

    The defaults equal ``RetrainConfig``'s (settings.retrain, leukops.yaml ``retrain:``), which is where
    the CLI, the nightly DAG and the benchmark read them (`pipelines.model.candidate.train_config`)."""

    epochs: int = 40  # the most epochs; the time budget usually plans fewer
    lr: float = 1e-3  # peak LR of the head (and of every layer from random init)
    head_epochs: int = 0  # pretrained only: epochs that train the head alone before everything opens
    layer_lr_floor: float = 1.0  # pretrained only: LR scale of the encoder's first layer group (1 = uniform)
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    warmup_ratio: float = 0.05  # linear warm-up over this share of the planned steps
    min_lr_ratio: float = 0.01  # cosine floor, × lr
    ema_decay: float = 0.995  # weight EMA (0 = off); timm's warm-up keeps it lower in short runs
    class_balanced: bool = True  # class-weighted loss ("balanced" inverse frequency)
    patience: int = 10  # epochs without a better val macro-F1 before stopping
    seed: int = 0
    time_budget_min: float | None = 10.0  # training + validation wall time


@dataclass
class EpochRecord:
    epoch: int
    stage: str
    train_loss: float
    val_loss: float
    val_macro_f1: float  # averaged over the validation split's sites (`pipelines.model.validation`)
    val_macro_f1_se: float  # its bootstrap standard error
    val_accuracy: float
    lr: float
    images_per_s: float
    seconds: float  # training + validation
    train_seconds: float = 0.0
    images: int = 0


@dataclass
class FitResult:
    kept_state: dict[str, torch.Tensor]  # the weights the run keeps (the EMA's of ``kept_epoch``)
    kept_epoch: int
    kept_val_f1: float
    best_epoch: int  # the best-scoring epoch; patience counts from it
    best_val_f1: float
    history: list[EpochRecord]
    stop_reason: str  # "completed" | "early_stopping" | "time_budget"
    resumed_from_epoch: int | None
    train_seconds: float
    images_per_s: float
    planned_steps: int = 0


class Callback(Protocol):
    def on_epoch_end(self, record: EpochRecord) -> None: ...


@dataclass
class _State:
    """Everything a resumed run needs; saved after every epoch."""

    stage_index: int = 0
    stage_epoch: int = 0
    epoch: int = 0
    step: int = 0  # optimizer updates so far: the scheduler's and the EMA's clock
    planned_steps: int = 0  # the schedule's length in updates; planned from the budget in the first epoch
    best_val_f1: float = -1.0
    best_val_se: float = 0.0
    best_epoch: int = -1
    kept_val_f1: float = -1.0
    kept_epoch: int = -1
    kept_state: dict[str, torch.Tensor] = field(default_factory=dict)
    stale_epochs: int = 0
    history: list[EpochRecord] = field(default_factory=list)
    train_seconds: float = 0.0
    elapsed_seconds: float = 0.0  # training + validation: what the time budget counts
    images_seen: int = 0


# -- one epoch ------------------------------------------------------------------------------------


def default_criterion(
    label_smoothing: float, mixer: BatchMixer | None, class_weights: Sequence[float] | None = None
) -> Criterion:
    """Cross-entropy on integer labels (label-smoothed) or on a mixer's soft targets (already smoothed),
    class-weighted when ``class_weights`` are given."""
    return recipe.cross_entropy(label_smoothing, mixer is not None, class_weights)


@dataclass
class _Loop:
    """What stays fixed through one `fit`: the module, data, device, loss, EMA and budget."""

    model: nn.Module
    train_loader: DataLoader
    val_loader: DataLoader
    config: TrainConfig
    device: torch.device
    criterion: Criterion
    mixer: BatchMixer | None
    scaler: torch.amp.GradScaler
    ema: Any  # timm ModelEmaV3 or None
    budget_s: float | None
    val_sites: Sequence[str] | None = None  # each validation image's source, in loader order
    scheduler: Any = None  # the current stage's; replaced when the plan changes

    @property
    def eval_model(self) -> nn.Module:
        """The weights that are validated and kept: the EMA's when there is one."""
        return self.ema.module if self.ema is not None else self.model


def _train_epoch(loop: _Loop, optimizer, stage: Stage, state: _State, deadline: float | None, description: str):
    """Returns (mean loss, images seen, why the epoch ended early: "time_budget", "planned_steps" or None)."""
    model, device = loop.model, loop.device
    model.train()
    freeze_frozen_batchnorm(model)
    total_loss, seen = torch.zeros((), device=device), 0  # summed on the device: no sync per step
    bar = tqdm(loop.train_loader, desc=description, leave=False, disable=not sys.stderr.isatty(), unit="batch")
    probe_started = time.monotonic()
    for images, targets in bar:
        if state.step >= state.planned_steps:
            return total_loss.item() / max(seen, 1), seen, "planned_steps"
        images, targets = to_device(images, device), targets.to(device, non_blocking=True)
        if loop.mixer is not None:
            images, targets = loop.mixer(images, targets)
        with autocast(device):
            logits = model(images)
        loss = loop.criterion(logits.float(), targets)
        optimizer.zero_grad(set_to_none=True)
        loop.scaler.scale(loss).backward()
        loop.scaler.step(optimizer)
        loop.scaler.update()
        state.step += 1
        if state.epoch == 0 and deadline is not None and state.step in PROBE_STEPS:
            if state.step == PROBE_STEPS[0]:
                probe_started = time.monotonic()
            else:
                _plan_from_probe(loop, optimizer, stage, state, deadline, probe_started)
        loop.scheduler.step_update(state.step)
        if loop.ema is not None:
            loop.ema.update(model, step=state.step)
        total_loss += loss.detach() * len(images)
        seen += len(images)
        if not bar.disable and state.step % 10 == 0:
            bar.set_postfix(loss=f"{total_loss.item() / seen:.3f}")
        if deadline is not None and time.monotonic() >= deadline:
            return total_loss.item() / max(seen, 1), seen, "time_budget"
    return total_loss.item() / max(seen, 1), seen, None


def _plan_from_probe(loop: _Loop, optimizer, stage: Stage, state: _State, deadline: float, started: float) -> None:
    """The first plan: the remaining budget at the probe's speed, with validation's share of an epoch
    (a forward pass costs about a third of a training step)."""
    step_s = (time.monotonic() - started) / (PROBE_STEPS[1] - PROBE_STEPS[0])
    per_epoch = max(len(loop.train_loader), 1)
    step_s *= 1 + len(loop.val_loader) / (3 * per_epoch)
    _replan(loop, optimizer, stage, state, deadline - time.monotonic(), step_s)


def _replan(loop: _Loop, optimizer, stage: Stage, state: _State, remaining_s: float, step_s: float) -> None:
    max_steps = loop.config.epochs * max(len(loop.train_loader), 1)
    state.planned_steps = recipe.planned_steps(max_steps, state.step, remaining_s, step_s)
    loop.scheduler = _make_scheduler(loop, optimizer, stage, state)


# -- checkpoints ----------------------------------------------------------------------------------


def _save_checkpoint(path: Path, state: _State, loop: _Loop, optimizer, scheduler) -> None:
    checkpoint.save(
        path,
        {
            "format": CHECKPOINT_FORMAT,
            "config": asdict(loop.config),
            "state": {**asdict(state), "history": [asdict(r) for r in state.history]},
            "model": loop.model.state_dict(),
            "ema": loop.ema.module.state_dict() if loop.ema is not None else None,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": loop.scaler.state_dict(),
        },
    )


def _load_checkpoint(path: Path, config: TrainConfig) -> dict[str, Any] | None:
    payload = checkpoint.load(path, CHECKPOINT_FORMAT, asdict(config))
    if payload is None:
        return None
    saved = payload["state"]
    saved["history"] = [EpochRecord(**r) for r in saved["history"]]
    payload["state"] = _State(**saved)
    return payload


# -- the loop -------------------------------------------------------------------------------------


def _make_optimizer(loop: _Loop, stage: Stage, state: _State):
    """The stage's optimizer and its warm-up + cosine schedule over the whole planned run, set to the
    current step (a later stage continues the same LR curve)."""
    apply_stage(loop.model, stage)
    layer_decay = recipe.layer_decay_for(loop.model, stage.layer_lr_floor)
    optimizer = recipe.make_optimizer(loop.model, stage.lr, loop.config.weight_decay, layer_decay)
    return optimizer, _make_scheduler(loop, optimizer, stage, state)


def _make_scheduler(loop: _Loop, optimizer, stage: Stage, state: _State):
    total = state.planned_steps
    warmup = round(loop.config.warmup_ratio * total)
    scheduler = recipe.make_scheduler(optimizer, stage.lr, total, warmup, loop.config.min_lr_ratio)
    scheduler.step_update(state.step)
    return scheduler


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
    class_weights: Sequence[float] | None = None,
    device: torch.device | None = None,
    val_sites: Sequence[str] | None = None,
) -> FitResult:
    """Train through ``stages``; return the kept weights (the EMA's) and the epoch history.

    Stops when the planned steps are done, when val macro-F1 has not improved for ``config.patience``
    epochs of the last stage, or when ``config.time_budget_min`` of training + validation time (counted
    across resumes) is spent; in every case the returned ``kept_state`` is the latest epoch within one
    standard error of the best (`pipelines.model.validation`). ``val_sites``: each validation image's
    source, in loader order, so that validation weighs every site alike. ``mixer`` turns a batch into
    (images, soft targets); ``criterion`` defaults to `default_criterion`.
    """
    device = device or pick_device()
    to_layout(model.to(device))
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda")
    criterion = criterion or default_criterion(config.label_smoothing, mixer, class_weights)
    if isinstance(criterion, nn.Module):
        criterion.to(device)  # class weights live with the logits
    budget_s = config.time_budget_min * 60 if config.time_budget_min else None
    saved = _load_checkpoint(checkpoint_path, config) if checkpoint_path else None
    if saved:
        model.load_state_dict(saved["model"])
        scaler.load_state_dict(saved["scaler"])
    ema = recipe.make_ema(model, config.ema_decay)
    if saved and ema is not None:
        ema.module.load_state_dict(saved["ema"])
    loop = _Loop(model, train_loader, val_loader, config, device, criterion, mixer, scaler, ema, budget_s, val_sites)
    state = saved["state"] if saved else _State(planned_steps=config.epochs * max(len(train_loader), 1))
    resumed_from = state.epoch if saved else None
    stop_reason = _train_stages(loop, stages, state, saved, checkpoint_path, callbacks)
    model.load_state_dict(state.kept_state)
    return FitResult(
        kept_state=state.kept_state,
        kept_epoch=state.kept_epoch,
        kept_val_f1=state.kept_val_f1,
        best_epoch=state.best_epoch,
        best_val_f1=state.best_val_f1,
        history=state.history,
        stop_reason=stop_reason,
        resumed_from_epoch=resumed_from,
        train_seconds=state.train_seconds,
        images_per_s=state.images_seen / max(state.train_seconds, 1e-9),
        planned_steps=state.planned_steps,
    )


def _train_stages(loop: _Loop, stages, state: _State, saved, checkpoint_path, callbacks) -> str:
    stop_reason = "completed"
    while state.stage_index < len(stages):
        stage = stages[state.stage_index]
        optimizer, loop.scheduler = _make_optimizer(loop, stage, state)
        if saved and state.stage_epoch > 0:
            optimizer.load_state_dict(saved["optimizer"])
            loop.scheduler.load_state_dict(saved["scheduler"])
        saved = None
        last_stage = state.stage_index == len(stages) - 1
        while state.stage_epoch < stage.epochs:
            stop_reason = _stop_before_epoch(state, loop.config, loop.budget_s, last_stage)
            if stop_reason != "completed":
                return _end_of_plan(loop, stages, state) if stop_reason == "planned_steps" else stop_reason
            record, ended = _run_epoch(loop, optimizer, state, stage)
            _advance(state, record, loop.eval_model, last_stage)
            more = state.stage_epoch < stage.epochs or state.stage_index < len(stages) - 1
            if state.epoch == 1 and loop.budget_s is not None and ended != "time_budget" and more:
                remaining = loop.budget_s - state.elapsed_seconds
                _replan(loop, optimizer, stage, state, remaining, record.seconds / max(len(loop.train_loader), 1))
            _log_progress(state, record, loop.budget_s)
            for callback in callbacks:
                callback.on_epoch_end(record)
            if checkpoint_path:
                _save_checkpoint(checkpoint_path, state, loop, optimizer, loop.scheduler)
            if ended == "time_budget":
                return "time_budget"
        state.stage_index += 1
        state.stage_epoch = 0
        state.stale_epochs = 0
    return stop_reason


def _end_of_plan(loop: _Loop, stages, state: _State) -> str:
    """Why a run that did its planned steps ended: the budget, when it planned fewer steps than the epochs
    asked for (so the outcome does not depend on how fast the machine happens to be), else completion."""
    asked = sum(stage.epochs for stage in stages) * max(len(loop.train_loader), 1)
    return "time_budget" if state.planned_steps < asked else "completed"


def _stop_before_epoch(state: _State, config: TrainConfig, budget_s: float | None, last_stage: bool) -> str:
    """Checked before every epoch, so a resumed run also honours a budget or patience already spent."""
    if budget_s is not None and state.elapsed_seconds >= budget_s:
        return "time_budget"
    if last_stage and state.stale_epochs >= config.patience:
        return "early_stopping"
    if state.step >= state.planned_steps:
        return "planned_steps"
    return "completed"


def _run_epoch(loop: _Loop, optimizer, state: _State, stage: Stage) -> tuple[EpochRecord, str | None]:
    """Train one epoch (reseeded from (seed, epoch)) and validate the kept weights; returns the record
    and why the epoch ended early (the budget or the plan), if it did."""
    seed = loop.config.seed + state.epoch
    seed_everything(seed)
    if loop.train_loader.generator is not None:
        loop.train_loader.generator.manual_seed(seed)
    started = time.monotonic()
    deadline = started + loop.budget_s - state.elapsed_seconds if loop.budget_s is not None else None
    description = f"epoch {state.epoch + 1} ({stage.name})"
    train_loss, seen, ended = _train_epoch(loop, optimizer, stage, state, deadline, description)
    train_seconds = time.monotonic() - started
    val_loss, val_f1, val_f1_se, val_acc = validate(loop.eval_model, loop.val_loader, loop.device, loop.val_sites)
    record = EpochRecord(
        epoch=state.epoch,
        stage=stage.name,
        train_loss=train_loss,
        val_loss=val_loss,
        val_macro_f1=val_f1,
        val_macro_f1_se=val_f1_se,
        val_accuracy=val_acc,
        lr=max(group["lr"] for group in optimizer.param_groups),
        images_per_s=seen / max(train_seconds, 1e-9),
        seconds=time.monotonic() - started,
        train_seconds=train_seconds,
        images=seen,
    )
    return record, ended


def _advance(state: _State, record: EpochRecord, kept: nn.Module, last_stage: bool) -> None:
    state.history.append(record)
    state.epoch += 1
    state.stage_epoch += 1
    state.train_seconds += record.train_seconds
    state.elapsed_seconds += record.seconds
    state.images_seen += record.images
    if record.val_macro_f1 > state.best_val_f1:
        state.best_val_f1 = record.val_macro_f1
        state.best_val_se = record.val_macro_f1_se
        state.best_epoch = record.epoch
        state.stale_epochs = 0
    elif last_stage:
        state.stale_epochs += 1
    if keeps(record.val_macro_f1, state.best_val_f1, state.best_val_se):
        state.kept_val_f1, state.kept_epoch = record.val_macro_f1, record.epoch
        state.kept_state = {k: v.detach().to("cpu", copy=True) for k, v in kept.state_dict().items()}


def _log_progress(state: _State, record: EpochRecord, budget_s: float | None) -> None:
    """One line per epoch (the Airflow task log and the CLI's stderr show it)."""
    remaining = (state.planned_steps - state.step) * state.elapsed_seconds / max(state.step, 1)
    if budget_s is not None:
        remaining = min(remaining, budget_s - state.elapsed_seconds)
    log.info(
        "epoch %d (%s, step %d/%d): loss %.4f  val macro-F1 %.4f ± %.4f (best %.4f @%d, kept @%d)  lr %.2e"
        "  %.1f img/s  ETA %.0f s",
        record.epoch + 1,
        record.stage,
        state.step,
        state.planned_steps,
        record.train_loss,
        record.val_macro_f1,
        record.val_macro_f1_se,
        state.best_val_f1,
        state.best_epoch + 1,
        state.kept_epoch + 1,
        record.lr,
        record.images_per_s,
        max(remaining, 0.0),
    )
