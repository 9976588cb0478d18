"""The toy model's base rates: how often it draws what it is asked, with fixed seeds and 95 % intervals.

    python -m sae_utils.toyworld.base_rates                  # measure the shipped toy model, print the table
    python -m sae_utils.toyworld.base_rates --write          # ... and store them in its toy_model.json

Four evaluation sets (the study's `StudySettings` sizes): single shapes (32 seeds per kind, 256 images), seen
pairs (12 per pair, 240 images), held-out target pairs (64 per pair, 256 images) and held-out control pairs (32 per
pair, 128 images), all on evaluation seeds that no finetuning ever sees. The numbers are what notebook 00 shows and
what every SepEn condition is compared with.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ..checkpoint import atomic_write
from ..models import load_pipeline
from .study import SET_LABELS, StudySettings, ToyStudy

COMMAND = "python -m sae_utils.toyworld.base_rates --write"


def measure_base_rates(pipe, settings: StudySettings | None = None, progress: bool = True) -> dict:
    """{"single", "seen", "target", "control"} -> the study's score of each set, plus how they were measured."""
    settings = settings or StudySettings()
    start = time.perf_counter()
    rates = ToyStudy(pipe, settings, progress=progress).measure("base")
    sizes = {"single_per_kind": settings.single_per_kind, "seen_per_prompt": settings.seen_per_prompt,
             "target_per_prompt": settings.pair_per_prompt, "control_per_prompt": settings.control_per_prompt}
    return {**rates, "protocol": {**sizes, "sampling": settings.sampling, "command": COMMAND,
                                  "seconds": round(time.perf_counter() - start), "torch": torch.__version__}}


def write_base_rates(model_folder: str | Path, rates: dict) -> Path:
    """Store `rates` as the `base_rates` field of the folder's toy_model.json (atomically)."""
    path = Path(model_folder) / "toy_model.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: base rates belong to a toy model folder "
                                "(one written by `python -m sae_utils.toyworld.train_model --export`).")
    info = json.loads(path.read_text())
    info["base_rates"] = rates
    return atomic_write(path, json.dumps(info, indent=1) + "\n")


def table(rates: dict) -> str:
    lines = ["| set | all requested shapes present | 95 % interval | n |", "|---|---|---|---|"]
    for which, label in SET_LABELS.items():
        if which in rates:
            r = rates[which]["all_present"]
            lines.append(f"| {label} | {r['rate']:.3f} | [{r['low']:.3f}, {r['high']:.3f}] | {r['n']} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="toy", help="'toy' (the shipped model) or a toy model folder")
    parser.add_argument("--write", action="store_true", help="store the rates in the model's toy_model.json")
    parser.add_argument("--out", help="also write the rates as JSON here")
    args = parser.parse_args(argv)
    pipe = load_pipeline(args.model, device="cpu")
    rates = measure_base_rates(pipe, StudySettings())
    print(table(rates))
    if args.out:
        atomic_write(Path(args.out), json.dumps(rates, indent=1) + "\n")
    if args.write:
        print(f"written to {write_base_rates(pipe.name_or_path, rates)}")


if __name__ == "__main__":
    main()
