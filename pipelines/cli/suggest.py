"""`leukops suggest-labels`: which of a new lab's unlabelled images to label first, as a CSV for the lab.

The pool is a registered source's location (``--source``: every file under it, whatever its layout; the
images its published batches already accepted with a label are skipped), a local folder (``--folder``)
or the serving request log of a date window (``--requests FROM..TO``: only requests whose image was kept,
``serving.log_raw_images``). The model is loaded the way ``leukops evaluate`` loads it: ``champion`` is
verified first (`pipelines.trust.attestation.load_verified`: the newest attested promotion, read from
the very files whose hashes were checked), other aliases and run ids are loaded as evaluate loads them.
The ranking is `pipelines.model.suggest.rank_for_labelling`. Every file is one CSV row: suggested (rank
1..n), ranked lower, or skipped with the reason (unreadable, not an image, same bytes as another file,
already labelled); images are decoded and scored a batch at a time, so a large folder is never held
in memory at once.
"""

from __future__ import annotations

import argparse
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipelines.cli import Output, add_command
from pipelines.core.errors import LeukopsError

if TYPE_CHECKING:
    import pandas as pd

    from pipelines.core.settings import Settings
    from pipelines.model.bundle import LoadedModel

CSV_COLUMNS = (
    "rank",
    "item",
    "sha256",
    "status",
    "entropy",
    "margin",
    "predicted_class",
    "second_class",
    "top2",
    "why",
)


@dataclass(frozen=True)
class PoolEntry:
    """One file of the pool: how the lab names it, and how to get its bytes (raises a LeukopsError or
    OSError saying why not)."""

    item: str
    read: Callable[[], bytes] | None  # None: not read at all, ``skip`` says why
    skip: str | None = None  # hidden, outside the folder, no image kept


@dataclass
class ScoredPool:
    """The rows of every entry, and the model's outputs for the scored ones (row numbers in ``scored``)."""

    rows: list[dict[str, Any]]
    scored: list[int]
    probs: np.ndarray
    embeddings: np.ndarray


def register(sub: argparse._SubParsersAction) -> None:
    parser = add_command(
        sub,
        "suggest-labels",
        "rank a new lab's unlabelled images by how much labelling them should help (CSV for the lab)",
        _suggest,
    )
    pool = parser.add_mutually_exclusive_group(required=True)
    pool.add_argument("--source", help="a registered source: every file under its location")
    pool.add_argument("--folder", type=Path, help="a local folder of images (searched recursively)")
    pool.add_argument("--requests", metavar="FROM..TO", help="the serving request log of these UTC dates")
    parser.add_argument("--n", type=int, default=20, help="how many images to suggest (default 20)")
    parser.add_argument("--task", help="the task (default: the source's only task; needed with an alias)")
    parser.add_argument("--model", default="champion", help="champion (default) | previous | challenger | run id")
    parser.add_argument("--out", type=Path, help="CSV path (default: ./suggested-labels-<pool>.csv)")
    parser.add_argument("--seed", type=int, default=0, help="breaks exact ties in uncertainty (default 0)")


def _suggest(args: argparse.Namespace) -> Output:
    from pipelines.core.settings import get_settings
    from pipelines.model.suggest import rank_for_labelling

    if args.n < 1:
        raise LeukopsError(f"--n must be at least 1, got {args.n}")
    settings = get_settings()
    task, pool_name, entries, labelled = _pool(settings, args)
    loaded, attestation = load_ranking_model(settings, args.model, task)
    pool = score_pool(loaded, entries, labelled)
    picks = rank_for_labelling(pool.probs, pool.embeddings, args.n, args.seed) if pool.scored else []
    frame = suggestion_frame(pool, picks, args.seed)
    out = args.out or Path(f"suggested-labels-{pool_name}.csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out, index=False)
    counts = frame["status"].value_counts().to_dict()
    data = {
        "csv": str(out.resolve()),
        "task": loaded.task,
        "run_id": loaded.run_id,
        "model": args.model,
        "attestation": attestation,
        "pool": pool_name,
        "files": len(frame),
        "suggested": counts.get("suggested", 0),
        "ranked_lower": counts.get("ranked lower", 0),
        "skipped": counts.get("skipped", 0),
    }
    return Output(data, _human(data, frame))


def _human(data: dict[str, Any], frame: pd.DataFrame) -> str:
    top = frame[frame["status"] == "suggested"].head(5)
    lines = [
        f"{data['suggested']} of {data['files']} files suggested for labelling ({data['pool']}, task {data['task']},"
        f" run {data['run_id']}); {data['skipped']} skipped, {data['ranked_lower']} ranked lower",
        *(f"  {int(r['rank']):>3}. {r['item']}  {r['top2']}" for _, r in top.iterrows()),
        f"wrote {data['csv']}",
    ]
    return "\n".join(lines)


# -- the pool -------------------------------------------------------------------------------------------------


def _pool(settings: Settings, args: argparse.Namespace) -> tuple[str | None, str, list[PoolEntry], dict[str, str]]:
    """(task, a name for the pool, its entries, sha256 → label of images already labelled)."""
    from pipelines.data.sources import LocalReader, load_source, reader_for

    if args.requests:
        if not args.task:
            raise LeukopsError("--requests reads the log of one task's served model: pass --task")
        return args.task, f"requests-{args.requests}", request_entries(settings, args.task, args.requests), {}
    if args.folder:
        return args.task, args.folder.name or "folder", reader_entries(LocalReader(args.folder)), {}
    source = load_source(args.source, settings)
    task = args.task or (source.tasks[0] if len(source.tasks) == 1 else None)
    if task is None:
        raise LeukopsError(f"source {source.name!r} feeds tasks {list(source.tasks)}: pass --task")
    return task, source.name, reader_entries(reader_for(source, settings)), labelled_images(settings, source.name)


def reader_entries(reader) -> list[PoolEntry]:
    """Every file under a source reader's root (`pipelines.data.sources.LocalReader` / ``S3Reader``):
    hidden ones, symlinks leading out and folders that cannot be listed are entries with the reason."""
    paths, unlisted = reader.listing()
    entries = [PoolEntry(folder, None, skip=why) for folder, why in unlisted.items()]
    for rel in sorted(paths):
        if any(part.startswith(".") for part in rel.rstrip("/").split("/")):
            entries.append(PoolEntry(rel, None, skip="hidden file or folder: not read"))
        elif reader.escapes(rel):
            entries.append(PoolEntry(rel, None, skip="symlink leads outside the folder: not read"))
        else:
            entries.append(PoolEntry(rel, lambda rel=rel: reader.read(rel)))
    return entries


def request_entries(settings: Settings, task: str, window: str) -> list[PoolEntry]:
    """One entry per logged request of ``task`` in the window; its image when serving kept it."""
    from pipelines.io.storage import ObjectStore
    from pipelines.monitor.inputs import serving_rows

    store = ObjectStore.from_settings(settings)
    rows = serving_rows(store, task, window)
    no_image = "serving kept no image of this request (serving.log_raw_images is off)"
    entries = []
    for _, row in rows.iterrows():
        key = row.get("image_key")
        if isinstance(key, str) and key:
            entries.append(PoolEntry(f"request {row['request_id']}", lambda key=key: store.get_bytes(key)))
        else:
            entries.append(PoolEntry(f"request {row['request_id']}", None, skip=no_image))
    return entries


def labelled_images(settings: Settings, source_name: str) -> dict[str, str]:
    """sha256 → label of the source's images its published batches accepted (already labelled)."""
    from pipelines.data.manifests import accepted_rows
    from pipelines.io.storage import ObjectStore

    rows = accepted_rows(ObjectStore.from_settings(settings), source_name)
    return dict(zip(rows["sha256"], rows["label"], strict=True)) if len(rows) else {}


# -- the model ------------------------------------------------------------------------------------------------


def load_ranking_model(settings: Settings, model: str, task: str | None) -> tuple[LoadedModel, dict | None]:
    """(the model, its verified attestation summary or None): ``champion`` verified as serving and
    ``leukops evaluate`` verify it; another alias or a run id loaded as evaluate loads it."""
    from pipelines.io.registry import ALIASES
    from pipelines.model.bundle import load_model
    from pipelines.model.holdout import model_uri

    if model in ALIASES and not task:
        raise LeukopsError(f"--model {model} names an alias of a task's registered model: pass --task")
    if model == "champion":
        return _verified_champion(settings, task)
    loaded = load_model(model_uri(settings, model, task or ""), settings=settings)
    if task and loaded.task != task:
        raise LeukopsError(f"model {model!r} was trained for task {loaded.task!r}, not {task!r}")
    return loaded, None


def _verified_champion(settings: Settings, task: str) -> tuple[LoadedModel, dict]:
    from pipelines.io.registry import Registry
    from pipelines.trust.attestation import AttestationError, load_verified, verifying_key

    registry = Registry.from_settings(settings)
    champion = registry.champion(task)
    if champion is None:
        raise AttestationError(f"{settings.registered_model_name(task)} has no @champion version")
    loaded, statement = load_verified(registry, settings, task, champion.version, verifying_key(settings), 0)
    return loaded, statement.summary() | {"version": champion.version}


# -- scoring --------------------------------------------------------------------------------------------------


def decoded_batches(
    entries: list[PoolEntry], labelled: dict[str, str], batch: int
) -> Iterator[tuple[list[dict[str, Any]], list[tuple[int, np.ndarray]]]]:
    """Per ``batch`` entries: their rows (skipped ones with the reason) and (row offset, RGB) of the ones
    to score. A file whose bytes an earlier file had is skipped as a duplicate: one label covers both."""
    from pipelines.data.imagefacts import decode_image

    first_item: dict[str, str] = {}
    for start in range(0, len(entries), batch):
        rows, images = [], []
        for offset, entry in enumerate(entries[start : start + batch]):
            row = {"item": entry.item, "sha256": None, "status": "skipped", "why": entry.skip}
            rows.append(row)
            if entry.read is None:
                continue
            try:
                data = entry.read()
                row["sha256"] = hashlib.sha256(data).hexdigest()
                if row["sha256"] in first_item:
                    row["why"] = f"same bytes as {first_item[row['sha256']]}: label that one"
                elif row["sha256"] in labelled:
                    row["why"] = f"already labelled {labelled[row['sha256']]!r} in the source's accepted batches"
                else:
                    images.append((offset, decode_image(data).rgb))
                first_item.setdefault(row["sha256"], entry.item)
            except (LeukopsError, OSError) as err:
                row["why"] = f"not read: {err}"
        yield rows, images


def score_pool(loaded: LoadedModel, entries: list[PoolEntry], labelled: dict[str, str]) -> ScoredPool:
    """Decode and score the pool a batch at a time (probabilities + embeddings of the same forward pass)."""
    from pipelines.model.suggest import SCORE_BATCH, model_scores

    rows: list[dict[str, Any]] = []
    scored: list[int] = []
    probs, embeddings = [], []
    for batch_rows, images in decoded_batches(entries, labelled, SCORE_BATCH):
        if images:
            batch_probs, batch_embeddings = model_scores(loaded, [rgb for _, rgb in images])
            probs.append(batch_probs)
            embeddings.append(batch_embeddings)
            scored += [len(rows) + offset for offset, _ in images]
        rows += batch_rows
    for row_number, p in zip(scored, np.concatenate(probs) if probs else [], strict=True):
        rows[row_number] |= _prediction(p, loaded.classes)
    return ScoredPool(
        rows,
        scored,
        np.concatenate(probs) if probs else np.zeros((0, len(loaded.classes))),
        np.concatenate(embeddings) if embeddings else np.zeros((0, 0)),
    )


def _prediction(p: np.ndarray, classes: list[str]) -> dict[str, Any]:
    first, second = np.argsort(-p, kind="stable")[:2]  # every task has at least two classes
    return {
        "predicted_class": classes[first],
        "second_class": classes[second],
        "top2": f"{classes[first]} {p[first]:.2f} | {classes[second]} {p[second]:.2f}",
    }


def suggestion_frame(pool: ScoredPool, picks: list, seed: int = 0) -> pd.DataFrame:
    """The CSV: suggestions by rank, then the other scored images (most uncertain first), then the skipped."""
    import pandas as pd

    from pipelines.model.suggest import predictive_entropy, top2_margin, uncertainty_order

    rows = [dict(row) for row in pool.rows]
    if pool.scored:
        entropy, margin = predictive_entropy(pool.probs), top2_margin(pool.probs)
        for position, row_number in enumerate(pool.scored):
            rows[row_number] |= {
                "entropy": round(float(entropy[position]), 4),
                "margin": round(float(margin[position]), 4),
            }
        picked = {pick.index for pick in picks}
        order = uncertainty_order(pool.probs, seed)
        for uncertainty_rank, position in enumerate(order, start=1):
            if position not in picked:
                why = f"not among the {len(picks)} picks (uncertainty rank {uncertainty_rank})"
                rows[pool.scored[position]] |= {"status": "ranked lower", "why": why, "_order": uncertainty_rank}
        for pick in picks:
            rows[pool.scored[pick.index]] |= {"rank": pick.rank, "status": "suggested", "why": pick.reason}
    frame = pd.DataFrame(rows).reindex(columns=[*CSV_COLUMNS, "_order"])
    frame["_status_order"] = frame["status"].map({"suggested": 0, "ranked lower": 1, "skipped": 2})
    frame = frame.sort_values(["_status_order", "rank", "_order"], kind="stable", na_position="last")
    return frame.drop(columns=["_order", "_status_order"]).astype({"rank": "Int64"}).reset_index(drop=True)
