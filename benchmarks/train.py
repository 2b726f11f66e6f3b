"""Training benchmark: the product's training path vs a plain timm fine-tuning loop, same budget, same split.

Both run in this process, one after the other, on the shared all_taleqani images (read from the folder,
no S3/MLflow), split by groups: the ALL source's grouping (`pipelines.data.groups.GroupSpec`, 20
consecutive file numbers of one class per group, because neighbouring captures are near-duplicates)
hashed 80/10/10 as the snapshot does. Ours is exactly what `leukops train` runs: the spec and recipe
resolved from ``settings.retrain`` (`candidate_spec`, `train_config`), `build_run` and `fit_prepared`;
only the time budget is the benchmark's. The plain loop is the textbook one: the timm model with the same
ImageNet weights and its own linear classifier, full fine-tuning, AdamW at a constant 1e-3, label-smoothed
cross-entropy, the same loaders (flips), the best-validation epoch kept.

Printed for each on its test groups: macro-F1 (bootstrap 95 % CI), per-class recall, ECE, epochs and
training img/s; then the paired bootstrap CI of F1(ours) − F1(plain), the throughput ratio and the load
average (the CPU is shared).

    .venv/bin/python benchmarks/train.py --budget-min 10
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pandas as pd
import timm
import torch
from torch import nn

from pipelines.core.settings import get_settings
from pipelines.core.taxonomy import get_task
from pipelines.data.datasets import ImageFileDataset, make_loader
from pipelines.data.groups import GroupSpec
from pipelines.data.snapshot import hash_split
from pipelines.model.backbones import BACKBONES, efficientnet_lite0_package_file, load_encoder_weights
from pipelines.model.calibration import fit_calibration
from pipelines.model.candidate import build_run, candidate_spec, fit_prepared, train_config
from pipelines.model.devices import pick_device, seed_everything
from pipelines.model.evaluate import evaluate_logits, evaluate_predictions, macro_f1
from pipelines.model.predict import loader_logits, probabilities
from pipelines.model.validation import predict_proba
from pipelines.trust.statistics import bootstrap_macro_f1

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "all_taleqani"
TASK = "all_subtypes"
CLASSES = get_task(TASK).classes
GROUPS = GroupSpec(by=r"regex:^([^/]+)/.*?(?P<key>\d+)\.\w+$", block=20)
PLAIN_LR = 1e-3


def grouped_frame(root: Path, every: int = 1) -> pd.DataFrame:
    """One row per image (every ``every``-th file of each class): path, label, group, the group's split."""
    rows = []
    for label in CLASSES:
        for path in sorted((root / label).glob("*.jpg"))[::every]:
            group = GROUPS.key(root.name, path.relative_to(root).as_posix(), None)
            rows.append({"path": path, "label": label, "group": group, "split": hash_split(group)})
    return pd.DataFrame(rows)


def plain_model(backbone: str, pretrained: bool) -> nn.Module:
    """The timm model with its own classifier and the same weights the product's backbone starts from."""
    model = timm.create_model(backbone, pretrained=False, num_classes=0)
    if pretrained and backbone != "efficientnet_lite0":
        raise SystemExit(f"the plain loop knows only efficientnet_lite0's offline weights, not {backbone}'s")
    if pretrained:
        load_encoder_weights(model, efficientnet_lite0_package_file())
    model.reset_classifier(len(CLASSES))
    return model


def plain_fit(
    model: nn.Module, loaders: dict, budget_s: float, device: torch.device, max_epochs: int | None = None
) -> dict:
    """The baseline loop: AdamW(1e-3), constant LR, label smoothing 0.1, best-val-F1 epoch kept."""
    seed_everything(0)
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=PLAIN_LR)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    best_f1, best_state, history, elapsed, train_s, seen = -1.0, None, [], 0.0, 0.0, 0
    while elapsed < budget_s and len(history) != max_epochs:
        loaders["train"].generator.manual_seed(len(history))
        started = time.monotonic()
        model.train()
        for images, targets in loaders["train"]:
            loss = criterion(model(images.to(device)), targets.to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            seen += len(images)
            if time.monotonic() - started >= budget_s - elapsed:
                break
        train_s += time.monotonic() - started
        labels, proba = predict_proba(model, loaders["val"], device)
        history.append(round(macro_f1(labels, proba.argmax(1)), 4))
        if history[-1] > best_f1:
            best_f1, best_state = history[-1], copy.deepcopy(model.state_dict())
        elapsed += time.monotonic() - started
    model.load_state_dict(best_state)
    return {"val_f1_by_epoch": history, "images_per_s": seen / train_s, "wall_s": elapsed}


def _first(dataset: ImageFileDataset, n: int) -> ImageFileDataset:
    return ImageFileDataset(dataset.paths[:n], dataset.labels[:n], dataset.transform)


def alternating_throughput(run, backbone: str, batches: int, repeats: int, device: torch.device) -> dict:
    """Training img/s of the product's loop (`fit_prepared`'s recipe: layer-decay AdamW, per-step schedule,
    EMA, class weights) and of the plain loop on the same ``batches`` batches, alternating ``repeats`` times
    (the best of each kept): a busy neighbour then slows both, not one."""
    images = _first(run.loaders["train"].dataset, batches * run.spec.batch_size)
    one_batch_val = _first(run.loaders["val"].dataset, run.spec.batch_size)
    best = {"ours": 0.0, "plain": 0.0}
    for repeat in range(repeats):
        for which in ("ours", "plain") if repeat % 2 == 0 else ("plain", "ours"):
            loaders = {
                "train": make_loader(images, batch_size=run.spec.batch_size, train=True, device=device, seed=0),
                "val": make_loader(one_batch_val, batch_size=run.spec.batch_size, train=False, device=device, seed=0),
            }
            if which == "ours":
                trial = replace(run, config=replace(run.config, epochs=1, time_budget_min=None), loaders=loaders)
                trial.backbone.model.load_state_dict(run.backbone.model.state_dict())
                rate = fit_prepared(trial).images_per_s
            else:
                rate = plain_fit(plain_model(backbone, run.backbone.pretrained), loaders, 1e9, device, 1)[
                    "images_per_s"
                ]
            best[which] = max(best[which], rate)
    return best


def test_figures(
    model: nn.Module, loaders: dict, device: torch.device, tta: tuple[str, ...] | None = None
) -> tuple[dict, np.ndarray, np.ndarray]:
    """Test-split figures; with ``tta`` (the product's path) through the product's forward pass: the
    temperature fitted on val and the TTA views, as `train_prepared` logs them. Without: plain softmax."""
    if tta is None:
        labels, proba = predict_proba(model, loaders["test"], device)
        result = evaluate_predictions(labels, proba, CLASSES)
    else:
        calibration = fit_calibration(model, loaders["val"], device, tta)
        labels, logits = loader_logits(model, loaders["test"], device, calibration.inference.tta)
        result = evaluate_logits(labels, logits, CLASSES, calibration.inference)
        proba = probabilities(logits, calibration.inference.temperature)
    figures = {
        "macro_f1": result.macro_f1,
        "f1_ci": (result.f1_ci_low, result.f1_ci_high),
        "recall": {name: scores.recall for name, scores in result.per_class.items()},
        "ece": result.ece,
    }
    return figures, labels, proba.argmax(1)


def describe(name: str, figures: dict, fitted: dict) -> str:
    recall = "  ".join(f"{c} {r:.3f}" for c, r in figures["recall"].items())
    low, high = figures["f1_ci"]
    return (
        f"{name}: test macro-F1 {figures['macro_f1']:.4f} (95% CI {low:.3f}-{high:.3f})  ECE {figures['ece']:.3f}\n"
        f"  recall {recall}\n"
        f"  {len(fitted['val_f1_by_epoch'])} epochs in {fitted['wall_s']:.0f} s, {fitted['images_per_s']:.1f} img/s,"
        f" val F1 by epoch {fitted['val_f1_by_epoch']}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-min", type=float, default=10.0, help="the time budget of each loop")
    parser.add_argument("--backbone", default="efficientnet_lite0", choices=list(BACKBONES))
    parser.add_argument("--every", type=int, default=1, help="every N-th image of each class (a quick run)")
    parser.add_argument("--skip-plain", action="store_true", help="only the product's loop")
    parser.add_argument("--throughput-only", action="store_true", help="only the alternating img/s measurement")
    parser.add_argument("--throughput-batches", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json-out", type=Path, help="also write the figures here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    retrain = get_settings().retrain
    spec = candidate_spec(retrain, TASK, args.backbone)
    config = train_config(retrain, time_budget_min=args.budget_min)
    frame = grouped_frame(DATA, args.every)
    device = pick_device(spec.device)
    print(
        f"{len(frame)} images, {frame['group'].nunique()} groups, split {frame['split'].value_counts().to_dict()}; "
        f"{spec.backbone} {spec.image_size} px batch {spec.batch_size} augment {spec.augment}; device {device}, "
        f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()}\nrecipe {asdict(config)}",
        flush=True,
    )
    run = build_run(spec, config, frame, "benchmark", str(DATA))
    rates = alternating_throughput(run, args.backbone, args.throughput_batches, args.repeats, device)
    print(
        f"alternating throughput ({args.throughput_batches} batches x {args.repeats}): ours {rates['ours']:.1f} "
        f"img/s, plain {rates['plain']:.1f} img/s, ratio {rates['ours'] / rates['plain']:.3f}; "
        f"load average {os.getloadavg()}",
        flush=True,
    )
    if args.throughput_only:
        return
    run = build_run(spec, config, frame, "benchmark", str(DATA))  # afresh: the trials trained the module
    started = time.monotonic()
    result = fit_prepared(run)
    ours_fit = {
        "val_f1_by_epoch": [round(r.val_macro_f1, 4) for r in result.history],
        "images_per_s": result.images_per_s,
        "wall_s": time.monotonic() - started,
        "stop_reason": result.stop_reason,
        "planned_steps": result.planned_steps,
    }
    ours, truth, ours_pred = test_figures(run.backbone.model, run.loaders, device, spec.tta)
    print(describe("leukops (fit_prepared)", ours, ours_fit), f"\n  load average {os.getloadavg()}", flush=True)
    report = {"ours": {**ours, **ours_fit}, "recipe": asdict(config), "n_test": len(truth)}
    if not args.skip_plain:
        model = plain_model(args.backbone, run.backbone.pretrained)
        plain_fitted = plain_fit(model, run.loaders, args.budget_min * 60, device)
        plain, _, plain_pred = test_figures(model, run.loaders, device)
        print(describe(f"plain timm loop (AdamW {PLAIN_LR:g}, constant)", plain, plain_fitted))
        diff = bootstrap_macro_f1(truth, ours_pred, len(CLASSES), baseline=plain_pred)
        ratio = ours_fit["images_per_s"] / plain_fitted["images_per_s"]
        print(
            f"F1(ours) - F1(plain) = {diff.point:+.4f} (paired bootstrap 95% CI {diff.interval[0]:+.4f} to "
            f"{diff.interval[1]:+.4f}, n={diff.n}); throughput ratio ours/plain {ratio:.3f}; "
            f"load average {os.getloadavg()}"
        )
        report |= {"plain": {**plain, **plain_fitted}, "f1_difference": asdict(diff), "throughput_ratio": ratio}
    report["alternating_throughput"] = rates
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
