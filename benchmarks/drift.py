"""Drift features and false alarms on real pbc images, each against a baseline in the same run.

1. Feature speed: drift facts read from manifest columns (what ``fact_features`` does when ingest stored
   them) vs the baseline of decoding every image and running ``image_facts`` on it.
2. False alarms: random half/half splits of the same images (no drift by construction); the share of
   splits in which at least one image-fact column is flagged, with Evidently's default per-column rule
   (KS p < 0.05) vs leukops' Bonferroni split (KS p < column_alpha / m), and the share of splits that
   ``compare`` calls drifted.

Run: .venv/bin/python benchmarks/drift.py [--per-class 25] [--splits 20]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import ks_2samp

from pipelines.core.settings import DriftThresholds
from pipelines.data.imagefacts import FACT_COLUMNS, decode_image, image_facts
from pipelines.monitor.features import fact_features
from pipelines.monitor.statistics import compare

PBC = Path(__file__).resolve().parents[2] / "shared" / "data" / "pbc"


def _paths(per_class: int) -> list[Path]:
    return [f for d in sorted(p for p in PBC.iterdir() if p.is_dir()) for f in sorted(d.iterdir())[:per_class]]


def _decode_and_measure(paths: list[Path]) -> pd.DataFrame:
    rows = []
    for path in paths:
        decoded = decode_image(path.read_bytes())
        # drift reads file_type from the key's extension, so the file name stands in for the object key
        rows.append({**image_facts(decoded.rgb, decoded.source_channels), "key": path.name})
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=25)
    parser.add_argument("--splits", type=int, default=20)
    args = parser.parse_args()
    paths = _paths(args.per_class)

    start = time.perf_counter()
    manifest = _decode_and_measure(paths)
    decode_s = time.perf_counter() - start
    start = time.perf_counter()
    features = fact_features(manifest)
    manifest_s = time.perf_counter() - start
    n = len(paths)
    print(f"features for {n} images: decode + image_facts {n / decode_s:,.0f} img/s (baseline), ", end="")
    print(f"from manifest columns {n / manifest_s:,.0f} img/s, ratio {decode_s / manifest_s:,.0f}x")

    t = DriftThresholds()
    m = len(FACT_COLUMNS) + 1
    rng = np.random.default_rng(0)
    default_alarms = bonferroni_alarms = dataset_drifts = 0
    compare_s = 0.0
    for _ in range(args.splits):
        order = rng.permutation(n)
        a, b = features.iloc[order[: n // 2]], features.iloc[order[n // 2 :]]
        p_values = [ks_2samp(a[c], b[c]).pvalue for c in FACT_COLUMNS]
        default_alarms += min(p_values) < 0.05
        bonferroni_alarms += min(p_values) < t.column_alpha / m
        start = time.perf_counter()
        dataset_drifts += compare(a, b, t).summary.drift_detected
        compare_s += time.perf_counter() - start
    k = args.splits
    print(
        f"{k} no-drift half splits of {n} pbc images: >=1 column flagged with p<0.05 (Evidently default) "
        f"{default_alarms / k:.0%}, with Bonferroni p<{t.column_alpha / m:.4f} {bonferroni_alarms / k:.0%}; "
        f"compare() said drifted {dataset_drifts / k:.0%}; compare() {compare_s / k:.2f} s per report"
    )


if __name__ == "__main__":
    main()
