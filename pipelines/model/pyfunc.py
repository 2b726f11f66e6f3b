"""The bundle as an MLflow pyfunc model, so ``mlflow models serve`` and registered-model URIs serve it.

The one module outside ``pipelines/io`` that imports mlflow: a pyfunc model is a Python class MLflow
pickles, so the class and the ``save_model`` call that packages it with the bundle live together here.
Served: a DataFrame with a base64 ``image`` column in, the predicted class, its confidence and one
probability per class out.
"""

from __future__ import annotations

import base64
import tempfile
from collections.abc import Sequence
from importlib import metadata as importlib_metadata
from pathlib import Path

import mlflow
import pandas as pd
import torch
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

from pipelines.data.imagefacts import decode_image
from pipelines.io import layout
from pipelines.io.tracking import TrainingTracker
from pipelines.model.bundle import ModelBundle, read_bundle, save_bundle

SERVING_REQUIREMENTS = (
    "torch",
    "torchvision",
    "timm",
    "numpy",
    "pandas",
    "pillow",
    "opencv-python-headless",
    "torchstain",  # the stain normaliser a bundle's preprocessing may carry
)


class LeukopsClassifier(mlflow.pyfunc.PythonModel):
    """The pyfunc flavour: a DataFrame with a base64 ``image`` column → probabilities per class."""

    def load_context(self, context) -> None:
        self.model = read_bundle(Path(context.artifacts["bundle"]).parent)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        rgb = [decode_image(_image_bytes(value)).rgb for value in model_input["image"]]
        proba = self.model.predict_proba(rgb)
        out = pd.DataFrame(proba, columns=self.model.classes)
        out.insert(0, "confidence", proba.max(axis=1))
        out.insert(0, "predicted_class", [self.model.classes[i] for i in proba.argmax(axis=1)])
        return out


def _image_bytes(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else base64.b64decode(value)


def model_signature(classes: Sequence[str]) -> ModelSignature:
    outputs = [ColSpec("string", "predicted_class"), ColSpec("double", "confidence")]
    return ModelSignature(
        inputs=Schema([ColSpec("string", "image")]),
        outputs=Schema(outputs + [ColSpec("double", c) for c in classes]),
    )


def _pip_requirements() -> list[str]:
    return [f"mlflow=={mlflow.__version__}"] + [
        f"{name}=={importlib_metadata.version(name)}" for name in SERVING_REQUIREMENTS
    ]


def save_pyfunc_model(
    path: Path, bundle: ModelBundle, state_dict: dict[str, torch.Tensor], example_image: bytes, run_id: str | None
) -> None:
    """Save the bundle as a pyfunc model folder at ``path`` (which must not exist yet).

    ``run_id`` goes into the MLmodel metadata: a model saved locally and then uploaded has no run of its
    own in MLflow's eyes, and loaders report which run trained what they loaded.
    """
    with tempfile.TemporaryDirectory() as tmp:
        metadata, weights = save_bundle(bundle, state_dict, Path(tmp))
        mlflow.pyfunc.save_model(
            path=str(path),
            python_model=LeukopsClassifier(),
            artifacts={"bundle": str(metadata), "weights": str(weights)},
            signature=model_signature(bundle.classes),
            input_example=pd.DataFrame({"image": [base64.b64encode(example_image).decode()]}),
            pip_requirements=_pip_requirements(),
            metadata={"run_id": run_id},
        )


def log_model(
    tracker: TrainingTracker, bundle: ModelBundle, state_dict: dict[str, torch.Tensor], example_image: bytes
) -> str:
    """Log the canonical model as the run's artifact folder ``layout.MODEL_ARTIFACT_PATH``; returns its
    ``layout.run_model_uri``.

    Saved locally and uploaded as plain run artifacts (not MLflow's ``log_model`` and its separate MLflow 3
    LoggedModel store), so the run's model URI, a registered version's URI and ``mlflow models serve`` all
    resolve to the same files.
    """
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / layout.MODEL_ARTIFACT_PATH
        save_pyfunc_model(model_dir, bundle, state_dict, example_image, tracker.run_id)
        tracker.log_artifacts(model_dir, layout.MODEL_ARTIFACT_PATH)
    return layout.run_model_uri(tracker.run_id)
