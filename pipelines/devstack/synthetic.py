"""Synthetic smear data sets: images, ground-truth nucleus masks and an optional planted shortcut.

Each class of a task is drawn as one of the morphology archetypes of ``smear_drawing``
(``TASK_ARCHETYPES``), distinct within every task. Every image has its own numpy Generator seeded from
(seed, label, index) and files are PNG-encoded, so the same arguments give byte-identical files.

``--shortcut corner`` paints a class-dependent label in the bottom-right ``corner_box`` (as the
scale-bar labels of the real ALL set do), after everything else and without drawing from the
generator, so shortcut and plain images differ only inside that box.
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np

from pipelines.core.corners import corner_box
from pipelines.core.taxonomy import get_task
from pipelines.devstack.smear_drawing import (
    ARCHETYPES,
    GENERATOR_VERSION,
    Morphology,
    SmearSample,
    SyntheticError,
    paint_corner_mark,
    render_smear,
)

SHORTCUTS = ("corner",)
MIN_SIZE = 32
MAX_SIZE = 1024

TASK_ARCHETYPES: dict[str, dict[str, str]] = {
    "five_class": {
        "ALL": "lymphoblast",
        "AML": "myeloblast",
        "CLL": "small_lymphocyte",
        "CML": "myelocyte",
        "Healthy": "segmented_neutrophil",
    },
    "binary_all": {"ALL": "lymphoblast", "Healthy": "segmented_neutrophil"},
    "all_subtypes": {
        "Benign": "haematogone",
        "Early": "lymphoblast",
        "Pre": "cleaved_blast",
        "Pro": "convoluted_blast",
    },
    "wbc": {
        "basophil": "basophil",
        "eosinophil": "eosinophil",
        "erythroblast": "erythroblast",
        "ig": "myelocyte",
        "lymphocyte": "small_lymphocyte",
        "monocyte": "monocyte",
        "neutrophil": "segmented_neutrophil",
        "platelet": "platelet",
    },
}


@dataclass(frozen=True)
class SynthSummary:
    out_dir: str
    task: str
    classes: list[str]
    per_class: int
    size: int
    seed: int
    shortcut: str | None
    n_images: int
    images_dir: str
    masks_dir: str
    counts: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def archetype_for(task: str, label: str) -> Morphology:
    mapping = TASK_ARCHETYPES[get_task(task).name]
    if label not in mapping:
        raise SyntheticError(f"task {task!r} has no class {label!r}; classes: {', '.join(mapping)}")
    return ARCHETYPES[mapping[label]]


def image_rng(seed: int, label: str, index: int) -> np.random.Generator:
    """The generator for one image: independent of every other image, stable across runs and machines."""
    return np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(label.encode()), index]))


def synth_sample(task: str, label: str, index: int, size: int, seed: int, shortcut: str | None = None) -> SmearSample:
    """The deterministic image number ``index`` of class ``label`` (what ``write_synthetic`` writes)."""
    _check_args(size, shortcut)
    sample = render_smear(archetype_for(task, label), size, image_rng(seed, label, index))
    if shortcut == "corner":
        return SmearSample(paint_corner_mark(sample.rgb, get_task(task).index(label)), sample.nucleus_mask)
    return sample


def _check_args(size: int, shortcut: str | None) -> None:
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise SyntheticError(f"size {size} px is outside {MIN_SIZE}..{MAX_SIZE}")
    if shortcut is not None and shortcut not in SHORTCUTS:
        raise SyntheticError(f"unknown shortcut {shortcut!r}; known: {', '.join(SHORTCUTS)}")


def _write_png(path: Path, image: np.ndarray) -> None:
    ok, encoded = cv2.imencode(".png", image)
    if not ok:
        raise SyntheticError(f"could not PNG-encode {path}")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(encoded.tobytes())
    os.replace(tmp, path)  # atomic: a reader never sees half a file


def write_synthetic(
    out: str | Path, task: str, per_class: int, size: int, seed: int, shortcut: str | None = None
) -> SynthSummary:
    """Write ``images/<label>/<stem>.png``, ``masks/<label>/<stem>.png`` (0/255) and ``synth.json``.

    Rerunning with the same arguments rewrites the same bytes; a folder made with other arguments is
    refused rather than mixed.
    """
    spec = get_task(task)
    _check_args(size, shortcut)
    if per_class < 1:
        raise SyntheticError(f"per-class must be at least 1, got {per_class}")
    out = Path(out)
    params = {
        "generator_version": GENERATOR_VERSION,
        "task": spec.name,
        "classes": list(spec.classes),
        "archetypes": TASK_ARCHETYPES[spec.name],
        "per_class": per_class,
        "size": size,
        "seed": seed,
        "shortcut": shortcut,
        "corner_box": list(corner_box(size, size)) if shortcut else None,
    }
    meta = out / "synth.json"
    if meta.exists() and json.loads(meta.read_text()) != params:
        raise SyntheticError(f"{out} already holds synthetic data made with other parameters (see {meta})")
    counts = {}
    for label in spec.classes:
        (out / "images" / label).mkdir(parents=True, exist_ok=True)
        (out / "masks" / label).mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            sample = synth_sample(spec.name, label, index, size, seed, shortcut)
            stem = f"{label}_{index:05d}"
            _write_png(out / "images" / label / f"{stem}.png", cv2.cvtColor(sample.rgb, cv2.COLOR_RGB2BGR))
            _write_png(out / "masks" / label / f"{stem}.png", sample.nucleus_mask.astype(np.uint8) * 255)
        counts[label] = per_class
    meta.write_text(json.dumps(params, indent=2) + "\n")
    return SynthSummary(
        out_dir=str(out),
        task=spec.name,
        classes=list(spec.classes),
        per_class=per_class,
        size=size,
        seed=seed,
        shortcut=shortcut,
        n_images=per_class * len(spec.classes),
        images_dir=str(out / "images"),
        masks_dir=str(out / "masks"),
        counts=counts,
    )
