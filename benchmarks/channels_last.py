"""Training throughput by memory layout: the product's `fit` in channels_last (as shipped) vs contiguous NCHW.

Each backbone is built by the product's factory (`create_backbone`, random init: the layout, not the
weights, is what is timed) and trained by the product's `fit` for a fixed number of epochs on the same
synthetic batches, once per layout; the baseline sets `pipelines.model.devices.MEMORY_FORMAT`, the one
place the layout is chosen, to contiguous. Printed per backbone and size: training img/s of each
(`FitResult.images_per_s`, the first epoch, which pays the loader's start-up, left out) and their ratio.

    .venv/bin/python benchmarks/channels_last.py                      # efficientnet_lite0 160, mobilenetv2_100 96
    .venv/bin/python benchmarks/channels_last.py --backbones resnet50:128 --epochs 3
"""

from __future__ import annotations

import argparse
import os

import torch
from torch.utils.data import TensorDataset

from pipelines.data.datasets import make_loader
from pipelines.model import devices
from pipelines.model.backbones import create_backbone
from pipelines.model.devices import pick_device
from pipelines.model.stages import fine_tuning_stages
from pipelines.model.train import TrainConfig, fit

LAYOUTS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}


def images_per_s(name: str, size: int, layout: str, *, epochs: int, images: int, batch: int) -> float:
    """Training img/s of the product's fit with ``layout``, epochs after the first."""
    devices.MEMORY_FORMAT = LAYOUTS[layout]
    torch.manual_seed(0)
    backbone = create_backbone(name, 8, pretrained=False, image_size=size)
    data = TensorDataset(torch.randn(images, 3, size, size), torch.arange(images) % 8)
    device = pick_device()
    loaders = [make_loader(data, batch_size=batch, train=train, device=device, seed=0) for train in (True, False)]
    config = TrainConfig(epochs=epochs, time_budget_min=None, patience=epochs)
    result = fit(
        backbone.model,
        *loaders,
        stages=fine_tuning_stages(config, pretrained=False, head=()),
        config=config,
        device=device,
    )
    later = result.history[1:]
    return sum(r.images for r in later) / sum(r.train_seconds for r in later)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=["efficientnet_lite0:160", "mobilenetv2_100:96"])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    print(f"device {pick_device()}, torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}")
    for item in args.backbones:
        name, size = item.split(":")
        rates = {
            layout: images_per_s(name, int(size), layout, epochs=args.epochs, images=args.images, batch=args.batch_size)
            for layout in ("contiguous", "channels_last")
        }
        ratio = rates["channels_last"] / rates["contiguous"]
        print(
            f"{name} {size} px: contiguous {rates['contiguous']:.1f} img/s, channels_last "
            f"{rates['channels_last']:.1f} img/s, ratio {ratio:.2f}"
        )


if __name__ == "__main__":
    main()
