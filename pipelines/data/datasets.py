"""Snapshot rows → a local content-addressed image cache → torch Datasets and DataLoaders.

Training reads every image many times; S3 is read once per image per machine. The cache mirrors the
raw layout (``<state_dir>/cache/sha256/ab/cd/<sha>.<ext>``), so a file's name is its identity: a cached
file is re-verified against its sha256 when fetched and written atomically (temp file + rename), so a
crash never leaves a half-written image that a later run would trust.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import random
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from pipelines.core.errors import LeukopsError
from pipelines.data.imagefacts import decode_image

if TYPE_CHECKING:
    from pipelines.io.storage import ObjectStore

RgbTransform = Callable[[np.ndarray], torch.Tensor]
# Prepared (cropped, resized) training and validation images are kept in memory up to this size: 1,500
# wbc images at 128 px are 74 MB and spare ~15 ms of decode + cell crop per image per epoch, which on two
# CPU cores (or an Airflow worker that may not fork loader workers) is a third of the step time.
MAX_PREPARED_BYTES = 2 << 30


class CacheIntegrityError(LeukopsError):
    """Bytes fetched from S3 do not hash to the sha256 the snapshot names."""


class SplitMissingError(LeukopsError):
    """A snapshot has no rows for a split the training run needs."""


def cache_path(cache_root: Path, sha256: str, key: str) -> Path:
    """Where the bytes of image ``sha256`` live locally (the fan-out of ``layout.raw_key``)."""
    ext = Path(key).suffix.lower() or ".bin"
    return cache_root / "sha256" / sha256[:2] / sha256[2:4] / f"{sha256}{ext}"


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fetch_one(store: ObjectStore, cache_root: Path, sha256: str, key: str) -> Path:
    path = cache_path(cache_root, sha256, key)
    if path.exists():
        return path
    data = store.get_bytes(key)
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha256:
        raise CacheIntegrityError(f"{store.uri(key)} hashes to {actual}, but the snapshot names {sha256}")
    _write_atomic(path, data)
    return path


def fill_cache(store: ObjectStore, frame: pd.DataFrame, cache_root: Path, threads: int = 8) -> list[Path]:
    """Download the not-yet-cached images of ``frame`` (sha256, key); return local paths in row order."""
    pairs = list(zip(frame["sha256"], frame["key"], strict=True))
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(lambda pair: _fetch_one(store, cache_root, *pair), pairs))


class ImageFileDataset(Dataset):
    """Images on local disk with integer labels; each item is ``(transform(rgb), label)``."""

    def __init__(self, paths: Sequence[Path], labels: Sequence[int], transform: RgbTransform) -> None:
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
        self.paths = [Path(p) for p in paths]
        self.labels = [int(y) for y in labels]
        self.transform = transform
        self.prepared: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if self.prepared is not None:
            return self.transform.finish(Image.fromarray(self.prepared[index])), self.labels[index]
        rgb = decode_image(self.paths[index].read_bytes()).rgb
        return self.transform(rgb), self.labels[index]

    def keep_prepared(self, max_bytes: int = MAX_PREPARED_BYTES) -> bool:
        """Prepare every image once and keep it, when the transform splits its deterministic part
        (``prepare``: decode is ours, then ROI/cell crop, resize, stain normalisation) from its random one
        (``finish``) and the images fit in ``max_bytes``: later epochs only flip, augment and normalise.
        Call it before the loader forks its workers (they inherit the kept images)."""
        prepare, size = getattr(self.transform, "prepare", None), getattr(self.transform, "prepared_bytes", None)
        if prepare is None or size is None or size * len(self) > max_bytes:
            return False
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # decode, OpenCV and PIL free the GIL
            self.prepared = list(
                pool.map(lambda path: np.asarray(prepare(decode_image(path.read_bytes()).rgb)), self.paths)
            )
        return True


def split_rows(frame: pd.DataFrame, split: str) -> pd.DataFrame:
    rows = frame[frame["split"] == split]
    if rows.empty:
        raise SplitMissingError(
            f"the snapshot has no {split!r} rows (splits present: {sorted(frame['split'].unique())})"
        )
    return rows.reset_index(drop=True)


def label_indices(labels: Sequence[str], classes: Sequence[str]) -> list[int]:
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted(set(labels) - set(index))
    if unknown:
        raise LeukopsError(f"labels {unknown} are not classes of this task ({list(classes)})")
    return [index[label] for label in labels]


def limit_rows(frame: pd.DataFrame, max_images: int | None) -> pd.DataFrame:
    """A deterministic, split- and class-stratified subset of at most ``max_images`` rows.

    Rows are ordered by sha256 (uniformly random but stable); every (split, class) cell keeps its share
    (largest-remainder rounding) and at least one row while the budget allows, so a tiny run still sees
    every class it can.
    """
    if max_images is None or len(frame) <= max_images:
        return frame.reset_index(drop=True)
    ordered = frame.sort_values("sha256")
    cells = [cell for _, cell in ordered.groupby(["split", "label"], sort=True)]
    quotas = _cell_quotas([len(cell) for cell in cells], max_images)
    kept = [cell.head(quota) for cell, quota in zip(cells, quotas, strict=True) if quota]
    return pd.concat(kept).sort_values("sha256").reset_index(drop=True)


def _cell_quotas(sizes: list[int], budget: int) -> list[int]:
    """Per-cell row counts summing to ``budget`` (< sum(sizes)): proportional, one per cell first."""
    exact = [size * budget / sum(sizes) for size in sizes]
    quotas = [min(size, max(1, int(share))) for size, share in zip(sizes, exact, strict=True)]
    while sum(quotas) > budget:  # the one-per-cell floor overshot: take from the largest cells first
        quotas[max((i for i in range(len(quotas)) if quotas[i]), key=lambda i: (quotas[i], sizes[i]))] -= 1
    by_remainder = sorted(range(len(sizes)), key=lambda i: exact[i] - quotas[i], reverse=True)
    for i in by_remainder:
        if sum(quotas) == budget:
            break
        if quotas[i] < sizes[i]:
            quotas[i] += 1
    return quotas


def make_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    train: bool,
    device: torch.device,
    seed: int,
    workers: int | None = None,
    sample_weights: Sequence[float] | None = None,
) -> DataLoader:
    """A DataLoader that keeps the device fed: worker processes, pinned memory and prefetch on CUDA.

    On CPU the decode workers would compete with the training threads for the same cores, so it uses
    at most one worker there. Shuffling draws from a seeded generator, so a run is reproducible; with
    ``sample_weights`` a training epoch is ``len(dataset)`` draws with replacement from those weights
    (the same generator, so a resumed run replays them too).
    """
    cuda = device.type == "cuda"
    if workers is None:
        workers = min(8, os.cpu_count() or 1) if cuda else min(1, (os.cpu_count() or 1) - 1)
    if multiprocessing.current_process().daemon:  # a Celery prefork child (Airflow's workers) may not fork
        workers = 0
    generator = torch.Generator().manual_seed(seed)
    sampler = None
    if train and sample_weights is not None:
        sampler = WeightedRandomSampler(list(sample_weights), len(dataset), replacement=True, generator=generator)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train and sampler is None,
        sampler=sampler,
        drop_last=train and len(dataset) > batch_size,
        num_workers=workers,
        pin_memory=cuda,
        # Workers restart each epoch and take their seeds from the generator the loop reseeds per epoch,
        # so a resumed run replays the same shuffles and augmentations (persistent workers would not).
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
        generator=generator,
        worker_init_fn=_seed_worker,
    )


def site_weights(sources: Sequence[str], balance: float) -> list[float] | None:
    """Per-image draw weights ``n_site ** -balance`` (normalised), or None when there is one site or
    ``balance`` is 0. 0.5 lets a 50-image lab beside 1,300 images of another make ~1/6 of the draws
    instead of 1/27, without repeating its few images as often as equal weighting (1) would."""
    counts = Counter(sources)
    if len(counts) < 2 or balance == 0:
        return None
    raw = [counts[s] ** -balance for s in sources]
    total = sum(raw)
    return [w / total for w in raw]


def _seed_worker(worker_id: int) -> None:
    """Seed each worker's numpy/random from torch's per-worker seed (augmentations draw from them)."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
