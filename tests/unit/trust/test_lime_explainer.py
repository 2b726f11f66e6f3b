"""LIME (lime) with the fast neighbourhood: equal to the lime package, adaptive stop, views, superpixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lime import lime_image
from torch import nn

from pipelines.trust.lime_explainer import LIME_VIEWS, LimeInputError, classifier_fn, lime_explain, segmenter

from .smear import smear


def _tiny_classifier() -> tuple[nn.Module, callable]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(128, 3)
    ).eval()

    def to_tensor(images):
        return torch.as_tensor(np.stack(images)).permute(0, 3, 1, 2).float() / 255

    return model, to_tensor


def test_lime_matches_the_lime_package_exactly() -> None:
    model, to_tensor = _tiny_classifier()
    image = smear()

    def slow(images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return torch.softmax(model(to_tensor(list(images))), 1).numpy()

    reference = lime_image.LimeImageExplainer(random_state=3).explain_instance(
        image, slow, num_samples=200, random_seed=3
    )
    ours = lime_explain(image, classifier_fn(model, to_tensor, batch_size=64), num_samples=200, seed=3)
    assert ours.label == reference.top_labels[0] and ours.samples_used == 200
    np.testing.assert_array_equal(ours.segments, reference.segments)
    expected = dict(reference.local_exp[ours.label])
    got = ours.weights()
    assert expected.keys() == got.keys()
    np.testing.assert_allclose([got[k] for k in expected], list(expected.values()), atol=1e-6)


def test_adaptive_lime_stops_early_on_a_stable_ranking() -> None:
    model, to_tensor = _tiny_classifier()
    image = smear()
    predict = classifier_fn(model, to_tensor)
    full = lime_explain(image, predict, num_samples=1000, seed=0)
    fast = lime_explain(image, predict, num_samples=1000, seed=0, adaptive=True, chunk=100)
    assert fast.samples_used < 1000
    assert len(set(fast.top_superpixels(5)) & set(full.top_superpixels(5))) >= 4


def test_lime_views_and_heatmap() -> None:
    model, to_tensor = _tiny_classifier()
    image = smear()
    result = lime_explain(image, classifier_fn(model, to_tensor), num_samples=100, seed=0)
    views = result.views(num_features=3)
    assert tuple(views) == LIME_VIEWS
    for view in views.values():
        assert view.shape == image.shape and view.dtype == np.uint8
    hidden = ~np.isin(result.segments, result.top_superpixels(3))
    assert (views["positive_hide_rest"][hidden] == 0).mean() > 0.9  # the rest is hidden (black)
    heat = result.heatmap()
    assert heat.shape == image.shape[:2] and (heat >= 0).all()


def test_superpixel_algorithms() -> None:
    image = smear()
    assert segmenter("slic", n_segments=20)(image).max() + 1 <= 40
    assert segmenter("quickshift")(image).max() >= 1
    with pytest.raises(LimeInputError, match="felzenszwalb"):
        segmenter("felzenszwalb")


def test_lime_rejects_a_grey_image() -> None:
    model, to_tensor = _tiny_classifier()
    with pytest.raises(LimeInputError, match="H x W x 3"):
        lime_explain(np.zeros((32, 32), np.uint8), classifier_fn(model, to_tensor))
