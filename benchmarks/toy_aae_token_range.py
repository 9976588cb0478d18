"""Attend-and-Excite on the toy model with each token range of its softmax: what the official SD 1.4 rule changes.

    python benchmarks/toy_aae_token_range.py --out benchmarks/results/toy_study      # about 20 minutes on 2 cores

The official pipeline softmaxes tokens 1..75 for SD 1.x (the end token and the padding included) and the prompt's
tokens for SD 2.x; this project used the latter for every model until 2026-12-01. On the toy model's target pairs
(the study's seeds), both-present with each rule, Wilson 95 % intervals. Writes aae_token_range.json.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from sae_utils.baselines import attend_and_excite, attend_and_excite_schedule
from sae_utils.models import load_pipeline, model_info
from sae_utils.sampling import sampler_defaults
from sae_utils.toyworld.evaluator import objects_present
from sae_utils.toyworld.study import EVAL_SEED, rate, sample
from sae_utils.toyworld.world import model_split, prompt_for


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="toy")
    parser.add_argument("--per-pair", type=int, default=16)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    pipe = load_pipeline(args.model, device="cpu")
    split = model_split(model_info(pipe))
    settings = sampler_defaults(pipe)
    max_iter, thresholds = attend_and_excite_schedule(settings["num_inference_steps"])
    results = {"model": args.model, "sampling": settings, "max_iter_to_alter": max_iter, "thresholds": thresholds,
               "per_pair": args.per_pair, "ranges": {}}
    kinds = [list(p) for p in split.held_out_target for _ in range(args.per_pair)]
    seeds = [EVAL_SEED + i for _ in split.held_out_target for i in range(args.per_pair)]
    plain = sample(pipe, kinds, seeds, capture=False)
    results["plain_sampling"] = {"target_both_present": rate(objects_present(plain.images, kinds).all(dim=1).numpy())}
    for token_range in ("all-but-last", "prompt"):
        verdicts, per_pair = [], {}
        for pair in split.held_out_target:
            seeds = [EVAL_SEED + i for i in range(args.per_pair)]
            out = attend_and_excite(pipe, prompt_for(pair), list(pair), [torch.Generator().manual_seed(s) for s in seeds],
                                    max_iter_to_alter=max_iter, thresholds=thresholds, token_range=token_range,
                                    **settings)
            images = np.stack([np.asarray(image) for image in out.images])
            both = objects_present(images, list(pair)).all(dim=1).numpy()
            per_pair[" + ".join(pair)] = float(both.mean())
            verdicts += both.tolist()
        results["ranges"][token_range] = {"target_both_present": rate(np.array(verdicts)), "per_pair": per_pair}
        print(token_range, results["ranges"][token_range], flush=True)
    results["seconds"] = round(time.perf_counter() - start)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "aae_token_range.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
