"""Stain robustness benchmark: a PBC-only model, with and without stain augmentation / normalisation,
scored on another lab (CellaVision).

Each variant trains exactly what ``leukops train --task wbc --stain-augment A --stain-normalize N`` trains
(`candidate_spec` and `train_config` from ``settings.retrain``, then `build_run` + `fit_prepared`; only the
time budget is the benchmark's) on the shared PBC images read from the folder (no S3/MLflow), split by a
hash of the file name as the snapshot does. The temperature is fitted on val as in `train_prepared`; the
model is then wrapped as a `LoadedModel` with its bundle (so the CellaVision images go through the
bundle's preprocessing, the stain normaliser included, exactly as evaluate and serving do).

CellaVision (``../shared/data/wbc_seg_cellavision``, 100 images) has 5 of the 8 PBC classes; its folder
names are the `wbc` task's class names (SOURCE.md), so no mapping is needed. Its macro-F1 averages the 5
classes it has; a prediction into an absent class (erythroblast, ig, platelet) counts as an error.

Printed per variant: PBC test macro-F1 and CellaVision macro-F1, each with its bootstrap 95 % CI; the
paired bootstrap difference to the baseline on CellaVision, the ratio variant / baseline, and the wall time.

    .venv/bin/python benchmarks/stain.py --budget-min 10
    .venv/bin/python benchmarks/stain.py --quick          # smoke test: a few images, one epoch
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.core.settings import get_settings
from pipelines.core.taxonomy import get_task
from pipelines.data.imagefacts import decode_image
from pipelines.data.snapshot import hash_split
from pipelines.model.bundle import LoadedModel, ModelBundle
from pipelines.model.calibration import fit_calibration
from pipelines.model.candidate import build_run, candidate_spec, fit_prepared, train_config
from pipelines.model.devices import pick_device
from pipelines.model.predict import loader_logits
from pipelines.trust.statistics import bootstrap_macro_f1

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
PBC, CELLAVISION = SHARED / "pbc", SHARED / "wbc_seg_cellavision"
TASK = "wbc"
CLASSES = get_task(TASK).classes
# name: (stain augmentation, stain normaliser)
VARIANTS = {
    "baseline": ("none", "none"),
    "hed": ("hed", "none"),
    "reinhard": ("none", "reinhard"),
    "macenko": ("none", "macenko"),
    "hed+reinhard": ("hed", "reinhard"),
}


def pbc_frame(per_class: int | None) -> pd.DataFrame:
    """One row per PBC image (the first ``per_class`` of each class when given), hash-split 80/10/10."""
    rows = []
    for label in CLASSES:
        for path in sorted((PBC / label).glob("*.jpg"))[:per_class]:
            rows.append({"path": path, "label": label, "split": hash_split(path.name)})
    return pd.DataFrame(rows)


def quick_frame(per_split: int = 2) -> pd.DataFrame:
    """A smoke-test frame: ``per_split`` images of each class in each split."""
    rows = []
    for label in CLASSES:
        files = sorted((PBC / label).glob("*.jpg"))[: 3 * per_split]
        splits = ["train", "val", "test"] * per_split
        rows += [{"path": f, "label": label, "split": s} for f, s in zip(files, splits, strict=True)]
    return pd.DataFrame(rows)


def cellavision_images(per_class: int | None) -> tuple[list[np.ndarray], np.ndarray]:
    """The other lab's images (RGB) and their class indices in the task's class list."""
    images, labels = [], []
    for folder in sorted(p for p in CELLAVISION.iterdir() if p.is_dir()):
        for path in sorted(folder.glob("*.bmp"))[:per_class]:
            images.append(decode_image(path.read_bytes()).rgb)
            labels.append(CLASSES.index(folder.name))
    return images, np.asarray(labels)


def scored(truth: np.ndarray, predicted: np.ndarray, baseline: np.ndarray | None = None) -> dict:
    """Macro-F1 over the classes ``truth`` has, with its bootstrap CI (and the paired one vs baseline)."""
    f1 = bootstrap_macro_f1(truth, predicted, len(CLASSES))
    out = {"macro_f1": round(f1.point, 4), "ci": [round(v, 4) for v in f1.interval], "n": len(truth)}
    if baseline is not None:
        diff = bootstrap_macro_f1(truth, predicted, len(CLASSES), baseline=baseline)
        out["vs_baseline"] = {"diff": round(diff.point, 4), "ci": [round(v, 4) for v in diff.interval]}
    return out


def run_variant(name: str, frame: pd.DataFrame, args: argparse.Namespace, other_lab: list[np.ndarray]) -> dict:
    """Train one variant through the product's path; its PBC-test and CellaVision predictions."""
    augment, normalize = VARIANTS[name]
    retrain = get_settings().retrain
    spec = candidate_spec(
        retrain,
        TASK,
        args.backbone,
        image_size=args.image_size,
        stain_augment=augment,
        stain_strength=args.stain_strength,
        stain_normalize=normalize,
    )
    config = train_config(retrain, time_budget_min=args.budget_min, epochs=args.epochs)
    started = time.monotonic()
    run = build_run(spec, config, frame, "benchmark", str(PBC))
    result = fit_prepared(run)
    device = pick_device(spec.device)
    calibration = fit_calibration(run.backbone.model, run.loaders["val"], device, spec.tta)
    truth, logits = loader_logits(run.backbone.model, run.loaders["test"], device, calibration.inference.tta)
    bundle = ModelBundle.for_backbone(TASK, CLASSES, run.backbone, run.preprocessing, calibration.inference)
    model = LoadedModel(run.backbone, bundle, device=device)
    return {
        "pbc_truth": truth,
        "pbc_pred": logits.argmax(1),
        "cv_pred": model.predict_proba(other_lab).argmax(1),
        "epochs": len(result.history),
        "stop_reason": result.stop_reason,
        "wall_s": round(time.monotonic() - started, 1),
        "stain_normalizer": run.preprocessing.get("stain_normalizer"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-min", type=float, default=10.0, help="training + validation minutes per variant")
    parser.add_argument("--quick", action="store_true", help="smoke test: 6 images a class, 1 epoch, 32 px")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {list(VARIANTS)}")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--image-size", type=int, help="input side (default: settings.retrain.image_size)")
    parser.add_argument("--epochs", type=int, help="most epochs (default: settings.retrain.epochs)")
    parser.add_argument("--stain-strength", type=float, help="HED sigma (default: settings.retrain.stain_strength)")
    parser.add_argument("--json-out", type=Path, help="also write the figures here")
    args = parser.parse_args()
    names = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown or not names:
        parser.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    if args.quick:
        args.epochs, args.image_size, args.budget_min = 1, args.image_size or 32, None
    frame = quick_frame() if args.quick else pbc_frame(None)
    other_lab, other_truth = cellavision_images(2 if args.quick else None)
    print(
        f"PBC {len(frame)} images, split {frame['split'].value_counts().to_dict()}; CellaVision {len(other_truth)} "
        f"images, classes {sorted({CLASSES[i] for i in other_truth})}; variants {names}; "
        f"load average {os.getloadavg()}",
        flush=True,
    )
    report, baseline_pred = {}, None
    for name in names:
        out = run_variant(name, frame, args, other_lab)
        if name == "baseline":
            baseline_pred = out["cv_pred"]
        cv = scored(other_truth, out["cv_pred"], baseline_pred if name != "baseline" else None)
        report[name] = {
            "pbc_test": scored(out["pbc_truth"], out["pbc_pred"]),
            "cellavision": cv,
            **{k: out[k] for k in ("epochs", "stop_reason", "wall_s", "stain_normalizer")},
        }
        print(describe(name, report[name], report.get("baseline")), flush=True)
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=2))


def describe(name: str, figures: dict, baseline: dict | None) -> str:
    pbc, cv = figures["pbc_test"], figures["cellavision"]
    line = (
        f"{name}: PBC test macro-F1 {pbc['macro_f1']:.3f} (95% CI {pbc['ci'][0]:.3f}-{pbc['ci'][1]:.3f}, "
        f"n={pbc['n']})  CellaVision macro-F1 {cv['macro_f1']:.3f} (95% CI {cv['ci'][0]:.3f}-{cv['ci'][1]:.3f}, "
        f"n={cv['n']})  {figures['epochs']} epochs ({figures['stop_reason']}) in {figures['wall_s']:.0f} s"
    )
    if baseline is not None and "vs_baseline" in cv:
        base = baseline["cellavision"]["macro_f1"]
        ratio = cv["macro_f1"] / base if base > 0 else float("nan")
        diff = cv["vs_baseline"]
        line += (
            f"\n  vs baseline on CellaVision: {diff['diff']:+.3f} (paired 95% CI {diff['ci'][0]:+.3f} to "
            f"{diff['ci'][1]:+.3f}), ratio {ratio:.3f}"
        )
    return line


if __name__ == "__main__":
    main()
