"""fp32 (the released code's default) against bf16 (this project's default on GPUs) on Stable Diffusion v1's
architecture: the SepEn loss, its gradient on the keys, and sampled images.

    python benchmarks/precision_check.py --image-size 128 --out benchmarks/results/precision_cpu   # CPU, see below
    python benchmarks/precision_check.py --out benchmarks/results/precision --device cuda --size 512

The weights are random (no machine here can download SD's), so the images are noise: what is measured is how far
the low-precision computation drifts from the float32 one on the real architecture and sizes, not image quality.
Writes precision.json (with the device) and precision.md. On a CPU without AVX512-BF16 (e.g. AVX2 only) bf16 is
emulated: with --image-size 128 the run took 22 minutes of one thread (benchmarks/results/precision_cpu); with
256 px images it ran over an hour (the bf16 autoencoder decode is most of it); on a GPU, seconds. precision.json is
written after the step's measurement as well, so a stopped run keeps it.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from sae_utils.finetune import FinetuneConfig, Finetuner
from sae_utils.models import sd_v1_pipeline


def step_terms(pipe, precision: str, size: int, device: str) -> dict:
    """The SepEn terms of one fixed batch and the gradient of the loss on every trainable key tensor."""
    config = FinetuneConfig(model="sd-v1-random", pairs=[("cat", "dog")], device=device, image_size=size,
                            mixed_precision=precision, batch_size=2)
    finetuner = Finetuner(config, pipeline=pipe, resume=False)
    inputs = finetuner.step_inputs()
    with finetuner.capturing():
        losses = finetuner.step_losses(inputs)
        losses["loss"].backward()
    grads = torch.cat([p.grad.float().flatten() for p in finetuner.parameters if p.grad is not None]).cpu()
    finetuner.optimizer.zero_grad(set_to_none=True)
    finetuner.finish()
    return {"loss": float(losses["loss"]), "separate": float(losses["separate"]),
            "enhance": float(losses["enhance"]), "grad": grads}


def images(pipe, size: int, steps: int) -> np.ndarray:
    out = pipe(["a photo of a cat and a dog"] * 2, height=size, width=size, num_inference_steps=steps,
               guidance_scale=7.5, generator=[torch.Generator().manual_seed(s) for s in (0, 1)], output_type="np")
    return out.images


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=256, help="pixels (the architecture is the same at any size)")
    parser.add_argument("--sampling-steps", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=0,
                        help="pixels for the sampled images (default: --size); on an AVX2 CPU 128 keeps the emulated "
                             "bf16 decode to minutes")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    low = "bf16"
    results = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else
               f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)", "torch": torch.__version__,
               "size": args.size, "image_size": args.image_size or args.size, "low_precision": low}
    fp32 = step_terms(sd_v1_pipeline(args.device, torch.float32), "no", args.size, args.device)
    half = step_terms(sd_v1_pipeline(args.device, torch.bfloat16), low, args.size, args.device)
    cosine = torch.nn.functional.cosine_similarity(fp32["grad"], half["grad"], dim=0).item()
    relative = ((half["grad"] - fp32["grad"]).norm() / fp32["grad"].norm()).item()
    results["step"] = {k: {"fp32": fp32[k], low: half[k], "difference": half[k] - fp32[k]}
                       for k in ("loss", "separate", "enhance")}
    results["gradient"] = {"cosine": cosine, "relative_l2_error": relative,
                           "tensors_elements": int(fp32["grad"].numel())}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "precision.json").write_text(json.dumps(results, indent=1) + "\n")  # the images come next (slow on a CPU)
    a = images(sd_v1_pipeline(args.device, torch.float32), results["image_size"], args.sampling_steps)
    b = images(sd_v1_pipeline(args.device, torch.bfloat16), results["image_size"], args.sampling_steps)
    difference = np.abs(a.astype(np.float64) - b.astype(np.float64)) * 255
    results["images"] = {"sampling_steps": args.sampling_steps, "mean_abs_grey_levels": float(difference.mean()),
                         "max_abs_grey_levels": float(difference.max()),
                         "share_of_pixels_off_by_more_than_8": float((difference > 8).mean())}
    results["seconds"] = round(time.perf_counter() - start)
    (out / "precision.json").write_text(json.dumps(results, indent=1) + "\n")
    s, g, im = results["step"], results["gradient"], results["images"]
    (out / "precision.md").write_text(
        f"# fp32 vs {low} on SD v1's architecture (random weights, {args.size} px), {results['device']}\n\n"
        f"| quantity | fp32 | {low} | difference |\n|---|---|---|---|\n"
        + "".join(f"| {k} | {v['fp32']:.6f} | {v[low]:.6f} | {v['difference']:+.2e} |\n" for k, v in s.items())
        + f"\nGradient on the trainable keys: cosine {g['cosine']:.5f}, relative L2 error {g['relative_l2_error']:.3e}."
        f"\n\nImages ({results['image_size']} px, {im['sampling_steps']} steps, 2 seeds): "
        f"mean |difference| {im['mean_abs_grey_levels']:.2f} grey "
        f"levels, max {im['max_abs_grey_levels']:.0f}, {100 * im['share_of_pixels_off_by_more_than_8']:.1f} % of "
        f"pixels off by more than 8.\n")
    print((out / "precision.md").read_text())


if __name__ == "__main__":
    main()
