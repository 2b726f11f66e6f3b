"""A source that labels a subset of the task's classes (CellaVision: 5 of the 8 `wbc` classes) is taken
into snapshots and training like any other (the task's class list is the union), and is scored per site
on the classes it carries. Real images of two labs from ../shared/data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipelines.core.taxonomy import get_task
from pipelines.data.imagefacts import FACT_COLUMNS, decode_image, perceptual_hash
from pipelines.data.ledger import empty_ledger
from pipelines.data.snapshot import build_snapshot
from pipelines.io import layout
from pipelines.io.storage import sha256_hex

CELLAVISION_CLASSES = ("basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil")
ABSENT = ("erythroblast", "ig", "platelet")


def _images(root: Path, classes, per_class: int) -> list[tuple[Path, str]]:
    return [(p, c) for c in classes for p in sorted((root / c).iterdir())[:per_class]]


@pytest.fixture(scope="module")
def two_labs(shared_data: Path) -> list[tuple[Path, str, str]]:
    """(path, label, source): 4 PBC images of each of the 8 classes, up to 4 CellaVision images of its 5
    (it has 3 basophils)."""
    pbc = _images(shared_data / "pbc", get_task("wbc").classes, 4)
    cellavision = _images(shared_data / "wbc_seg_cellavision", CELLAVISION_CLASSES, 4)
    return [(p, c, "pbc") for p, c in pbc] + [(p, c, "cellavision") for p, c in cellavision]


def test_a_subset_labelled_source_enters_the_snapshot_with_every_image(two_labs) -> None:
    rows = []
    for path, label, source in two_labs:
        data = path.read_bytes()
        sha = sha256_hex(data)
        facts = dict.fromkeys(FACT_COLUMNS, 1.0)
        phash = perceptual_hash(decode_image(data).rgb)
        key = layout.raw_key(sha, path.suffix[1:])
        rows.append({"sha256": sha, "key": key, "label": label, "source": source, "phash": phash} | facts)
    result = build_snapshot("wbc", pd.DataFrame(rows).assign(patient_id=None), set(), empty_ledger(), {})
    frame = result.snapshot.frame
    cellavision = frame[frame["source"] == "cellavision"]
    assert len(cellavision) == sum(s == "cellavision" for _, _, s in two_labs) == 19
    assert set(cellavision["label"]) == set(CELLAVISION_CLASSES)
    assert len(frame) == 51 and set(frame["label"]) == set(get_task("wbc").classes), "the union of both labs"


def test_training_on_a_subset_labelled_source_runs_and_each_site_is_scored_on_its_classes(two_labs) -> None:
    """`build_run` + `fit_prepared` (the one training path) on both labs: one 32 px epoch of 25 images."""
    from pipelines.core.settings import RetrainConfig
    from pipelines.data.datasets import split_rows
    from pipelines.model.candidate import build_run, candidate_spec, fit_prepared, train_config
    from pipelines.model.devices import pick_device
    from pipelines.model.evaluate import evaluate_sites
    from pipelines.model.predict import InferenceConfig, loader_logits

    frame = pd.DataFrame([{"path": p, "label": c, "source": s} for p, c, s in two_labs])
    splits = ("test", "train", "val", "train")  # per (source, class): 1 test, 1 val, up to 2 train
    frame["split"] = [splits[i] for i in frame.groupby(["source", "label"]).cumcount()]
    retrain = RetrainConfig(image_size=32, batch_size=8, time_budget_min=None)
    spec = candidate_spec(retrain, "wbc", "custom_cnn", device="cpu", image_size=32)  # over wbc's own size
    run = build_run(spec, train_config(retrain, epochs=1), frame, "v-test", "folder")
    assert len(run.loaders["train"].dataset) == 25, "CellaVision's 9 train images are trained on"
    result = fit_prepared(run)
    assert len(result.history) == 1 and np.isfinite(result.history[0].train_loss)
    labels, logits = loader_logits(run.backbone.model, run.loaders["test"], pick_device("cpu"))
    sources = split_rows(frame, "test")["source"]
    sites = evaluate_sites(labels, logits, run.classes, InferenceConfig(), sources, bootstrap=50)
    assert sites["cellavision"].n == 5 and sites["cellavision"].classes_scored == CELLAVISION_CLASSES
    assert sites["cellavision"].absent_classes == ABSENT and sites["pbc"].classes_scored == run.classes
    predicted = logits[np.asarray(sources) == "cellavision"].argmax(axis=1)
    assert sites["cellavision"].predicted_absent == sum(run.classes[i] in ABSENT for i in predicted)
