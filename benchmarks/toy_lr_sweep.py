"""Tune SepEn's learning rate on the toy model, on seeds the study never uses.

    python benchmarks/toy_lr_sweep.py --out benchmarks/results/toy_study --lrs 1e-5,2.5e-5,5e-5,1e-4

Single-pair protocol (one delta per target pair, 200 steps, batch 4), each measured on its own pair, on single
shapes and on control pairs against the base on the same seeds; the seeds start at TUNING_SEED, far from the
study's EVAL_SEED range, so that choosing the rate here does not select on the study's own images. Writes
lr_sweep.json; the study then runs with the chosen rate (`StudySettings.finetune`).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from sae_utils.models import load_pipeline
from sae_utils.toyworld.study import EVAL_SEED, StudySettings, ToyStudy

TUNING_SEED = EVAL_SEED + 50_000


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="toy")
    parser.add_argument("--lrs", default="1e-5,2.5e-5,5e-5,1e-4", help="learning rates per sample, comma-separated")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--per-pair", type=int, default=16)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    pipe = load_pipeline(args.model, device="cpu")
    settings = StudySettings(single_per_kind=args.per_pair, pair_per_prompt=args.per_pair,
                             control_per_prompt=args.per_pair, seen_per_prompt=1, seed=TUNING_SEED)
    study = ToyStudy(pipe, settings, progress=False)
    base = study.measure("base", sets=["target", "control", "single"])
    results = {"model": args.model, "seed": TUNING_SEED, "per_pair": args.per_pair, "steps": args.steps,
               "base": {k: v["all_present"] | {"per_prompt": v["per_prompt"]} for k, v in base.items()}, "lrs": {}}
    for lr in (float(x) for x in args.lrs.split(",")):
        condition = study.single_pair(f"lr {lr:g}", steps=args.steps, learning_rate=lr)
        results["lrs"][f"{lr:g}"] = {k: v["all_present"] | ({"per_prompt": v["per_prompt"]} if k == "target" else {})
                                     for k, v in condition.items() if isinstance(v, dict) and "all_present" in v}
        results["lrs"][f"{lr:g}"] |= {k: v for k, v in condition.items() if k.endswith("_base")}
        print(f"lr {lr:g}:", json.dumps({k: v["rate"] for k, v in results["lrs"][f"{lr:g}"].items()}), flush=True)
    results["seconds"] = round(time.perf_counter() - start)
    results["threads"] = torch.get_num_threads()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lr_sweep.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
