"""Explanation speed: Grad-CAM and LIME seconds per image on MobileNetV2 at 224 px, against `lime` defaults.

Baseline (same process, same images, same seed): ``LimeImageExplainer().explain_instance`` with its
defaults (1000 samples, batch_size=10, quickshift) and a plain fp32 no-grad classifier_fn.
leukops LIME: the same explainer's sampling, kernel and ridge fit, with the neighbourhood built
vectorised, scored channels-last under inference_mode in batches of 64 (fp32, or bf16 autocast), and
(adaptive) stopped once the top-5 superpixel set is unchanged over two successive 100-sample chunks.
Agreement = |top-5 ∩ top-5| / 5 for the baseline's top class.

Run: .venv/bin/python benchmarks/explain.py [--images 1] [--device cpu]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from lime import lime_image

from pipelines.data.imagefacts import decode_image
from pipelines.model.backbones import create_backbone
from pipelines.model.preprocess import preprocessing_from, to_tensor_batch
from pipelines.trust.gradcam import gradcam
from pipelines.trust.lime_explainer import classifier_fn, lime_explain

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "all_taleqani"


def real_images(n: int) -> list[np.ndarray]:
    """n real 224-px ALL smear images, one per class in turn (deterministic)."""
    classes = sorted(p for p in SHARED.iterdir() if p.is_dir())
    files = [sorted(classes[i % len(classes)].iterdir())[i // len(classes)] for i in range(n)]
    return [decode_image(f.read_bytes()).rgb for f in files]


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)
    backbone = create_backbone("mobilenetv2_100", 4, pretrained=True, image_size=224)
    model = backbone.model.to(device).eval()
    prep = preprocessing_from(backbone.data_config)
    images = real_images(args.images)

    def to_tensor(imgs):
        return to_tensor_batch(list(imgs), prep)

    batch = to_tensor(images).to(device)
    gradcam(model, backbone.gradcam_layer, batch[:1])  # warm-up
    _, cam_s = timed(gradcam, model, backbone.gradcam_layer, batch)

    def baseline_fn(imgs: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return torch.softmax(model(to_tensor(imgs).to(device)), 1).cpu().numpy()

    fast_fn = classifier_fn(model, to_tensor, batch_size=64)
    bf16_fn = classifier_fn(model, to_tensor, batch_size=64, bf16=True)
    for fn in (fast_fn, bf16_fn):
        fn(np.stack(images[:1] * 8))  # warm-up (oneDNN primitive creation)
    rows = []
    for i, image in enumerate(images):
        explainer = lime_image.LimeImageExplainer(random_state=i)
        ref, ref_s = timed(explainer.explain_instance, image, baseline_fn, num_samples=args.samples, random_seed=i)
        label = int(ref.top_labels[0])
        ref_top = {int(k) for k, _ in sorted(ref.local_exp[label], key=lambda kv: -kv[1])[:5]}
        full, full_s = timed(lime_explain, image, fast_fn, num_samples=args.samples, seed=i, label=label)
        fast, fast_s = timed(lime_explain, image, fast_fn, num_samples=args.samples, seed=i, label=label, adaptive=True)
        bf16, bf16_s = timed(lime_explain, image, bf16_fn, num_samples=args.samples, seed=i, label=label, adaptive=True)
        rows.append(
            {
                "baseline_s": ref_s,
                "full_s": full_s,
                "adaptive_s": fast_s,
                "adaptive_samples": fast.samples_used,
                "agree_full": len(ref_top & set(full.top_superpixels(5))) / 5,
                "agree_adaptive": len(ref_top & set(fast.top_superpixels(5))) / 5,
                "bf16_adaptive_s": bf16_s,
                "bf16_samples": bf16.samples_used,
                "agree_bf16": len(ref_top & set(bf16.top_superpixels(5))) / 5,
                "superpixels": int(ref.segments.max()) + 1,
            }
        )
        print(f"image {i}: " + ", ".join(f"{k}={v:.3g}" for k, v in rows[-1].items()), flush=True)
    mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    print(
        f"\nMobileNetV2 224 px on {device} ({torch.get_num_threads()} threads), "
        f"weights: {'ImageNet' if backbone.pretrained else 'random init (no offline weights)'}"
    )
    print(f"Grad-CAM: {cam_s / len(images):.3f} s/image (batch of {len(images)})")
    print(f"LIME lime defaults (1000 samples, batch 10): {mean['baseline_s']:.2f} s/image")
    print(
        f"LIME leukops, 1000 samples:  {mean['full_s']:.2f} s/image  "
        f"speed-up {mean['baseline_s'] / mean['full_s']:.2f}x  top-5 agreement {mean['agree_full']:.2f}"
    )
    print(
        f"LIME leukops, adaptive:      {mean['adaptive_s']:.2f} s/image  "
        f"speed-up {mean['baseline_s'] / mean['adaptive_s']:.2f}x  top-5 agreement {mean['agree_adaptive']:.2f}"
        f"  (mean samples {mean['adaptive_samples']:.0f})"
    )
    print(
        f"LIME leukops, adaptive bf16: {mean['bf16_adaptive_s']:.2f} s/image  "
        f"speed-up {mean['baseline_s'] / mean['bf16_adaptive_s']:.2f}x  top-5 agreement {mean['agree_bf16']:.2f}"
        f"  (mean samples {mean['bf16_samples']:.0f})"
    )


if __name__ == "__main__":
    main()
