"""A training process for ``test_faults``: the unit tests' tiny net on synthetic images, fixed epochs, no
time budget, checkpointed to ``argv[1]``; its final figures go to ``argv[2]`` as JSON. Every training image
takes ``SLOW_IMAGE_S`` to load, so an epoch lasts about a second and a SIGKILL after the first checkpoint
lands inside an epoch.

Run as ``python -m tests.integration.fault_train_job CHECKPOINT OUT.json``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from pipelines.data.datasets import make_loader
from pipelines.model.stages import Stage
from pipelines.model.train import TrainConfig, fit
from tests.unit.model.test_train import _colour_images, _tiny_net

CONFIG = TrainConfig(epochs=4, lr=0.05, patience=10, ema_decay=0.9, time_budget_min=None, seed=3)
SLOW_IMAGE_S = 0.01  # 96 training images: ~1 s an epoch
CPU = torch.device("cpu")


class SlowImages(TensorDataset):
    def __getitem__(self, index):
        time.sleep(SLOW_IMAGE_S)
        return super().__getitem__(index)


def main(checkpoint: Path, out: Path) -> None:
    train_set = SlowImages(*_colour_images(96, 1).tensors)
    train = make_loader(train_set, batch_size=16, train=True, device=CPU, seed=CONFIG.seed, workers=0)
    val = make_loader(_colour_images(30, 2), batch_size=16, train=False, device=CPU, seed=CONFIG.seed, workers=0)
    stages = [Stage("full", CONFIG.epochs, CONFIG.lr, ("",))]
    result = fit(_tiny_net(), train, val, stages=stages, config=CONFIG, device=CPU, checkpoint_path=checkpoint)
    figures = {
        "resumed_from_epoch": result.resumed_from_epoch,
        "epochs": [r.epoch for r in result.history],
        "val_losses": [r.val_loss for r in result.history],
        "val_macro_f1": result.history[-1].val_macro_f1,
        "best_val_f1": result.best_val_f1,
    }
    out.write_text(json.dumps(figures))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
