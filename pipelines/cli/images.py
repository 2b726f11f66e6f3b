"""`leukops synth` (synthetic smears + nucleus masks) and `leukops segment` (score the nucleus segmenter)."""

from __future__ import annotations

import argparse

from pipelines.cli import Output, add_command


def register(sub: argparse._SubParsersAction) -> None:
    from pipelines.core.taxonomy import TASKS

    synth = add_command(sub, "synth", "write synthetic smear images with ground-truth nucleus masks", _synth)
    synth.add_argument("--out", required=True, help="output folder (images/, masks/, synth.json)")
    synth.add_argument("--task", required=True, choices=sorted(TASKS))
    synth.add_argument("--per-class", type=int, default=20, help="images per class (default 20)")
    synth.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--shortcut", choices=["corner"], default=None, help="plant a class-dependent corner label")

    segment = add_command(sub, "segment", "score the nucleus segmenter against expert masks (Dice per image)", _segment)
    segment.add_argument("--images", required=True, help="image folder (sub-folders allowed)")
    segment.add_argument("--masks", required=True, help="mask folder mirroring --images, same file stems")
    segment.add_argument("--nucleus-value", type=int, default=255, help="mask value marking nucleus (default 255)")


def _synth(args: argparse.Namespace) -> Output:
    from pipelines.devstack.synthetic import write_synthetic

    summary = write_synthetic(args.out, args.task, args.per_class, args.size, args.seed, args.shortcut)
    data = summary.to_dict()
    shortcut = f", shortcut={summary.shortcut}" if summary.shortcut else ""
    text = (
        f"wrote {summary.n_images} images ({summary.per_class} per class x {len(summary.classes)} classes, "
        f"{summary.size} px, seed {summary.seed}{shortcut})\n"
        f"images {summary.images_dir}\nmasks  {summary.masks_dir}"
    )
    return Output(data, text)


def _segment(args: argparse.Namespace) -> Output:
    from pipelines.model.segmentation import score_folder

    report = score_folder(args.images, args.masks, nucleus_value=args.nucleus_value)
    text = (
        f"{report['n']} images scored: Dice mean {report['dice_mean']:.3f}, "
        f"median {report['dice_median']:.3f}"
        + "".join(f"\n  {label}: {v['dice_mean']:.3f} (n={v['n']})" for label, v in report["per_folder"].items())
        + (f"\n{len(report['unmatched_images'])} images without a mask" if report["unmatched_images"] else "")
        + (f"\n{len(report['unmatched_masks'])} masks without an image" if report["unmatched_masks"] else "")
        + "".join(f"\nskipped: {error}" for error in report["errors"])
    )
    return Output(report, text)
