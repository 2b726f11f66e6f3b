"""Explanations of one training run: Grad-CAM localization, a LIME summary, the shortcut test, overlay grids.

``explain_images`` is the pure part (a model and a sample of images in, a report, metrics and PNG grids
out); ``explain_run`` picks a fixed, seeded, class-balanced sample of the run's test split and logs the
result to the run. The maps themselves are ``pipelines.trust.gradcam``'s and
``pipelines.trust.lime_explainer``'s.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from pipelines.core.errors import LeukopsError
from pipelines.io.layout import EXPLAIN_METRICS, explain_overlay_path, run_model_uri
from pipelines.trust.gradcam import gradcam, heat_overlay
from pipelines.trust.lime_explainer import LimeResult, classifier_fn, lime_explain

if TYPE_CHECKING:
    from pipelines.core.settings import Settings
    from pipelines.io.storage import ObjectStore

log = logging.getLogger(__name__)

OVERLAY_ROWS_PER_CLASS = 4


class ExplainError(LeukopsError, ValueError):
    """An explanation cannot be computed for these inputs (the message says why)."""


def overlay_grid(rows: Sequence[dict[str, np.ndarray]], title: str) -> bytes:
    """A PNG grid, one row per image, one column per panel (e.g. image | Grad-CAM | LIME views)."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    if not rows:
        raise ExplainError(f"overlay grid {title!r}: no rows")
    columns = list(dict.fromkeys(name for row in rows for name in row))
    fig = Figure(figsize=(2.2 * len(columns), 2.2 * len(rows) + 0.4))
    axes = fig.subplots(len(rows), len(columns), squeeze=False)
    for r, row in enumerate(rows):
        for c, name in enumerate(columns):
            ax = axes[r][c]
            ax.axis("off")
            if name in row:
                ax.imshow(row[name])
            if r == 0:
                ax.set_title(name.replace("_", " "), fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    return buf.getvalue()


def sample_split(frame: pd.DataFrame, classes: Sequence[str], samples: int, seed: int) -> pd.DataFrame:
    """A fixed, seeded, class-balanced sample of rows: each class shuffled, then taken round-robin."""
    rng = np.random.default_rng(seed)
    queues = []
    for label in classes:
        rows = frame[frame["label"] == label].sort_values("sha256")
        queues.append(rows.iloc[rng.permutation(len(rows))])
    order = sorted((rank, c) for c, q in enumerate(queues) for rank in range(len(q)))
    picked = [queues[c].iloc[rank] for rank, c in order[:samples]]
    return pd.DataFrame(picked).reset_index(drop=True)


def model_input_images(batch: torch.Tensor, preprocessing: dict) -> list[np.ndarray]:
    """The model's input tensors back as uint8 RGB (after ROI crop, corner mask and resize)."""
    mean = torch.tensor(preprocessing["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(preprocessing["std"]).view(1, 3, 1, 1)
    rgb = ((batch.cpu() * std + mean) * 255).round().clamp(0, 255).byte().permute(0, 2, 3, 1)
    return list(rgb.numpy())


@dataclass
class ImageExplanations:
    """Everything computed for one sample of images (pure result; ``explain_run`` logs it)."""

    report: dict
    overlays: dict[str, bytes]
    metrics: dict[str, float]


def explain_images(
    loaded: object,
    images: Sequence[np.ndarray],
    labels: Sequence[str],
    *,
    seed: int = 0,
    lime_images: int = 3,
    lime_samples: int = 1000,
    segmentation: str = "quickshift",
    shortcut_sample: tuple[Sequence[np.ndarray], Sequence[str]] | None = None,
) -> ImageExplanations:
    """Grad-CAM localization, a LIME summary, the shortcut test and overlay grids for one sample.

    The shortcut test (forward passes only) runs on ``shortcut_sample`` (images, labels) when given, a
    larger sample than Grad-CAM's so that its flip-rate bound is tight; else on the same images."""
    from pipelines.model.preprocess import to_tensor_batch
    from pipelines.trust.localization import flat_metrics
    from pipelines.trust.shortcut import shortcut_test

    classes = list(loaded.classes)
    unknown = sorted(set(labels) - set(classes))
    if unknown:
        raise ExplainError(f"labels {unknown} are not classes of the model ({', '.join(classes)})")
    batch = to_tensor_batch(list(images), loaded.preprocessing)
    inputs = model_input_images(batch, loaded.preprocessing)
    heat = gradcam(loaded, loaded.gradcam_layer, batch)
    cam_summary, segmentation_summary = _gradcam_localization(heat, inputs, labels)
    predict = classifier_fn(loaded.module, lambda imgs: to_tensor_batch(list(imgs), loaded.preprocessing))
    log.info("explain: Grad-CAM localization of %d images done", len(images))
    lime_picks = _one_per_class_first(labels, lime_images)
    lime_results = {}
    for done, i in enumerate(lime_picks, 1):  # LIME is the slow part on CPU: one progress line per image
        lime_results[i] = lime_explain(
            images[i], predict, num_samples=lime_samples, segmentation=segmentation, seed=seed, adaptive=True
        )
        log.info("explain: LIME %d/%d (%s, %d samples)", done, len(lime_picks), labels[i], lime_results[i].samples_used)
    lime = _lime_summary(images, lime_results, segmentation)
    shortcut_images, shortcut_labels = shortcut_sample or (images, labels)
    shortcut = shortcut_test(
        loaded.predict_proba, list(shortcut_images), [classes.index(lab) for lab in shortcut_labels], seed=seed
    )
    report = {
        "n_images": len(images),
        "gradcam": _headline(cam_summary["overall"]) | {"per_class": cam_summary["per_class"]},
        "lime": lime,
        "shortcut": shortcut.to_dict(),
        "segmentation": segmentation_summary,
    }
    metrics = flat_metrics(cam_summary["overall"], "gradcam_") | {
        "gradcam_n_images": float(len(images)),
        "shortcut_flip_rate": shortcut.flip_rate,
        "shortcut_flips": float(shortcut.flips),
        "shortcut_n_images": float(shortcut.n_images),
        "shortcut_flip_rate_upper": shortcut.flip_bounds()["flip_rate_upper"],
        "shortcut_f1_drop": shortcut.f1_drop,
    }
    if lime["nucleus_mass"] is not None:
        metrics["lime_nucleus_mass"] = lime["nucleus_mass"]
    overlays = _overlays(images, labels, inputs, heat, lime_results)
    return ImageExplanations(report, overlays, metrics)


def _gradcam_localization(heat: np.ndarray, inputs: list[np.ndarray], labels: Sequence[str]) -> tuple[dict, dict]:
    """Localization figures per class and overall (masks segmented on the model's input images)."""
    from pipelines.model.segmentation import foreground_mask, leukocyte_mask, nucleus_mask
    from pipelines.trust.localization import aggregate_reports, localization_report

    nuclei = [nucleus_mask(rgb) for rgb in inputs]
    foregrounds = [foreground_mask(rgb) for rgb in inputs]
    reports = [
        localization_report(h, n, f, cell_mask=leukocyte_mask(rgb, n, f))
        for h, n, f, rgb in zip(heat, nuclei, foregrounds, inputs, strict=True)
    ]
    segmentation_summary = {
        "nucleus_area_share": float(np.mean([n.mean() for n in nuclei])),
        "images_without_nucleus": int(sum(not n.any() for n in nuclei)),
    }
    return aggregate_reports(reports, list(labels)), segmentation_summary


def _one_per_class_first(labels: Sequence[str], n: int) -> list[int]:
    """Indices of up to n images, the first image of every class before any class's second."""
    seen: dict[str, int] = {}
    ranked = []
    for i, label in enumerate(labels):
        ranked.append((seen.get(label, 0), i))
        seen[label] = seen.get(label, 0) + 1
    return [i for _, i in sorted(ranked)[:n]]


def _headline(summary: dict) -> dict:
    return {
        "n": summary["n"],
        "nucleus_mass": summary["nucleus"]["mass"],
        "nucleus_enrichment": summary["nucleus"]["enrichment"],
        "cell_mass": summary["cell"]["mass"],
        "cell_enrichment": summary["cell"]["enrichment"],
        "pointing_game": summary["pointing_game"],
        "rank_accuracy": summary["rank_accuracy"],
        "artefact_mass": summary["artefact"]["mass"],
        "artefact_enrichment": summary["artefact"]["enrichment"],
        "corner_mass": summary["corner"]["mass"],
        "corner_enrichment": summary["corner"]["enrichment"],
        "other_corners_enrichment": summary["other_corners"]["enrichment"],
    }


def _lime_summary(images: Sequence[np.ndarray], results: dict[int, LimeResult], segmentation: str) -> dict:
    from pipelines.model.segmentation import nucleus_mask
    from pipelines.trust.localization import region_score

    masses = [region_score(r.heatmap(), nucleus_mask(images[i]))["mass"] for i, r in results.items()]
    present = [m for m in masses if m is not None]
    return {
        "n": len(results),
        "segmentation": segmentation,
        "nucleus_mass": float(np.mean(present)) if present else None,
        "samples_mean": float(np.mean([r.samples_used for r in results.values()])) if results else None,
    }


def _overlays(
    images: Sequence[np.ndarray],
    labels: Sequence[str],
    inputs: list[np.ndarray],
    heat: np.ndarray,
    lime_results: dict[int, LimeResult],
) -> dict[str, bytes]:
    """One PNG per class: model input | Grad-CAM | the three LIME views (where LIME ran)."""
    grids = {}
    for label in dict.fromkeys(labels):
        rows = []
        for i in [i for i, lab in enumerate(labels) if lab == label][:OVERLAY_ROWS_PER_CLASS]:
            row = {"image": inputs[i], "grad-cam": heat_overlay(inputs[i], heat[i])}
            if i in lime_results:
                row |= {f"lime {k}": v for k, v in lime_results[i].views().items()}
            rows.append(row)
        grids[label] = overlay_grid(rows, f"class {label}")
    return grids


def explain_run(
    run_id: str, samples: int = 32, seed: int = 0, *, lime_images: int = 3, settings: Settings | None = None
) -> dict:
    """Explain a training run's model on a fixed, seeded sample of its snapshot's test split; log the
    report, one overlay grid per class (paths from ``pipelines.io.layout``) and the metrics to the run."""
    from pipelines.core.settings import get_settings
    from pipelines.data.imagefacts import decode_image
    from pipelines.io.storage import ObjectStore
    from pipelines.io.tracking import log_to_run, run_tags
    from pipelines.model.bundle import load_model

    if samples < 2:
        raise ExplainError(f"--samples must be at least 2 (the shortcut swap needs two classes), got {samples}")
    settings = settings or get_settings()
    tags = run_tags(settings, run_id)
    if "dataset_version" not in tags or "task" not in tags:
        raise ExplainError(f"MLflow run {run_id!r} has no task/dataset_version tags: not a training run")
    loaded = load_model(run_model_uri(run_id), settings=settings)
    store = ObjectStore.from_settings(settings)
    dataset_version, picked = _test_sample(store, tags["task"], tags["dataset_version"], loaded.classes, samples, seed)
    images = [decode_image(store.get_bytes(key)).rgb for key in picked["key"]]
    shortcut_rows = _shortcut_rows(store, tags["task"], dataset_version, loaded.classes, settings, seed)
    shortcut_images = [decode_image(store.get_bytes(key)).rgb for key in shortcut_rows["key"]]
    result = explain_images(
        loaded,
        images,
        list(picked["label"]),
        seed=seed,
        lime_images=lime_images,
        shortcut_sample=(shortcut_images, list(shortcut_rows["label"])),
    )
    report = result.report | {
        "run_id": run_id,
        "task": tags["task"],
        "dataset_version": dataset_version,
        "seed": seed,
        "sha256": list(picked["sha256"]),
        "shortcut_sha256": list(shortcut_rows["sha256"]),
    }
    artifacts = _run_artifacts(report, result.overlays)
    log_to_run(settings, run_id, result.metrics, artifacts)
    return report | {"artifacts": sorted(artifacts)}


def _test_sample(
    store: ObjectStore, task: str, version: str, classes: Sequence[str], samples: int, seed: int
) -> tuple[str, pd.DataFrame]:
    """The snapshot's resolved version and the sample of its test split (two classes at least)."""
    from pipelines.data.snapshot import load_snapshot

    snapshot = load_snapshot(store, task, version)
    test = snapshot.frame[snapshot.frame["split"] == "test"]
    if test.empty:
        raise ExplainError(f"snapshot {task}@{snapshot.version} has no test images")
    picked = sample_split(test, classes, samples, seed)
    if picked["label"].nunique() < 2:
        raise ExplainError(
            f"the test split of {task}@{snapshot.version} holds one class only in the sample of "
            f"{len(picked)}: the shortcut swap needs two (raise --samples or add test images)"
        )
    return snapshot.version, picked


def _shortcut_rows(
    store: ObjectStore, task: str, version: str, classes: Sequence[str], settings: Settings, seed: int
) -> pd.DataFrame:
    """The shortcut test's sample: min(|test split|, gate.shortcut_images) test rows, class-balanced."""
    _, rows = _test_sample(store, task, version, classes, settings.gate.shortcut_images, seed)
    return rows


def _run_artifacts(report: dict, overlays: dict[str, bytes]) -> dict[str, bytes]:
    """The run artifacts of one explanation: the JSON report and one overlay grid per class."""
    artifacts = {EXPLAIN_METRICS: json.dumps(report, indent=2, default=float).encode()}
    return artifacts | {explain_overlay_path(label): png for label, png in overlays.items()}
