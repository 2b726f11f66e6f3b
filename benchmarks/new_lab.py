"""A new lab joins: the drift → label → retrain loop under the scheduler (``--loop``), and how many labels
the new lab needs (``--labels``).

**The loop** (``--loop``; `pipelines.devstack.new_lab`): a private stack with Airflow (CeleryExecutor) on top,
configured by a copy of ``leukops.yaml`` whose nightly grid trains the ``wbc`` task (one cell, ``--budget-min``
per candidate; every gate threshold as shipped). PBC is ingested and a REST-triggered retrain makes its model
``@champion``; CellaVision is registered with split shares 50/10/40 (``leukops source add --split 50/10/40``:
~40 test images, enough for the per-site checks) and ingested; a REST-triggered drift run must find drift
with new labels and emit the retrain request, and the retrain the scheduler starts from that event must
promote a model trained on both labs (wbc's recipe: fine-tuned from that champion). Printed: the wall time
of each stage, the drift verdict, the gate's per-site checks and the per-site table (the new champion vs the
old one on the same test images).

    .venv/bin/python benchmarks/new_lab.py --loop --budget-min 10 [--cold-start]

**The label-count curve** (``--labels``):

A model trained on PBC only (one lab) meets CellaVision (another lab, 5 of the 8 ``wbc`` classes). The
CellaVision images are split once, stratified with a fixed seed, into a **test split** (never labelled,
never ranked) and a **label pool**. For each label count k and each strategy, k pool images are labelled:

* ``random``: a stratified random draw (fixed seed; each class its share of the pool, largest remainders);
* ``suggested``: the first k of `pipelines.model.suggest.rank_for_labelling` (entropy + farthest-first
  over the PBC model's embeddings), which is what ``leukops suggest-labels`` puts in the lab's CSV.

The PBC model is then fine-tuned (its weights as the start, the product's recipe and budget) on PBC's train
split + the k images, two sources, so the product's site-balanced draw (``retrain.site_balance``) keeps the
new lab from drowning among 1,280 PBC images. k = 0 is the PBC model itself. Every training is the product's
fit path (`candidate_spec`, `train_config`, `build_run`, `fit_prepared`, as ``benchmarks/train.py``), the
temperature is fitted on PBC's val split, and the figures come through the one predict function. Printed
per k and strategy: CellaVision test macro-F1 (bootstrap 95% CI; averaged over the classes CellaVision has,
predictions into the other three count as errors) and PBC test macro-F1; then suggested − random at each k
(paired bootstrap on the same test images). At k = the pool size both strategies label the whole pool.

    .venv/bin/python benchmarks/new_lab.py --labels 0,10,25,50 --budget-min 5
    .venv/bin/python benchmarks/new_lab.py --quick          # a smoke test: tiny images, seconds of training
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from pipelines.core.settings import get_settings
from pipelines.core.taxonomy import get_task
from pipelines.data.imagefacts import decode_image
from pipelines.data.snapshot import hash_split
from pipelines.model.bundle import LoadedModel, ModelBundle
from pipelines.model.calibration import fit_calibration
from pipelines.model.candidate import build_run, candidate_spec, fit_prepared, train_config
from pipelines.model.devices import pick_device
from pipelines.model.evaluate import evaluate_predictions
from pipelines.model.suggest import model_scores, rank_for_labelling
from pipelines.trust.statistics import bootstrap_macro_f1

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PBC, NEW_LAB = DATA / "pbc", DATA / "wbc_seg_cellavision"
TASK = "wbc"
CLASSES = get_task(TASK).classes
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}
STRATEGIES = ("random", "suggested")


def folder_frame(root: Path, every: int = 1) -> pd.DataFrame:
    """path, label: every ``every``-th image of each class folder of the task that ``root`` has."""
    rows = [
        {"path": path, "label": label}
        for label in CLASSES
        if (root / label).is_dir()
        for path in sorted(p for p in (root / label).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[::every]
    ]
    return pd.DataFrame(rows)


def pbc_frame(every: int) -> pd.DataFrame:
    """PBC with the snapshot's deterministic 80/10/10 hash split (no groups: one crop per cell)."""
    frame = folder_frame(PBC, every)
    return frame.assign(split=[hash_split(p.name) for p in frame["path"]])


def test_and_pool(frame: pd.DataFrame, test_share: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The new lab's fixed test split and the disjoint pool labels are drawn from, stratified by class."""
    test, pool = train_test_split(frame, train_size=test_share, stratify=frame["label"], random_state=seed)
    return test.reset_index(drop=True), pool.reset_index(drop=True)


def stratified_draw(labels: pd.Series, k: int, seed: int) -> list[int]:
    """k row numbers, each class its share of ``labels`` (largest remainders), random within a class.
    Written out because sklearn's stratified splits refuse k below the class count or a 1-image class."""
    k = min(k, len(labels))
    counts = labels.value_counts().sort_index()
    exact = counts / counts.sum() * k
    quota = np.floor(exact).astype(int)
    quota[(exact - quota).sort_values(ascending=False, kind="stable").index[: k - quota.sum()]] += 1
    rng = np.random.default_rng(seed)
    chosen = [rng.choice(np.flatnonzero(labels == label), size=n, replace=False) for label, n in quota.items()]
    return sorted(int(i) for i in np.concatenate(chosen))


def decoded(paths: pd.Series) -> list[np.ndarray]:
    return [decode_image(Path(p).read_bytes()).rgb for p in paths]


def fitted_model(run, device) -> LoadedModel:
    """The run's trained module as a loaded model: the temperature fitted on PBC val, the spec's TTA."""
    fit_prepared(run)
    inference = fit_calibration(run.backbone.model, run.loaders["val"], device, run.spec.tta).inference
    bundle = ModelBundle.for_backbone(TASK, CLASSES, run.backbone, run.preprocessing, inference)
    run.backbone.model.eval()
    return LoadedModel(run.backbone, bundle, device=device)


def figures(model: LoadedModel, rgbs: list[np.ndarray], labels: pd.Series) -> dict:
    probs, _ = model_scores(model, rgbs)
    result = evaluate_predictions(list(labels), probs, CLASSES)
    recall = {name: round(scores.recall, 2) for name, scores in result.per_class.items() if scores.support}
    predicted = [CLASSES[i] for i in probs.argmax(1)]
    errors = Counter(f"{true}->{pred}" for true, pred in zip(labels, predicted, strict=True) if true != pred)
    return {
        "macro_f1": result.macro_f1,
        "ci": (result.f1_ci_low, result.f1_ci_high),
        "recall": recall,
        "predicted_absent": result.predicted_absent,
        "errors": dict(errors.most_common()),
        "pred": probs.argmax(1),
    }


def training_frame(pbc: pd.DataFrame, lab_rows: pd.DataFrame) -> pd.DataFrame:
    """PBC + the labelled new-lab images in train, each row naming its source (the site-balanced draw)."""
    added = lab_rows[["path", "label"]].assign(split="train", source="new-lab")
    return pd.concat([pbc.assign(source="pbc"), added], ignore_index=True)


def describe(k: int, strategy: str, lab: dict, pbc: dict, wall_s: float) -> str:
    low, high = lab["ci"]
    return (
        f"k={k:<3} {strategy:<9}  new-lab macro-F1 {lab['macro_f1']:.3f} (95% CI {low:.3f}-{high:.3f})"
        f"  PBC test macro-F1 {pbc['macro_f1']:.3f}  ({wall_s:.0f} s)\n"
        f"      new-lab recall {lab['recall']}, {lab['predicted_absent']} predicted into absent classes\n"
        f"      new-lab errors {lab['errors']}"
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loop", action="store_true", help="the drift → label → retrain loop under the scheduler")
    parser.add_argument("--cold-start", action="store_true", help="--loop: retrain from ImageNet, not the champion")
    parser.add_argument("--labels", default="0,10,25,50", help="label counts k, comma-separated")
    parser.add_argument("--strategy", default=",".join(STRATEGIES), help="random,suggested (either or both)")
    parser.add_argument("--budget-min", type=float, default=5.0, help="time budget of each training")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--augment", help="default: settings.retrain.augmentations[0]")
    parser.add_argument("--image-size", type=int, help="default: settings.retrain.image_size")
    parser.add_argument("--cell-crop", type=float, help="cell-centred crop scale (default: settings)")
    parser.add_argument("--stain-augment", help="none | hed (default: settings)")
    parser.add_argument("--stain-normalize", help="none | macenko | reinhard (default: settings)")
    parser.add_argument("--site-balance", type=float, help="training draw weight n_site^-x (default: settings)")
    parser.add_argument("--epochs", type=int, help="most epochs of each training (default: settings)")
    parser.add_argument("--test-share", type=float, default=0.5, help="the new lab's share held out for test")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--every", type=int, default=1, help="every N-th PBC image of each class")
    parser.add_argument("--quick", action="store_true", help="smoke test: every 25th PBC image, 64 px, 1 epoch")
    parser.add_argument("--json-out", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if args.quick:
        args.every, args.image_size, args.epochs, args.budget_min = 25, args.image_size or 64, 1, 0.2
    args.labels = [int(k) for k in args.labels.split(",")]
    args.strategy = [s for s in args.strategy.split(",") if s]
    unknown = set(args.strategy) - set(STRATEGIES)
    if unknown:
        parser.error(f"unknown strategies {sorted(unknown)}; choose from {', '.join(STRATEGIES)}")
    return args


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.loop:
        from new_lab_loop import run

        logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per REST poll otherwise

        return run(args.budget_min, args.cold_start, args.json_out)
    retrain = get_settings().retrain
    spec = candidate_spec(
        retrain,
        TASK,
        args.backbone,
        augment=args.augment,
        image_size=args.image_size,
        cell_crop=args.cell_crop,
        stain_augment=args.stain_augment,
        stain_normalize=args.stain_normalize,
        site_balance=args.site_balance,
    )
    config = train_config(retrain, time_budget_min=args.budget_min, seed=args.seed)
    config = replace(config, epochs=args.epochs) if args.epochs else config
    device = pick_device(spec.device)
    pbc = pbc_frame(args.every)
    test, pool = test_and_pool(folder_frame(NEW_LAB), args.test_share, args.seed)
    test_rgbs, pool_rgbs = decoded(test["path"]), decoded(pool["path"])
    pbc_test = pbc[pbc["split"] == "test"]
    pbc_test_rgbs = decoded(pbc_test["path"])
    print(
        f"PBC {len(pbc)} images {pbc['split'].value_counts().to_dict()}; new lab test {len(test)} "
        f"{test['label'].value_counts().to_dict()}, pool {len(pool)}; {spec.backbone} {spec.image_size} px, "
        f"augment {spec.augment}, stain {spec.stain_augment}/{spec.stain_normalize}, cell crop {spec.cell_crop}, "
        f"site balance {spec.site_balance}, budget {args.budget_min} min per training, device {device}",
        flush=True,
    )
    started = time.monotonic()
    base = fitted_model(build_run(spec, config, pbc, "pbc", str(PBC)), device)
    base_state = {k: v.detach().clone() for k, v in base.module.state_dict().items()}
    rows = [{"k": 0, "strategy": "none", "lab": figures(base, test_rgbs, test["label"])}]
    rows[0]["pbc"] = figures(base, pbc_test_rgbs, pbc_test["label"])
    print(describe(0, "none", rows[0]["lab"], rows[0]["pbc"], time.monotonic() - started), flush=True)
    pool_probs, pool_embeddings = model_scores(base, pool_rgbs)
    for k in (k for k in args.labels if k > 0):
        for strategy in args.strategy:
            if strategy == "random":
                chosen = stratified_draw(pool["label"], k, args.seed)
            else:
                chosen = [p.index for p in rank_for_labelling(pool_probs, pool_embeddings, k, args.seed)]
            started = time.monotonic()
            run = build_run(spec, config, training_frame(pbc, pool.iloc[chosen]), f"k{k}", "")
            run.backbone.model.load_state_dict(base_state)  # fine-tune the PBC model, not ImageNet's
            model = fitted_model(run, device)
            row = {"k": k, "strategy": strategy, "labelled": pool.iloc[chosen]["label"].value_counts().to_dict()}
            row |= {
                "lab": figures(model, test_rgbs, test["label"]),
                "pbc": figures(model, pbc_test_rgbs, pbc_test["label"]),
            }
            rows.append(row)
            print(
                describe(k, strategy, row["lab"], row["pbc"], time.monotonic() - started),
                f"labelled {row['labelled']}",
                flush=True,
            )
    truth = np.asarray([CLASSES.index(label) for label in test["label"]])
    by_key = {(r["k"], r["strategy"]): r for r in rows}
    for k in (k for k in args.labels if (k, "random") in by_key and (k, "suggested") in by_key):
        diff = bootstrap_macro_f1(
            truth, by_key[k, "suggested"]["lab"]["pred"], len(CLASSES), baseline=by_key[k, "random"]["lab"]["pred"]
        )
        print(
            f"k={k}: suggested - random new-lab macro-F1 {diff.point:+.3f} "
            f"(paired bootstrap 95% CI {diff.interval[0]:+.3f} to {diff.interval[1]:+.3f}, n={diff.n})"
        )
    if args.json_out:
        for row in rows:
            for side in ("lab", "pbc"):
                row[side] = {key: value for key, value in row[side].items() if key != "pred"}
        args.json_out.write_text(json.dumps(rows, indent=2, default=str))


if __name__ == "__main__":
    main()
