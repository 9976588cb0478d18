"""The main command: Separate-and-Enhance on the toy model, measured, on a CPU in minutes.

    bash scripts/demo.sh                 # fresh machine: set-up, then this
    sae-demo --out outputs/demo          # (or python -m sae_utils.demo)

It loads the toy model shipped in the repository, measures how often it shows both shapes of a target pair
(look-alike shapes it never saw together, whose words compete for the same pixels), of a control pair (unlike
shapes it never saw together either) and of a single shape, finetunes the cross-attention keys with the Separate
and Enhance losses (one delta per target pair, as in the paper), measures again on the same seeds, and writes a
report: out/report.md (table, image grids, attention maps, chart) and results.json.
The full protocol, with more images per condition and the ablation, is `python -m sae_utils.toyworld.study`.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


def main(argv=None) -> None:
    from .models import load_pipeline
    from .toyworld.report import write_report
    from .toyworld.study import StudySettings, ToyStudy, report_table

    parser = argparse.ArgumentParser(prog="sae-demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/demo", help="output folder (default: outputs/demo)")
    parser.add_argument("--model", default="toy", help="the toy model (default) or a folder of another toy model")
    parser.add_argument("--images-per-pair", type=int, default=16, help="seeds per target and control pair")
    parser.add_argument("--images-per-kind", type=int, default=8, help="seeds per single shape (8 kinds)")
    parser.add_argument("--steps", type=int, default=None, help="finetuning steps per pair (default: the study's)")
    parser.add_argument("--learning-rate", type=float, default=None, help="per sample (default: the study's)")
    parser.add_argument("--num-inference-steps", type=int, default=None, help="sampler steps (default: the model's)")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    settings = StudySettings(single_per_kind=args.images_per_kind, pair_per_prompt=args.images_per_pair,
                             control_per_prompt=args.images_per_pair)
    settings.finetune |= {k: v for k, v in (("steps", args.steps), ("learning_rate", args.learning_rate)) if v}
    if args.num_inference_steps:
        settings.sampling["num_inference_steps"] = args.num_inference_steps
    pipe = load_pipeline(args.model, device="cpu")
    study = ToyStudy(pipe, settings)
    print("1/3 measuring the base model ...")
    study.measure("base", sets=[w for w in study.sets() if w != "seen"])
    print("2/3 finetuning the keys, one delta per target pair, and measuring again ...")
    study.single_pair("SepEn (K)")
    print("3/3 writing the report ...")
    minutes = (time.perf_counter() - start) / 60
    split = study.split
    controls = (f" and per control pair ({len(split.held_out_control)} pairs it never saw together either)"
                if split.held_out_control else "")
    notes = (f"The toy model, {args.images_per_pair} seeds per target pair ({len(split.held_out_target)} pairs it "
             f"never saw together, split {split.name!r}){controls}, {args.images_per_kind} per single shape; with "
             f"SepEn, each target pair's own delta, the same seeds (single shapes and control pairs: every delta, a "
             f"share of the seeds each). Finetuning: {settings.finetune}. A smaller sample than the full protocol "
             f"(`python -m sae_utils.toyworld.study`; what it measured: README.md, 'SepEn on the toy model'). Ran in "
             f"{minutes:.1f} minutes on {torch.get_num_threads()} CPU threads.")
    report = write_report(study, Path(args.out), "Separate-and-Enhance on the toy model", notes)
    print("\n" + report_table(study.results))
    for key, d in study.results["differences"].items():
        print(f"{key}: {d['points']:+.1f} points [{d['low']:+.1f}, {d['high']:+.1f}]")
    print(f"\nreport: {report} ({minutes:.1f} minutes)")
    print("The full protocol (256 images a condition, the ablation) and the premise check that comes first: "
          "README.md, 'SepEn on the toy model'.")


if __name__ == "__main__":
    main()
