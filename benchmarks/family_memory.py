"""Measure the memory presets of every model family (sae_utils.memory) on a GPU: what the README calls estimates.

    python benchmarks/family_memory.py --out benchmarks/results/family_memory  # a CUDA GPU, about 10 minutes
    python benchmarks/family_memory.py --smoke --out /tmp/family_memory      # CPU: the twins, the code path (2 min)

For SD 1.x, SD 2.x and SDXL, and each card ("t4": a 15 GiB cap, fp16; "24gb": a 24 GiB cap), it builds the family's
full architecture with random weights on the GPU (`families.full_size_pipeline`: memory and speed depend on the
architecture, not the weights), caps the process's memory at the card's size (`set_per_process_memory_fraction`)
and runs the preset's training steps: whether it fits, the peak allocated and reserved memory, seconds per step.
Each preset's alternatives (SDXL on a T4: 768 px) run too. Writes family_memory.json and family_memory.md; copy
the measured peaks into sae_utils/memory.py (status "measured") and README's Supported models.
"""
from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch

from sae_utils.families import FAMILY_NAMES, TINY_MODELS, full_size_pipeline
from sae_utils.finetune import FinetuneConfig, Finetuner
from sae_utils.memory import CARDS, memory_preset
from sae_utils.models import load_pipeline

GIB = 2 ** 30
CAPS_GIB = {"t4": 15, "24gb": 24}


def measure(family: str, card: str, label: str, settings: dict, smoke: bool, steps: int) -> dict:
    cuda = not smoke
    row = {"family": family, "card": card, "run": label, "settings": settings}
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, CAPS_GIB[card] * GIB / total))
    settings = dict(settings, mixed_precision="no") if smoke else dict(settings)
    if smoke and "image_size" in settings:  # the twin's images are a sixteenth of the family's side
        settings["image_size"] = settings["image_size"] // 16
    precision = settings.get("mixed_precision", "auto")
    dtype = torch.float32 if smoke else torch.float16 if precision == "fp16" else torch.bfloat16
    try:
        pipe = load_pipeline({v: k for k, v in TINY_MODELS.items()}[family] if family != "sd1" else "tiny",
                             device="cpu") if smoke else full_size_pipeline(family, "cuda", dtype)
        config = FinetuneConfig(model=f"{family} (random weights)", pairs=[("cat", "dog")], steps=10 ** 6,
                                device="cpu" if smoke else "cuda", **settings)
        finetuner = Finetuner(config, pipeline=pipe, resume=False)
        with finetuner.capturing():
            finetuner.train_step()  # warm-up
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(steps):
                entry = finetuner.train_step()
            if cuda:
                torch.cuda.synchronize()
        row |= {"fits": True, "seconds_per_step": round((time.perf_counter() - start) / steps, 4),
                "loss": entry["loss"]}
        if cuda:
            row |= {"peak_allocated_gib": round(torch.cuda.max_memory_allocated() / GIB, 2),
                    "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 2)}
        del finetuner, pipe
    except torch.OutOfMemoryError as error:
        row |= {"fits": False, "error": str(error)[:200]}
    finally:
        if cuda:
            torch.cuda.set_per_process_memory_fraction(1.0)
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--smoke", action="store_true", help="CPU, the twins, fp32: checks the code path only")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--families", nargs="+", default=list(FAMILY_NAMES))
    args = parser.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("family_memory.py measures GPU memory: run it on a CUDA GPU, or pass --smoke.")
    rows = []
    for family in args.families:
        for card in CARDS:
            preset = memory_preset(family, card)
            for label, settings in {"preset": preset.settings, **preset.alternatives}.items():
                rows.append(measure(family, card, label, settings, args.smoke, 1 if args.smoke else args.steps))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = "cpu (smoke: twins, fp32)" if args.smoke else torch.cuda.get_device_name(0)
    (out / "family_memory.json").write_text(json.dumps({"device": device, "torch": torch.__version__,
                                                        "rows": rows}, indent=1))
    lines = [f"Device: {device}; caps: t4 15 GiB, 24gb 24 GiB; random weights.", "",
             "| family | card | run | fits | peak allocated | peak reserved | s/step |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['family']} | {r['card']} | {r['run']} | {r['fits']} | {r.get('peak_allocated_gib', '-')} "
                     f"| {r.get('peak_reserved_gib', '-')} | {r.get('seconds_per_step', '-')} |")
    (out / "family_memory.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
