"""A synthetic blood-smear image (devstack's generator), the input of the LIME and explanation tests."""

import numpy as np


def smear(label: str = "AML", index: int = 0, size: int = 96) -> np.ndarray:
    from pipelines.devstack.synthetic import synth_sample

    return synth_sample("five_class", label, index, size, seed=0).rgb
