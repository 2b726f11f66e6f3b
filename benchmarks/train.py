"""Training benchmark on the full shared all_taleqani set: test macro-F1 and the loop's throughput ratio.

For each candidate — pretrained EfficientNet-Lite0 (two-stage fine-tuning) and random-init MobileNetV2 —
it (1) trains with ``pipelines.model.train.fit`` under a wall-clock budget and reports val/test macro-F1 of
the val-selected checkpoint on a held-out test split, and (2) measures training throughput of ``fit``
against a plain PyTorch loop (AdamW, cross-entropy, constant LR) on the same module, batch size and
DataLoader, alternating plain/ours ``--repeats`` times and keeping each one's best (the CPU is shared).

Images are read from the shared folder directly (no S3); the split is the snapshot's hash split applied
to blocks of 10 consecutive file numbers, because neighbouring captures are near-duplicates.

    .venv/bin/python benchmarks/train.py --budget-min 3 --image-size 128
"""

from __future__ import annotations

import argparse
import copy
import re
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from torch import nn
from torch.utils.data import Subset

from pipelines.core.taxonomy import get_task
from pipelines.data.datasets import ImageFileDataset, label_indices, make_loader, split_rows
from pipelines.data.snapshot import hash_split
from pipelines.model.backbones import create_backbone
from pipelines.model.candidate import stages_for
from pipelines.model.evaluate import evaluate_predictions
from pipelines.model.preprocess import build_transform, preprocessing_from
from pipelines.model.train import Stage, TrainConfig, fit, pick_device, predict_proba, seed_everything

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "all_taleqani"
CLASSES = get_task("all_subtypes").classes
CANDIDATES = (("efficientnet_lite0", 3e-3), ("mobilenetv2_100", 2e-3))


def taleqani_frame(root: Path) -> pd.DataFrame:
    rows = []
    for label in CLASSES:
        for path in sorted((root / label).glob("*.jpg")):
            number = int(re.search(r"(\d+)$", path.stem).group(1))
            rows.append({"path": path, "label": label, "split": hash_split(f"{label}-{number // 10}")})
    return pd.DataFrame(rows)


def loaders(frame: pd.DataFrame, preprocessing: dict, batch_size: int, device: torch.device) -> dict:
    out = {}
    for split in ("train", "val", "test"):
        rows, train = split_rows(frame, split), split == "train"
        dataset = ImageFileDataset(
            list(rows["path"]), label_indices(list(rows["label"]), CLASSES), build_transform(preprocessing, train=train)
        )
        out[split] = make_loader(dataset, batch_size=batch_size, train=train, device=device, seed=0)
    return out


def plain_loop_images_per_s(model: nn.Module, loader, device: torch.device, lr: float) -> float:
    """The baseline: the textbook loop, nothing else."""
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    seen, started = 0, time.monotonic()
    for images, targets in loader:
        images, targets = images.to(device), targets.to(device)
        loss = nn.functional.cross_entropy(model(images), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        seen += len(images)
    return seen / (time.monotonic() - started)


def ours_images_per_s(model: nn.Module, loader, val_loader, device: torch.device, lr: float) -> float:
    config = TrainConfig(epochs=1, lr=lr, label_smoothing=0.0)
    with tempfile.TemporaryDirectory() as tmp:
        result = fit(
            model,
            loader,
            val_loader,
            stages=[Stage("full", 1, lr, ("",))],
            config=config,
            checkpoint_path=Path(tmp) / "bench.pt",
            device=device,
        )
    return result.images_per_s


def throughput(name: str, lr: float, data: dict, args, device: torch.device) -> tuple[float, float]:
    """Best-of-repeats images/s for the plain loop and for ``fit``: each measurement starts from a copy of
    the same initial module on the same batches, and the order alternates (drifting weights or a busy
    neighbour then favour neither)."""
    initial = create_backbone(name, len(CLASSES), pretrained=False, image_size=args.image_size).model
    train = data["train"].dataset
    batches = Subset(train, range(min(len(train), args.throughput_batches * args.batch_size)))
    tiny_val = Subset(data["val"].dataset, range(args.batch_size))
    results: dict[str, list[float]] = {"plain": [], "ours": []}
    for repeat in range(args.repeats):
        for which in ("plain", "ours") if repeat % 2 == 0 else ("ours", "plain"):
            loader = make_loader(batches, batch_size=args.batch_size, train=True, device=device, seed=0)
            model = copy.deepcopy(initial)
            if which == "plain":
                results[which].append(plain_loop_images_per_s(model, loader, device, lr))
            else:
                val = make_loader(tiny_val, batch_size=args.batch_size, train=False, device=device, seed=0)
                results[which].append(ours_images_per_s(model, loader, val, device, lr))
    return max(results["plain"]), max(results["ours"])


def accuracy_run(name: str, lr: float, data: dict, args, device: torch.device) -> dict:
    seed_everything(0)
    backbone = create_backbone(name, len(CLASSES), pretrained=name == "efficientnet_lite0", image_size=args.image_size)
    config = TrainConfig(epochs=50, lr=lr, head_epochs=1, patience=4, time_budget_min=args.budget_min)
    started = time.monotonic()
    result = fit(
        backbone.model, data["train"], data["val"], stages=stages_for(backbone, config), config=config, device=device
    )
    labels, proba = predict_proba(backbone.model, data["test"], device)
    test = evaluate_predictions(labels, proba, CLASSES, bootstrap=1000)
    return {
        "pretrained": backbone.pretrained,
        "epochs": len(result.history),
        "stop": result.stop_reason,
        "val_f1": result.best_val_f1,
        "val_f1_by_epoch": [round(r.val_macro_f1, 3) for r in result.history],
        "test_f1": test.macro_f1,
        "test_ci": (test.f1_ci_low, test.f1_ci_high),
        "test_accuracy": test.accuracy,
        "images_per_s": result.images_per_s,
        "wall_s": time.monotonic() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-min", type=float, default=3.0, help="training budget per candidate")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--throughput-batches", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device")
    parser.add_argument("--only", choices=[c for c, _ in CANDIDATES])
    parser.add_argument("--throughput-only", action="store_true", help="skip the budgeted accuracy runs")
    args = parser.parse_args()
    device = pick_device(args.device)
    frame = taleqani_frame(DATA)
    print(
        f"device {device}, torch threads {torch.get_num_threads()}, {len(frame)} images, "
        f"split {frame['split'].value_counts().to_dict()}, {args.image_size} px, batch {args.batch_size}"
    )
    for name, lr in CANDIDATES:
        if args.only and name != args.only:
            continue
        probe = create_backbone(name, len(CLASSES), pretrained=False, image_size=args.image_size)
        data = loaders(frame, preprocessing_from(probe.data_config), args.batch_size, device)
        plain, ours = throughput(name, lr, data, args, device)
        print(
            f"{name}: throughput plain loop {plain:.1f} img/s, leukops fit {ours:.1f} img/s, ratio {ours / plain:.3f}"
        )
        if args.throughput_only:
            continue
        run = accuracy_run(name, lr, data, args, device)
        print(
            f"{name} ({'ImageNet' if run['pretrained'] else 'random init'}): {run['epochs']} epochs "
            f"({run['stop']}, {run['wall_s']:.0f} s), val F1 by epoch {run['val_f1_by_epoch']}, "
            f"best val F1 {run['val_f1']:.3f}, test macro-F1 {run['test_f1']:.3f} "
            f"(95% CI {run['test_ci'][0]:.3f}-{run['test_ci'][1]:.3f}), test accuracy {run['test_accuracy']:.3f}, "
            f"train {run['images_per_s']:.1f} img/s",
            flush=True,
        )


if __name__ == "__main__":
    main()
