"""`leukops train`: one candidate on a task's snapshot (``leukops evaluate`` lives in cli/evaluate.py).

Every training option defaults to None: left out, it takes its value from ``settings.retrain``
(``leukops.yaml`` ``retrain:``, ``LEUKOPS_RETRAIN__*``), the same values the nightly DAG trains with.
"""

from __future__ import annotations

import argparse
import logging
import sys

from pipelines.cli import Output, add_command

SETTING = " (default: settings.retrain.{})"
TASK_SETTING = " (default: settings.retrain.per_task[task].{0}, else retrain.{0})"


def register(sub: argparse._SubParsersAction) -> None:
    train = add_command(
        sub, "train", "train one backbone on a task's dataset snapshot and log the run to MLflow", _train
    )
    train.add_argument("--task", required=True, help="task name (see pipelines.core.taxonomy)")
    train.add_argument("--dataset-version", help="snapshot version (default: the task's latest)")
    train.add_argument("--backbone", required=True, help="allow-listed backbone, e.g. efficientnet_lite0")
    train.add_argument(
        "--augment", help="none | mixup | cutmix | augmix | randaug (default: settings.retrain.augmentations[0])"
    )
    train.add_argument("--epochs", type=int, help="most epochs" + SETTING.format("epochs"))
    train.add_argument("--image-size", type=int, help="input side in px" + TASK_SETTING.format("image_size"))
    train.add_argument("--max-images", type=int, help="a stratified subset of this many images")
    train.add_argument(
        "--time-budget-min", type=float, help="training + validation minutes" + SETTING.format("time_budget_min")
    )
    train.add_argument("--seed", type=int, help="seed" + SETTING.format("seed"))
    train.add_argument("--batch-size", type=int, help="batch size" + SETTING.format("batch_size"))
    train.add_argument("--lr", type=float, help="peak learning rate" + SETTING.format("lr"))
    train.add_argument("--patience", type=int, help="early-stopping patience in epochs" + SETTING.format("patience"))
    train.add_argument("--mask-corner", action="store_true", help="mask the bottom-right label region")
    train.add_argument(
        "--stain-augment",
        choices=("none", "hed"),
        help="HED stain jitter in training" + TASK_SETTING.format("stain_augment"),
    )
    train.add_argument(
        "--stain-strength", type=float, help="HED jitter sigma (optical density)" + SETTING.format("stain_strength")
    )
    train.add_argument(
        "--stain-normalize",
        choices=("none", "macenko", "reinhard"),
        help="stain normaliser fitted on the training split, saved with the model" + SETTING.format("stain_normalize"),
    )
    train.add_argument(
        "--cell-crop",
        type=float,
        help="crop to the central cell, SCALE x its nucleus (default: settings.retrain.per_task[task].cell_crop, "
        "else 0 = the whole image)",
    )
    train.add_argument(
        "--site-balance",
        type=float,
        help="draw weight n_site^-X across the snapshot's sources (0 = off, 1 = sites equal)"
        + TASK_SETTING.format("site_balance"),
    )
    train.add_argument(
        "--warm-start",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="start from the task's @champion when it is the same network" + TASK_SETTING.format("warm_start"),
    )
    train.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda when available)")


def _show_progress() -> None:
    """The loop's one line per epoch (logger pipelines.model.train) on stderr; stdout stays the result."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    logger = logging.getLogger("pipelines.model.train")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def _train(args: argparse.Namespace) -> Output:
    from pipelines.core.settings import get_settings
    from pipelines.model.candidate import train_candidate
    from pipelines.trust.champion_start import champion_start

    _show_progress()
    summary = train_candidate(
        get_settings(),
        args.task,
        args.backbone,
        args.augment,
        dataset_version=args.dataset_version,
        image_size=args.image_size,
        max_images=args.max_images,
        batch_size=args.batch_size,
        mask_corner=args.mask_corner,
        device=args.device,
        stain={
            "stain_augment": args.stain_augment,
            "stain_strength": args.stain_strength,
            "stain_normalize": args.stain_normalize,
        },
        site_balance=args.site_balance,
        warm_start=args.warm_start,
        cell_crop=args.cell_crop,
        champion_reader=champion_start,
        epochs=args.epochs,
        lr=args.lr,
        patience=args.patience,
        seed=args.seed,
        time_budget_min=args.time_budget_min,
    ).to_dict()
    start = "ImageNet" if summary["pretrained"] else "random init"
    text = (
        f"run {summary['run_id']}  {summary['backbone']} ({start}, {summary['augment']})"
        f" on {summary['task']}@{summary['dataset_version']}\n"
        f"val macro-F1 {summary['val_f1']:.3f}  test macro-F1 {summary['test_f1']:.3f}"
        f"  test accuracy {summary['test_accuracy']:.3f}\n"
        f"{summary['epochs_run']} epochs ({summary['stop_reason']})  model {summary['model_uri']}"
    )
    return Output(summary, text)
