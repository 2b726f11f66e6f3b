"""`leukops train` (one candidate on a task's snapshot) and `leukops evaluate` (a model on a source)."""

from __future__ import annotations

import argparse

from pipelines.cli import Output, add_command


def register(sub: argparse._SubParsersAction) -> None:
    train = add_command(
        sub, "train", "train one backbone on a task's dataset snapshot and log the run to MLflow", _train
    )
    train.add_argument("--task", required=True, help="task name (see pipelines.core.taxonomy)")
    train.add_argument("--dataset-version", help="snapshot version (default: the task's latest)")
    train.add_argument("--backbone", required=True, help="allow-listed backbone, e.g. efficientnet_lite0")
    train.add_argument("--augment", default="mixup", help="none | mixup | cutmix | augmix | randaug")
    train.add_argument("--epochs", type=int, default=10)
    train.add_argument("--image-size", type=int, help="input side in px (default: the backbone's)")
    train.add_argument("--max-images", type=int, help="train on a stratified subset of this many images")
    train.add_argument("--time-budget-min", type=float, help="stop training after this many minutes")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--batch-size", type=int, default=32)
    train.add_argument("--lr", type=float, default=1e-3, help="stage-1 / from-scratch learning rate")
    train.add_argument("--patience", type=int, default=4, help="early-stopping patience in epochs")
    train.add_argument("--mask-corner", action="store_true", help="mask the bottom-right label region")
    train.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda when available)")

    evaluate = add_command(
        sub, "evaluate", "evaluate a model on a source's accepted images (external validation)", _evaluate
    )
    evaluate.add_argument("--model", required=True, help="champion | previous | challenger | an MLflow run id")
    evaluate.add_argument("--source", required=True, help="an ingested source, typically a holdout")
    evaluate.add_argument("--task", help="the task whose alias --model names (default: the source's only task)")


def _train(args: argparse.Namespace) -> Output:
    from pipelines.core.settings import get_settings
    from pipelines.model.candidate import train_candidate

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
        epochs=args.epochs,
        lr=args.lr,
        patience=args.patience,
        seed=args.seed,
        time_budget_min=args.time_budget_min,
    ).to_dict()
    start = "ImageNet" if summary["pretrained"] else "random init"
    text = (
        f"run {summary['run_id']}  {summary['backbone']} ({start})"
        f" on {summary['task']}@{summary['dataset_version']}\n"
        f"val macro-F1 {summary['val_f1']:.3f}  test macro-F1 {summary['test_f1']:.3f}"
        f"  test accuracy {summary['test_accuracy']:.3f}\n"
        f"{summary['epochs_run']} epochs ({summary['stop_reason']})  model {summary['model_uri']}"
    )
    return Output(summary, text)


def _evaluate(args: argparse.Namespace) -> Output:
    from pipelines.core.settings import get_settings
    from pipelines.model.candidate import evaluate_on_source

    result = evaluate_on_source(get_settings(), args.model, args.source, task=args.task)
    per_class = "\n".join(
        f"  {name:<14} recall {m['recall']:.3f}  precision {m['precision']:.3f}  n={m['support']}"
        for name, m in result["per_class"].items()
    )
    absent = f"\nabsent classes: {', '.join(result['absent_classes'])}" if result["absent_classes"] else ""
    text = (
        f"{result['model_uri']} on source {result['source']} ({result['n']} images, task {result['task']})\n"
        f"macro-F1 {result['macro_f1']:.3f}  accuracy {result['accuracy']:.3f}\n{per_class}{absent}"
    )
    return Output(result, text)
