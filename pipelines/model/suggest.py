"""Which unlabelled images should a new lab label first: uncertainty, then diversity (pure numpy + sklearn).

`rank_for_labelling` orders a pool of images by how much a label should help the model that scored them:

1. **Uncertainty.** Predictive entropy of the calibrated probabilities (the bundle's temperature and TTA,
   `pipelines.model.predict`), highest first; exact ties (a batch of identical crops) go to a seeded
   shuffle, so the order is fixed for a seed. The top-1 − top-2 margin is reported beside it (the lab
   reads "between lymphocyte and monocyte" more easily than nats); entropy ranks because it sees every
   class, not only the top two.
2. **Diversity.** Among the ``CANDIDATE_FACTOR × n`` most uncertain images, greedy k-center
   (farthest-first traversal, Sener & Savarese 2018, "core-set" selection) over the model's L2-normalised
   penultimate embeddings: start from the most uncertain, then repeatedly take the candidate farthest from
   everything already taken (ties: the more uncertain). Two near-identical crops are therefore not both
   picked while a different one is left, which pure entropy ranking would do: a lab's uncertain images
   come in clusters (one stain artefact, one cell type the model has not seen).

`model_scores` is the one adapter from a loaded model to the two arrays (calibrated probabilities and the
identity-view embeddings of the same forward pass); `pipelines.cli.suggest` and ``benchmarks/new_lab.py``
both call it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from scipy.stats import entropy as shannon_entropy
from sklearn.metrics import pairwise_distances
from sklearn.preprocessing import normalize

from pipelines.core.errors import LeukopsError

if TYPE_CHECKING:
    from pipelines.model.bundle import LoadedModel

CANDIDATE_FACTOR = 3  # diversity is sought among the 3n most uncertain (uncertainty stays the first filter)
SCORE_BATCH = 32


class SuggestError(LeukopsError, ValueError):
    """Inputs the ranking cannot use; the message names the array and why."""


@dataclass(frozen=True)
class Pick:
    """One suggested image: its row in the pool, rank (1 = label first) and why it was chosen."""

    index: int
    rank: int
    entropy: float
    margin: float
    distance_to_chosen: float | None  # cosine-like distance to the nearest earlier pick (None for the first)
    reason: str


def predictive_entropy(probs: np.ndarray) -> np.ndarray:
    """Shannon entropy (nats) of each row."""
    return shannon_entropy(probs, axis=1)


def top2_margin(probs: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 probability of each row (0: the model cannot choose between two classes)."""
    if probs.shape[1] < 2:
        return np.ones(len(probs))
    ordered = np.sort(probs, axis=1)
    return ordered[:, -1] - ordered[:, -2]


def uncertainty_order(probs: np.ndarray, seed: int) -> np.ndarray:
    """Pool indices, most uncertain (highest entropy) first, exact ties in a seeded shuffle's order."""
    shuffled = np.random.default_rng(seed).permutation(len(probs))
    # a stable sort of the shuffled pool: the shuffle decides only exact ties
    return shuffled[np.argsort(-predictive_entropy(probs)[shuffled], kind="stable")]


def farthest_first(embeddings: np.ndarray, n: int) -> tuple[list[int], list[float | None]]:
    """Greedy k-center over rows already in priority order: (chosen row numbers, each one's distance to
    the nearest row chosen before it). Starts from row 0; ties go to the earlier (more uncertain) row."""
    distances = pairwise_distances(normalize(embeddings), metric="euclidean")
    chosen, gaps = [0], [None]
    nearest = distances[0].copy()
    while len(chosen) < min(n, len(embeddings)):
        nearest[chosen] = -1.0  # never re-pick; argmax takes the first of equal maxima
        pick = int(np.argmax(nearest))
        chosen.append(pick)
        gaps.append(float(nearest[pick]))
        nearest = np.minimum(nearest, distances[pick])
    return chosen, gaps


def _reason(entropy: float, margin: float, gap: float | None, uncertainty_rank: int) -> str:
    uncertain = f"uncertainty rank {uncertainty_rank} (entropy {entropy:.3f}, margin {margin:.3f})"
    if gap is None:
        return f"most uncertain image: {uncertain}"
    if gap <= 1e-6:
        return f"{uncertain}; no candidate left that differs from the earlier picks (embedding distance 0)"
    return f"{uncertain}; embedding distance {gap:.3f} to the nearest earlier pick"


def check_inputs(probs: np.ndarray, embeddings: np.ndarray, n: int) -> None:
    if probs.ndim != 2 or probs.shape[0] == 0:
        raise SuggestError(f"probs must be a non-empty N×C array, got shape {probs.shape}")
    if not np.all(np.isfinite(probs)) or not np.allclose(probs.sum(axis=1), 1.0, atol=1e-4):
        raise SuggestError("probs rows must be finite and sum to 1 (calibrated class probabilities)")
    if embeddings.ndim != 2 or embeddings.shape[0] != probs.shape[0]:
        raise SuggestError(f"embeddings of shape {embeddings.shape} do not match probs of shape {probs.shape}")
    if not np.all(np.isfinite(embeddings)):
        raise SuggestError("embeddings hold NaN or infinite values")
    if n < 1:
        raise SuggestError(f"n must be at least 1, got {n}")


def rank_for_labelling(probs: np.ndarray, embeddings: np.ndarray, n: int, seed: int = 0) -> list[Pick]:
    """The ``min(n, N)`` pool images to label first, in order (see the module docstring)."""
    probs = np.asarray(probs, dtype=np.float64)
    embeddings = np.asarray(embeddings, dtype=np.float64)
    check_inputs(probs, embeddings, n)
    order = uncertainty_order(probs, seed)
    candidates = order[: min(len(order), CANDIDATE_FACTOR * n)]
    chosen, gaps = farthest_first(embeddings[candidates], n)
    entropy, margin = predictive_entropy(probs), top2_margin(probs)
    picks = []
    for rank, (row, gap) in enumerate(zip(chosen, gaps, strict=True), start=1):
        index = int(candidates[row])
        reason = _reason(entropy[index], margin[index], gap, row + 1)
        picks.append(Pick(index, rank, float(entropy[index]), float(margin[index]), gap, reason))
    return picks


def model_scores(
    loaded: LoadedModel, rgbs: Sequence[np.ndarray], batch_size: int = SCORE_BATCH
) -> tuple[np.ndarray, np.ndarray]:
    """(calibrated probabilities N×C, identity-view embeddings N×D) of RGB images, from one forward pass
    per batch through the one predict function."""
    from pipelines.model.predict import predict  # torch: kept off the ranking's import path

    probs, embeddings = [], []
    for start in range(0, len(rgbs), batch_size):
        batch = loaded.batch(rgbs[start : start + batch_size])
        outputs = predict(loaded.module, batch, loaded.inference, with_embeddings=True)
        probs.append(outputs.proba)
        embeddings.append(outputs.embedding.astype(np.float64))
    return np.concatenate(probs), np.concatenate(embeddings)
