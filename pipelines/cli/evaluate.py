"""`leukops evaluate`: external validation of a model on a source it never learned from.

``--source S``: one model (alias or run id) on one source, printed. ``--all-holdouts``: one model on every
registered holdout source of its task, the figures logged to its training run (``holdout.<source>.*``
metrics, what the gate's ``holdout_macro_f1_min`` reads). ``--model champion`` is verified first, as
serving does (``pipelines.trust.attestation``): not the newest attested promotion, or files that differ
from the signed hashes, and nothing is evaluated; else the verified version's run is what is evaluated.
"""

from __future__ import annotations

import argparse

from pipelines.cli import Output, add_command
from pipelines.core.errors import LeukopsError


def register(sub: argparse._SubParsersAction) -> None:
    evaluate = add_command(
        sub, "evaluate", "evaluate a model on a source's accepted images (external validation)", _evaluate
    )
    evaluate.add_argument("--model", required=True, help="champion | previous | challenger | an MLflow run id")
    where = evaluate.add_mutually_exclusive_group(required=True)
    where.add_argument("--source", help="an ingested source, typically a holdout")
    where.add_argument(
        "--all-holdouts",
        action="store_true",
        help="every holdout source of the task; logs holdout.<source>.* metrics to the model's run",
    )
    evaluate.add_argument(
        "--task", help="the task whose alias --model names (default: the source's only task; required with an alias)"
    )


def _evaluate(args: argparse.Namespace) -> Output:
    from pipelines.core.settings import get_settings

    settings = get_settings()
    attestation = _verified_champion(settings, args) if args.model == "champion" else None
    if args.all_holdouts:
        return _all_holdouts(settings, args)
    from pipelines.model.holdout import evaluate_on_source

    result = evaluate_on_source(settings, args.model, args.source, task=args.task) | {"attestation": attestation}
    per_class = "\n".join(
        f"  {name:<14} recall {m['recall']:.3f}  precision {m['precision']:.3f}  n={m['support']}"
        for name, m in result["per_class"].items()
    )
    absent = f"\n{result['scoring']}" if result["scoring"] else ""  # a source labelling a subset of the classes
    low, high = result["f1_ci"]
    tta = f", TTA {'+'.join(result['tta'])}" if result["tta"] else ""
    text = (
        f"{result['model_uri']} on source {result['source']} ({result['n']} images, task {result['task']})\n"
        f"macro-F1 {result['macro_f1']:.3f} (95% CI {low:.3f}-{high:.3f}, {result['bootstrap']} bootstrap resamples)"
        f"  accuracy {result['accuracy']:.3f}\n"
        f"ECE {result['ece']:.4f} at temperature {result['temperature']:.3f}{tta}"
        f" (uncalibrated {result['ece_uncalibrated']:.4f})\n{per_class}{absent}"
    )
    return Output(result, text)


def _verified_champion(settings, args: argparse.Namespace) -> dict:
    """Verify @champion and pin ``args.model`` / ``args.task`` to its run, so the version verified is the one
    evaluated even if the alias moves meanwhile."""
    from pipelines.trust.attestation import verify_champion

    if not args.task:
        from pipelines.data.sources import load_source

        tasks = load_source(args.source, settings).tasks if args.source else ()
        if len(tasks) != 1:
            raise LeukopsError("--model champion names an alias of a task's registered model: pass --task")
        args.task = tasks[0]
    statement = verify_champion(settings, args.task)
    args.model = statement.run_id
    return statement.summary() | {"version": statement.version}


def _all_holdouts(settings, args: argparse.Namespace) -> Output:
    from pipelines.model.holdout import evaluate_run_on_holdouts, run_of

    run_id, task = run_of(settings, args.model, args.task)
    result = evaluate_run_on_holdouts(run_id, task, settings)
    lines = [f"run {run_id} on the holdout sources of {task}:"]
    for name, figures in result["sources"].items():
        low, high = figures["f1_ci"]
        lines.append(
            f"  {name:<20} macro-F1 {figures['macro_f1']:.3f} ({low:.3f}-{high:.3f})  ECE {figures['ece']:.4f}"
            f"  n={figures['n_images']}"
        )
    lines += [f"  {name:<20} skipped: {reason}" for name, reason in result["skipped"].items()]
    if not result["sources"] and not result["skipped"]:
        lines.append(f"  none registered (leukops source add --role holdout --task {task} ...)")
    return Output(result, "\n".join(lines))
