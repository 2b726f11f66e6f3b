"""Synthetic drift feature frames: manifest rows with image facts, and the model columns a champion adds."""

import numpy as np
import pandas as pd

from pipelines.core.settings import DriftThresholds
from pipelines.data.imagefacts import FACT_COLUMNS
from pipelines.io import layout
from pipelines.monitor.features import assemble_features, fact_features, prediction_features

COLOUR = ("red_mean", "green_mean", "blue_mean", "hematoxylin_od", "eosin_od", "hue_mean")
T = DriftThresholds()


def fact_rows(rng: np.random.Generator, n: int, colour_shift: float = 0.0) -> pd.DataFrame:
    """Manifest-like rows of ``n`` same-sized JPEGs; the colour facts moved by ``colour_shift``."""
    frame = pd.DataFrame({c: rng.normal(100.0, 10.0, n) for c in FACT_COLUMNS})
    frame["width"], frame["height"], frame["channels"] = 360.0, 363.0, 3.0
    for column in COLOUR:
        frame[column] += colour_shift
    frame["key"] = [layout.raw_key(f"{i:064x}", "jpg") for i in range(n)]
    return frame


def with_model(frame: pd.DataFrame, rng: np.random.Generator, shift: float = 0.0) -> pd.DataFrame:
    """The facts of ``frame`` plus 8 embedding components (moved by ``shift``) and a 3-class prediction."""
    n = len(frame)
    pcs = pd.DataFrame(rng.normal(shift, 1.0, (n, 8)), columns=[f"emb_pc{i}" for i in range(8)])
    proba = rng.dirichlet(np.ones(3), n)
    return assemble_features(fact_features(frame), pcs, prediction_features(proba, ["a", "b", "c"]))


class MemoryStore:
    """The slice of ``ObjectStore`` drift uses, over a dict: keys as the bucket would hold them."""

    def __init__(self) -> None:
        self.objects: dict[str, object] = {}

    def uri(self, key: str) -> str:
        return f"s3://test/{key}"

    def list(self, prefix: str = "") -> list[str]:
        return sorted(k for k in self.objects if k.startswith(prefix))

    def exists(self, key: str) -> bool:
        return key in self.objects

    def put_text(self, key: str, text: str) -> str:
        self.objects[key] = text
        return self.uri(key)

    put_json = put_parquet = put_text

    def get_json(self, key: str) -> object:
        return self.objects[key]

    get_parquet = get_json
