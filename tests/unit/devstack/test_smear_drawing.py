"""Drawing one smear: pure in its generator, a nucleus mask per image, the corner mark confined to its box."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from pipelines.core.corners import corner_box
from pipelines.devstack.smear_drawing import ARCHETYPES, SyntheticError, paint_corner_mark, render_smear


def test_same_generator_state_draws_the_same_smear() -> None:
    morphology = ARCHETYPES["lymphoblast"]
    first = render_smear(morphology, 64, np.random.default_rng(5))
    again = render_smear(morphology, 64, np.random.default_rng(5))
    other = render_smear(morphology, 64, np.random.default_rng(6))
    assert first.rgb.shape == (64, 64, 3) and first.rgb.dtype == np.uint8
    assert first.nucleus_mask.shape == (64, 64) and first.nucleus_mask.dtype == bool
    assert np.array_equal(first.rgb, again.rgb) and np.array_equal(first.nucleus_mask, again.nucleus_mask)
    assert not np.array_equal(first.rgb, other.rgb)


def test_corner_mark_changes_only_its_box_and_leaves_the_input_alone() -> None:
    rgb = render_smear(ARCHETYPES["monocyte"], 96, np.random.default_rng(0)).rgb
    before = rgb.copy()
    marked = paint_corner_mark(rgb, class_index=2)
    y0, y1, x0, x1 = corner_box(96, 96)
    outside = np.ones((96, 96), bool)
    outside[y0:y1, x0:x1] = False
    assert np.array_equal(rgb, before)
    assert np.array_equal(marked[outside], rgb[outside])
    assert not np.array_equal(marked[y0:y1, x0:x1], rgb[y0:y1, x0:x1])


def test_an_unknown_nucleus_shape_is_refused() -> None:
    odd = dataclasses.replace(ARCHETYPES["lymphoblast"], nucleus_shape="star")
    with pytest.raises(SyntheticError, match="unknown nucleus shape"):
        render_smear(odd, 64, np.random.default_rng(0))
