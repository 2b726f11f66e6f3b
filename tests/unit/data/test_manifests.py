"""The manifest schema (reading stored manifests: see tests/integration/data)."""

from __future__ import annotations

import pandas as pd

from pipelines.data.manifests import MANIFEST_COLUMNS, manifest_frame


def test_manifest_frame_has_every_column_and_no_nan_text() -> None:
    frame = manifest_frame([{"row": 0, "path": "a.jpg"}])
    assert tuple(frame.columns) == MANIFEST_COLUMNS
    assert frame.loc[0, "label"] is None
    assert pd.isna(frame.loc[0, "width"])
