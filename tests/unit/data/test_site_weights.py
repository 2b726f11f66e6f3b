"""Site-balanced training draws: a small new lab is not drowned by a large first lab."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils.data import TensorDataset

from pipelines.data.datasets import make_loader, site_weights


def test_square_root_balance_gives_a_small_site_a_fair_share_of_the_draws() -> None:
    sources = ["pbc"] * 1300 + ["new-lab"] * 50
    weights = site_weights(sources, 0.5)
    new_share = sum(w for w, s in zip(weights, sources, strict=True) if s == "new-lab")
    assert new_share == pytest.approx(50**0.5 / (50**0.5 + 1300**0.5))  # ~1/6, not 50/1350 = 1/27
    equal = site_weights(sources, 1.0)
    assert sum(w for w, s in zip(equal, sources, strict=True) if s == "new-lab") == pytest.approx(0.5)
    assert site_weights(sources, 0.0) is None and site_weights(["pbc"] * 10, 0.5) is None


def test_a_weighted_training_loader_draws_by_site_and_replays_with_its_seed() -> None:
    sources = ["big"] * 90 + ["small"] * 10
    data = TensorDataset(torch.arange(100))
    weights = site_weights(sources, 1.0)

    def drawn(seed: int) -> list[int]:
        loader = make_loader(
            data, batch_size=50, train=True, device=torch.device("cpu"), seed=seed, workers=0, sample_weights=weights
        )
        return [int(i) for (batch,) in loader for i in batch]

    first = drawn(3)
    assert len(first) == 100 and first == drawn(3) and first != drawn(4)
    small = Counter(i >= 90 for i in first)[True]
    assert 35 <= small <= 65, small  # about half the draws, not 10 %
