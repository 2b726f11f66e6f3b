"""LIME for one image (the ``lime`` package's explainer) with a fast neighbourhood, and its classifier_fn.

The explainer's kernel, ridge fit and ``ImageExplanation`` are ``lime``'s own; the perturbed images are
built vectorised (same random rows as ``lime``), scored by a batched, no-grad, channels-last classifier,
and optionally stopped early once the top superpixels are stable across successive sample chunks.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import sklearn.metrics
import torch
from lime import lime_image
from lime.wrappers.scikit_image import SegmentationAlgorithm
from skimage.segmentation import mark_boundaries

from pipelines.core.errors import LeukopsError

ClassifierFn = Callable[[Sequence[np.ndarray]], np.ndarray]
ToTensor = Callable[[Sequence[np.ndarray]], torch.Tensor]
SEGMENTERS = ("quickshift", "slic")
LIME_VIEWS = ("positive_hide_rest", "positive", "positive_negative")
PERTURB_BATCH = 128  # neighbourhood images materialised at once: 128 x 224 x 224 x 3 bytes = 19 MB


class LimeInputError(LeukopsError, ValueError):
    """LIME cannot explain this input (the message says why)."""


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
        raise LimeInputError(f"unknown superpixel algorithm {kind!r}; use one of {', '.join(SEGMENTERS)}")
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
        raise LimeInputError(f"LIME needs an H x W x 3 image, got shape {image.shape}")
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
