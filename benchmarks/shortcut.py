"""The gate's shortcut test: seconds per 100 images, against one plain forward pass over the same images.

The test predicts every image once, then once per (corner region x {neutral fill, cross-class swap}):
9 forward passes an image with the default four corners. The baseline is ``predict_proba`` once over the
same images in the same process, so the ratio says what the test costs beyond scoring the split.
The model is a freshly built bundle (efficientnet_lite0, ImageNet weights offline, untrained head): the
cost does not depend on what it learned.

Run: .venv/bin/python benchmarks/shortcut.py [--per-class 25] [--image-size 128]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from pipelines.core.taxonomy import get_task
from pipelines.data.imagefacts import decode_image
from pipelines.model.backbones import create_backbone
from pipelines.model.bundle import LoadedModel, ModelBundle, read_bundle, save_bundle
from pipelines.model.preprocess import preprocessing_from
from pipelines.trust.shortcut import shortcut_test

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "all_taleqani"
TASK = "all_subtypes"


def fresh_model(image_size: int) -> LoadedModel:
    classes = get_task(TASK).classes
    backbone = create_backbone("efficientnet_lite0", len(classes), pretrained=True, image_size=image_size)
    bundle = ModelBundle.for_backbone(TASK, classes, backbone, preprocessing_from(backbone.data_config))
    directory = Path(tempfile.mkdtemp(prefix="leukops-shortcut-bench-"))
    save_bundle(bundle, backbone.model.state_dict(), directory)
    return read_bundle(directory)


def seconds(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=25, help="images of each ALL class")
    parser.add_argument("--image-size", type=int, default=128)
    args = parser.parse_args()

    classes = get_task(TASK).classes
    files = [f for c in classes for f in sorted((SHARED / c).glob("*.jpg"))[: args.per_class]]
    images = [decode_image(f.read_bytes()).rgb for f in files]
    labels = [classes.index(f.parent.name) for f in files]
    model = fresh_model(args.image_size)
    shortcut_test(model.predict_proba, images[:: args.per_class], labels[:: args.per_class])  # warm-up

    plain_s = seconds(model.predict_proba, images)
    test_s = seconds(shortcut_test, model.predict_proba, images, labels)
    per_100 = 100 / len(images)
    print(f"{len(images)} ALL images at {args.image_size} px, efficientnet_lite0, load {os.getloadavg()[0]:.1f}")
    print(f"shortcut test: {test_s * per_100:.1f} s per 100 images")
    print(f"one forward pass (baseline): {plain_s * per_100:.1f} s per 100 images")
    print(f"ratio shortcut / forward pass: {test_s / plain_s:.2f}x")


if __name__ == "__main__":
    main()
