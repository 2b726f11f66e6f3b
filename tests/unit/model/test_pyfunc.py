"""The bundle as an MLflow pyfunc model, saved to a local folder (no server): what ``mlflow models serve``
loads predicts like the bundle reader (temperature and TTA included), and the MLmodel names the run."""

from __future__ import annotations

import base64
from pathlib import Path

import cv2
import mlflow
import numpy as np
import pandas as pd
import torch

from pipelines.data.imagefacts import decode_image
from pipelines.model.backbones import create_backbone
from pipelines.model.bundle import BUNDLE_DIR_IN_MODEL, ModelBundle, read_bundle
from pipelines.model.predict import InferenceConfig
from pipelines.model.preprocess import preprocessing_from
from pipelines.model.pyfunc import save_pyfunc_model

CLASSES = ["ALL", "Healthy"]


def _png(seed: int) -> bytes:
    rgb = np.random.default_rng(seed).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    return cv2.imencode(".png", rgb)[1].tobytes()


def test_pyfunc_model_predicts_base64_images_like_the_bundle(tmp_path: Path) -> None:
    torch.manual_seed(0)
    backbone = create_backbone("custom_cnn", 2, pretrained=False, image_size=32)
    inference = InferenceConfig(temperature=0.5, tta=("hflip",))
    preprocessing = preprocessing_from(backbone.data_config)
    bundle = ModelBundle.for_backbone("binary_all", CLASSES, backbone, preprocessing, inference)
    model_dir = tmp_path / "model"
    save_pyfunc_model(model_dir, bundle, backbone.model.state_dict(), _png(0), run_id="run-42")

    assert mlflow.models.Model.load(str(model_dir / "MLmodel")).metadata["run_id"] == "run-42"
    images = [_png(1), _png(2)]
    pyfunc = mlflow.pyfunc.load_model(str(model_dir))
    out = pyfunc.predict(pd.DataFrame({"image": [base64.b64encode(b).decode() for b in images]}))
    assert list(out.columns) == ["predicted_class", "confidence", *CLASSES]

    loaded = read_bundle(model_dir / BUNDLE_DIR_IN_MODEL)
    assert loaded.inference == inference  # the served probabilities are the calibrated, flip-averaged ones
    expected = loaded.predict_proba([decode_image(b).rgb for b in images])
    assert np.allclose(out[CLASSES].to_numpy(), expected, atol=1e-5)
    assert list(out["predicted_class"]) == [CLASSES[i] for i in expected.argmax(axis=1)]
