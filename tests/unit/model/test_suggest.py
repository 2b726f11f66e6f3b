"""Labelling suggestions: uncertain images first, diversity among near-duplicates, fixed for a seed."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.model.suggest import SuggestError, predictive_entropy, rank_for_labelling, top2_margin


def _probs(*rows: list[float]) -> np.ndarray:
    return np.asarray(rows, dtype=np.float64)


def _distinct_embeddings(n: int, dim: int = 8) -> np.ndarray:
    return np.eye(n, dim) + 0.01  # orthogonal directions: every pair equally far apart


def test_the_most_uncertain_images_come_first() -> None:
    probs = _probs([0.98, 0.01, 0.01], [0.34, 0.33, 0.33], [0.7, 0.2, 0.1], [0.5, 0.45, 0.05])
    picks = rank_for_labelling(probs, _distinct_embeddings(4), n=4)
    assert [p.index for p in picks] == [1, 3, 2, 0]
    assert [p.rank for p in picks] == [1, 2, 3, 4]
    assert picks[0].entropy == pytest.approx(predictive_entropy(probs)[1])
    assert picks[0].margin == pytest.approx(0.01)
    assert "most uncertain" in picks[0].reason and picks[0].distance_to_chosen is None


def test_margin_is_top1_minus_top2() -> None:
    assert top2_margin(_probs([0.5, 0.5, 0.0], [0.1, 0.9, 0.0], [0.2, 0.3, 0.5])).tolist() == pytest.approx(
        [0.0, 0.8, 0.2]
    )


def test_two_identical_embeddings_are_not_both_picked_when_n_is_small() -> None:
    # images 0 and 1 are the same crop (same embedding, both the most uncertain); 2 is different, a bit surer
    probs = _probs([0.4, 0.35, 0.25], [0.4, 0.35, 0.25], [0.6, 0.3, 0.1], [0.97, 0.02, 0.01])
    embeddings = np.asarray([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    picks = rank_for_labelling(probs, embeddings, n=2)
    chosen = {p.index for p in picks}
    assert len(chosen & {0, 1}) == 1 and 2 in chosen
    assert picks[1].distance_to_chosen == pytest.approx(np.sqrt(2))
    # pure uncertainty would have taken the duplicate pair
    assert np.argsort(-predictive_entropy(probs))[:2].tolist() in ([0, 1], [1, 0])


def test_a_duplicate_is_taken_only_once_nothing_else_is_left() -> None:
    probs = _probs([0.4, 0.35, 0.25], [0.4, 0.35, 0.25], [0.6, 0.3, 0.1])
    embeddings = np.asarray([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    picks = rank_for_labelling(probs, embeddings, n=3)
    assert {p.index for p in picks} == {0, 1, 2}
    assert picks[-1].distance_to_chosen == pytest.approx(0.0)
    assert "differs from the earlier picks" in picks[-1].reason


def test_diversity_is_sought_only_among_the_3n_most_uncertain() -> None:
    # rows 0-2: the same uncertain crop; rows 3-9: ever surer; row 9, the surest, lies farthest away
    top = np.linspace(0.6, 0.95, 7)
    surer = np.column_stack([top, (1 - top) / 2, (1 - top) / 2])
    probs = np.vstack([np.tile([0.4, 0.35, 0.25], (3, 1)), surer])
    embeddings = np.vstack([np.tile([1.0, 0.0], (3, 1)), [[1.0, 0.1 * i] for i in range(1, 7)], [[-1.0, 0.0]]])
    picks = rank_for_labelling(probs, embeddings, n=2)
    assert picks[0].index in (0, 1, 2)
    assert picks[1].index == 5  # the farthest of the 6 candidates (rows 0-5), not the far, sure row 9


def test_the_order_is_fixed_for_a_seed_and_ties_move_with_it() -> None:
    probs = np.tile([0.5, 0.3, 0.2], (12, 1))  # every image exactly as uncertain: the seed breaks the ties
    embeddings = np.random.default_rng(1).normal(size=(12, 4))
    first = [p.index for p in rank_for_labelling(probs, embeddings, n=5, seed=3)]
    assert first == [p.index for p in rank_for_labelling(probs, embeddings, n=5, seed=3)]
    others = {tuple(p.index for p in rank_for_labelling(probs, embeddings, n=5, seed=s)) for s in range(6)}
    assert len(others) > 1


def test_n_larger_than_the_pool_ranks_every_image_once() -> None:
    probs = _probs([0.6, 0.4], [0.9, 0.1], [0.5, 0.5])
    picks = rank_for_labelling(probs, _distinct_embeddings(3, 3), n=10)
    assert sorted(p.index for p in picks) == [0, 1, 2]
    assert picks[0].index == 2


@pytest.mark.parametrize(
    ("probs", "embeddings", "n", "message"),
    [
        (np.zeros((0, 3)), np.zeros((0, 4)), 1, "non-empty"),
        (np.asarray([[0.5, 0.1]]), np.zeros((1, 4)), 1, "sum to 1"),
        (np.asarray([[0.5, 0.5]]), np.zeros((2, 4)), 1, "do not match"),
        (np.asarray([[0.5, 0.5]]), np.full((1, 4), np.nan), 1, "NaN"),
        (np.asarray([[0.5, 0.5]]), np.zeros((1, 4)), 0, "at least 1"),
    ],
)
def test_unusable_inputs_are_refused_with_the_reason(probs, embeddings, n, message) -> None:
    with pytest.raises(SuggestError, match=message):
        rank_for_labelling(probs, embeddings, n)
