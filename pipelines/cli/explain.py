"""`leukops explain`: Grad-CAM / LIME localization and the causal shortcut test for a training run."""

from __future__ import annotations

import argparse

from pipelines.cli import Output, add_command


def register(sub: argparse._SubParsersAction) -> None:
    parser = add_command(
        sub,
        "explain",
        "explain a training run's model on a seeded sample of its test split and log the results to the run",
        _explain,
    )
    parser.add_argument("--run-id", required=True, help="MLflow run id of a training run")
    parser.add_argument("--samples", type=int, default=32, help="test images to explain (default 32)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample and of LIME (default 0)")
    parser.add_argument("--lime-images", type=int, default=3, help="images explained with LIME (default 3)")


def _explain(args: argparse.Namespace) -> Output:
    from pipelines.trust.explain import explain_run

    report = explain_run(args.run_id, samples=args.samples, seed=args.seed, lime_images=args.lime_images)
    data = {key: report[key] for key in ("run_id", "n_images", "gradcam", "lime", "shortcut", "segmentation")}
    data["gradcam"] = {k: v for k, v in data["gradcam"].items() if k != "per_class"}
    data["shortcut"] = {k: v for k, v in data["shortcut"].items() if k != "regions"}
    data["artifacts"] = report["artifacts"]
    return Output(data, _human(data))


def _human(data: dict) -> str:
    cam, lime, cut = data["gradcam"], data["lime"], data["shortcut"]

    def num(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    return "\n".join(
        [
            f"run {data['run_id']}: {data['n_images']} test images",
            f"Grad-CAM  nucleus mass {num(cam['nucleus_mass'])} (enrichment {num(cam['nucleus_enrichment'])}),"
            f" pointing game {num(cam['pointing_game'])}, artefact mass {num(cam['artefact_mass'])}"
            f" (enrichment {num(cam['artefact_enrichment'])})",
            f"LIME      {lime['n']} images, nucleus mass {num(lime['nucleus_mass'])}",
            f"shortcut  flip rate {num(cut['flip_rate'])} ({cut['worst_region']} {cut['worst_intervention']}), "
            f"macro-F1 drop {num(cut['f1_drop'])} ({cut['f1_drop_region']} {cut['f1_drop_intervention']})",
            "logged: " + ", ".join(data["artifacts"]),
        ]
    )
