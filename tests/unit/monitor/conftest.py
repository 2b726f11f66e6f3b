"""One Evidently comparison of a reference with a same-population and a shifted sample, shared by the modules."""

import numpy as np
import pytest

from pipelines.monitor.features import CONFIDENCE, PREDICTED_CLASS
from pipelines.monitor.statistics import compare

from .frames import T, fact_rows, with_model


@pytest.fixture(scope="session")
def same_and_shifted():
    """(reference features, result against the same population, result against colour + embedding shift)."""
    rng = np.random.default_rng(7)
    reference = with_model(fact_rows(rng, 120), rng)
    same = with_model(fact_rows(rng, 120), rng)
    shifted = with_model(fact_rows(rng, 120, colour_shift=8.0), rng, shift=0.8)
    shifted[[PREDICTED_CLASS, CONFIDENCE]] = reference[[PREDICTED_CLASS, CONFIDENCE]]  # the same mix
    return reference, compare(reference, same, T), compare(reference, shifted, T)
