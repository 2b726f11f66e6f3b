"""Explanations of a trained classifier: Grad-CAM (captum), LIME (lime), their views and overlay grids.

Grad-CAM is captum's ``LayerGradCam`` on the backbone's Grad-CAM layer (chosen once by the backbone
factory), ReLU on, upsampled to the input. LIME is the ``lime`` package's explainer (its kernel, ridge fit
and ``ImageExplanation``) with a fast neighbourhood: the perturbed images are built vectorised (same
random rows as ``lime``), scored by a batched, no-grad, channels-last classifier, and optionally stopped
early once the top superpixels are stable across successive sample chunks.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import sklearn.metrics
import torch
from captum.attr import LayerAttribution, LayerGradCam
from lime import lime_image
from lime.wrappers.scikit_image import SegmentationAlgorithm
from skimage.segmentation import mark_boundaries

from pipelines.core.errors import LeukopsError

if TYPE_CHECKING:
    from pipelines.core.settings import Settings

ClassifierFn = Callable[[Sequence[np.ndarray]], np.ndarray]
ToTensor = Callable[[Sequence[np.ndarray]], torch.Tensor]
SEGMENTERS = ("quickshift", "slic")
LIME_VIEWS = ("positive_hide_rest", "positive", "positive_negative")
PERTURB_BATCH = 128  # neighbourhood images materialised at once: 128 x 224 x 224 x 3 bytes = 19 MB


class ExplainError(LeukopsError, ValueError):
    """An explanation cannot be computed for these inputs (the message says why)."""


def _module_of(loaded_or_module: object) -> torch.nn.Module:
    return loaded_or_module.module if hasattr(loaded_or_module, "module") else loaded_or_module


@contextlib.contextmanager
def _without_inplace(module: torch.nn.Module) -> Iterator[None]:
    """In-place activations after the hooked layer would overwrite the activation Grad-CAM needs."""
    switched = [m for m in module.modules() if getattr(m, "inplace", False) is True]
    for m in switched:
        m.inplace = False
    try:
        yield
    finally:
        for m in switched:
            m.inplace = True


def gradcam(
    loaded_or_module: object,
    gradcam_layer: torch.nn.Module,
    batch_tensor: torch.Tensor,
    target: int | Sequence[int] | torch.Tensor | None = None,
    chunk: int = 16,
) -> np.ndarray:
    """Grad-CAM maps (N x H x W, >= 0) at the input resolution; target = predicted class by default."""
    module = _module_of(loaded_or_module).eval()
    device = next(module.parameters()).device
    cam = LayerGradCam(module, gradcam_layer)
    maps = []
    with _without_inplace(module):
        for start in range(0, batch_tensor.shape[0], chunk):
            x = batch_tensor[start : start + chunk].to(device)
            tgt = _targets(module, x, target, start)
            attr = cam.attribute(x, target=tgt, relu_attributions=True)
            up = LayerAttribution.interpolate(attr, tuple(x.shape[-2:]), interpolate_mode="bilinear")
            maps.append(up.detach().sum(dim=1).clamp_min(0).cpu().numpy())
    return np.concatenate(maps).astype(np.float32)


def _targets(module: torch.nn.Module, x: torch.Tensor, target: object, start: int) -> torch.Tensor:
    if target is None:
        with torch.no_grad():
            return module(x).argmax(dim=1)
    if isinstance(target, int):
        return torch.full((x.shape[0],), target, dtype=torch.long, device=x.device)
    return torch.as_tensor(target, device=x.device)[start : start + x.shape[0]].long()


def fast_module(module: torch.nn.Module) -> torch.nn.Module:
    """An eval-mode, channels-last copy for inference (NHWC convolutions are faster on CPU and GPU)."""
    return copy.deepcopy(module).eval().to(memory_format=torch.channels_last)


def classifier_fn(
    module: torch.nn.Module, to_tensor: ToTensor, *, batch_size: int = 64, bf16: bool = False
) -> ClassifierFn:
    """LIME's ``classifier_fn``: RGB images (array N x H x W x 3, or a list) -> softmax probabilities,
    batched, no grad, on the module's device.

    ``bf16`` runs the forward under bfloat16 autocast (fast on CPUs with AVX512-BF16/AMX and on GPUs);
    leave it off where probabilities must match fp32 closely.
    """
    fast = fast_module(module)
    device = next(fast.parameters()).device
    dtype = torch.bfloat16 if bf16 else torch.float32

    def predict(images: Sequence[np.ndarray]) -> np.ndarray:
        out = []
        for start in range(0, len(images), batch_size):
            x = to_tensor(list(images[start : start + batch_size])).to(device)
            x = x.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=bf16):
                out.append(torch.softmax(fast(x).float(), dim=1).cpu().numpy())
        return np.concatenate(out)

    return predict


def segmenter(kind: str = "quickshift", seed: int = 0, **params: float) -> SegmentationAlgorithm:
    """Superpixels: quickshift with LIME's defaults, or SLIC (``n_segments``, ``compactness``)."""
    defaults = {
        "quickshift": {"kernel_size": 4, "max_dist": 200, "ratio": 0.2, "random_seed": seed},
        "slic": {"n_segments": 50, "compactness": 10, "start_label": 0},
    }
    if kind not in defaults:
        raise ExplainError(f"unknown superpixel algorithm {kind!r}; use one of {', '.join(SEGMENTERS)}")
    return SegmentationAlgorithm(kind, **(defaults[kind] | params))


def mean_colour_image(image: np.ndarray, segments: np.ndarray) -> np.ndarray:
    """LIME's default "hidden" image: every superpixel painted its mean colour."""
    n = int(segments.max()) + 1
    flat = segments.ravel()
    counts = np.bincount(flat, minlength=n).clip(min=1)
    means = np.stack([np.bincount(flat, image[..., c].ravel(), n) / counts for c in range(3)], axis=1)
    return means[segments].astype(image.dtype)


def perturb(image: np.ndarray, hidden: np.ndarray, segments: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The images of a LIME neighbourhood: superpixel ``j`` of row ``i`` kept where ``rows[i, j]`` is 1."""
    keep = rows[:, segments].astype(bool)[..., None]
    return np.where(keep, image[None], hidden[None])


@dataclass
class LimeResult:
    """A LIME explanation of one image for one class, with the number of samples it took."""

    explanation: lime_image.ImageExplanation
    label: int
    samples_used: int

    @property
    def segments(self) -> np.ndarray:
        return self.explanation.segments

    def weights(self) -> dict[int, float]:
        return dict(self.explanation.local_exp[self.label])

    def top_superpixels(self, k: int = 5) -> list[int]:
        """The k superpixels with the largest weight for the label (most supporting first)."""
        ranked = sorted(self.weights().items(), key=lambda kv: -kv[1])
        return [int(seg) for seg, _ in ranked[:k]]

    def heatmap(self) -> np.ndarray:
        """Per-pixel positive weight (the superpixel's weight, clipped at 0), for mass metrics."""
        lookup = np.zeros(int(self.segments.max()) + 1, dtype=np.float32)
        for seg, w in self.weights().items():
            lookup[seg] = max(w, 0.0)
        return lookup[self.segments]

    def views(self, num_features: int = 5) -> dict[str, np.ndarray]:
        """The paper's three views as uint8 RGB: positive only + hide rest, positive only, pos and neg."""
        options = {
            "positive_hide_rest": {"positive_only": True, "hide_rest": True},
            "positive": {"positive_only": True, "hide_rest": False},
            "positive_negative": {"positive_only": False, "hide_rest": False},
        }
        out = {}
        for name, kw in options.items():
            img, mask = self.explanation.get_image_and_mask(self.label, num_features=num_features, **kw)
            marked = mark_boundaries(img.astype(np.float64) / 255.0, mask)
            out[name] = (np.clip(marked, 0, 1) * 255).astype(np.uint8)
        return out


def lime_explain(
    image: np.ndarray,
    predict: ClassifierFn,
    *,
    num_samples: int = 1000,
    segmentation: str = "quickshift",
    seed: int = 0,
    label: int | None = None,
    adaptive: bool = False,
    chunk: int = 100,
    top_k: int = 5,
) -> LimeResult:
    """LIME for one RGB uint8 image with the ``lime`` package's sampling, kernel and ridge fit.

    Without ``adaptive`` this is ``LimeImageExplainer.explain_instance`` (same random rows, same
    segmentation, same fit) with a vectorised neighbourhood. With ``adaptive`` the neighbourhood grows
    by ``chunk`` samples until the set of top-k superpixels has stayed the same over two successive
    chunks (or ``num_samples`` is reached).
    """
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ExplainError(f"LIME needs an H x W x 3 image, got shape {image.shape}")
    explainer = lime_image.LimeImageExplainer(random_state=seed)
    segments = segmenter(segmentation, seed)(image)
    hidden = mean_colour_image(image, segments)
    n_features = int(np.unique(segments).shape[0])
    rows, probs, previous, stable = [], [], None, 0
    step = chunk if adaptive else num_samples
    while sum(len(r) for r in rows) < num_samples:
        size = min(step, num_samples - sum(len(r) for r in rows))
        block = explainer.random_state.randint(0, 2, size * n_features).reshape((size, n_features))
        if not rows:
            block[0, :] = 1
        rows.append(block)
        probs.append(_score(predict, image, hidden, segments, block))
        result = _fit(explainer, image, segments, np.concatenate(rows), np.concatenate(probs), label)
        top = set(result.top_superpixels(top_k))
        stable = stable + 1 if top == previous else 0
        previous = top
        if adaptive and stable >= 2:
            break
    return result


def _score(
    predict: ClassifierFn, image: np.ndarray, hidden: np.ndarray, segments: np.ndarray, rows: np.ndarray
) -> np.ndarray:
    """Class probabilities of the neighbourhood images, built PERTURB_BATCH at a time (bounded memory)."""
    return np.concatenate(
        [
            predict(perturb(image, hidden, segments, rows[start : start + PERTURB_BATCH]))
            for start in range(0, len(rows), PERTURB_BATCH)
        ]
    )


def _fit(
    explainer: lime_image.LimeImageExplainer,
    image: np.ndarray,
    segments: np.ndarray,
    data: np.ndarray,
    probs: np.ndarray,
    label: int | None,
) -> LimeResult:
    """lime's weighted ridge fit on a neighbourhood, exactly as ``explain_instance`` does it."""
    label = int(np.argmax(probs[0])) if label is None else label
    distances = sklearn.metrics.pairwise_distances(data, data[0].reshape(1, -1), metric="cosine").ravel()
    exp = lime_image.ImageExplanation(image, segments)
    exp.top_labels = [label]
    exp.intercept[label], exp.local_exp[label], exp.score, exp.local_pred = explainer.base.explain_instance_with_data(
        data, probs, distances, label, 100000, feature_selection=explainer.feature_selection
    )
    return LimeResult(exp, label, len(data))


def heat_overlay(rgb: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The heatmap (normalised to its max) in the jet colour map blended over the image, uint8 RGB."""
    import matplotlib

    scaled = heat / heat.max() if heat.max() > 0 else heat
    colour = (matplotlib.colormaps["jet"](scaled)[..., :3] * 255).astype(np.float32)
    return ((1 - alpha) * rgb.astype(np.float32) + alpha * colour).clip(0, 255).astype(np.uint8)


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


# -- one run's explanations ---------------------------------------------------------------------------------

OVERLAY_ROWS_PER_CLASS = 4


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
) -> ImageExplanations:
    """Grad-CAM localization, a LIME summary, the shortcut test and overlay grids for one sample."""
    from pipelines.trust.localization import flat_metrics
    from pipelines.model.preprocess import to_tensor_batch
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
    lime_results = {
        i: lime_explain(
            images[i], predict, num_samples=lime_samples, segmentation=segmentation, seed=seed, adaptive=True
        )
        for i in _one_per_class_first(labels, lime_images)
    }
    lime = _lime_summary(images, lime_results, segmentation)
    shortcut = shortcut_test(predict, list(images), [classes.index(lab) for lab in labels], seed=seed)
    report = {
        "n_images": len(images),
        "gradcam": _headline(cam_summary["overall"]) | {"per_class": cam_summary["per_class"]},
        "lime": lime,
        "shortcut": shortcut.to_dict(),
        "segmentation": segmentation_summary,
    }
    metrics = flat_metrics(cam_summary["overall"], "gradcam_") | {
        "shortcut_flip_rate": shortcut.flip_rate,
        "shortcut_f1_drop": shortcut.f1_drop,
    }
    if lime["nucleus_mass"] is not None:
        metrics["lime_nucleus_mass"] = lime["nucleus_mass"]
    overlays = _overlays(images, labels, inputs, heat, lime_results)
    return ImageExplanations(report, overlays, metrics)


def _gradcam_localization(heat: np.ndarray, inputs: list[np.ndarray], labels: Sequence[str]) -> tuple[dict, dict]:
    """Localization figures per class and overall (masks segmented on the model's input images)."""
    from pipelines.trust.localization import aggregate_reports, localization_report
    from pipelines.trust.segmentation import foreground_mask, nucleus_mask

    nuclei = [nucleus_mask(rgb) for rgb in inputs]
    reports = [localization_report(h, n, foreground_mask(rgb)) for h, n, rgb in zip(heat, nuclei, inputs, strict=True)]
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
        "pointing_game": summary["pointing_game"],
        "rank_accuracy": summary["rank_accuracy"],
        "artefact_mass": summary["artefact"]["mass"],
        "artefact_enrichment": summary["artefact"]["enrichment"],
        "corner_mass": summary["corner"]["mass"],
        "corner_enrichment": summary["corner"]["enrichment"],
        "other_corners_enrichment": summary["other_corners"]["enrichment"],
    }


def _lime_summary(images: Sequence[np.ndarray], results: dict[int, LimeResult], segmentation: str) -> dict:
    from pipelines.trust.localization import region_score
    from pipelines.trust.segmentation import nucleus_mask

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
    """Explain a training run's model on a fixed, seeded sample of its snapshot's test split and log
    ``explain/metrics.json``, ``explain/overlays/<class>.png`` and the metrics to the run."""
    from pipelines.data.imagefacts import decode_image
    from pipelines.core.settings import get_settings
    from pipelines.data.snapshot import load_snapshot
    from pipelines.io.storage import ObjectStore
    from pipelines.io.tracking import MODEL_ARTIFACT_PATH, load_model, log_to_run, run_tags

    if samples < 2:
        raise ExplainError(f"--samples must be at least 2 (the shortcut swap needs two classes), got {samples}")
    settings = settings or get_settings()
    tags = run_tags(settings, run_id)
    if "dataset_version" not in tags or "task" not in tags:
        raise ExplainError(f"MLflow run {run_id!r} has no task/dataset_version tags: not a training run")
    loaded = load_model(f"runs:/{run_id}/{MODEL_ARTIFACT_PATH}", settings=settings)
    store = ObjectStore.from_settings(settings)
    snapshot = load_snapshot(store, tags["task"], tags["dataset_version"])
    test = snapshot.frame[snapshot.frame["split"] == "test"]
    if test.empty:
        raise ExplainError(f"snapshot {tags['task']}@{snapshot.version} has no test images")
    picked = sample_split(test, loaded.classes, samples, seed)
    if picked["label"].nunique() < 2:
        raise ExplainError(
            f"the test split of {tags['task']}@{snapshot.version} holds one class only in the sample of "
            f"{len(picked)}: the shortcut swap needs two (raise --samples or add test images)"
        )
    images = [decode_image(store.get_bytes(key)).rgb for key in picked["key"]]
    result = explain_images(loaded, images, list(picked["label"]), seed=seed, lime_images=lime_images)
    report = result.report | {
        "run_id": run_id,
        "task": tags["task"],
        "dataset_version": snapshot.version,
        "seed": seed,
        "sha256": list(picked["sha256"]),
    }
    artifacts = {"explain/metrics.json": json.dumps(report, indent=2, default=float).encode()}
    artifacts |= {f"explain/overlays/{label}.png": png for label, png in result.overlays.items()}
    log_to_run(settings, run_id, result.metrics, artifacts)
    return report | {"artifacts": sorted(artifacts)}
