"""What a toy model's one-missing target images hold: one object (neglect) or two objects of one kind (duplication),
before and after the premise's +1 boost on the missing word. Same seeds and settings as the premise's target set.

    python benchmarks/toy_one_missing_objects.py --model DIR --per-pair 16 --out objects.json

Objects are connected components of the non-white pixels (fragments under 6 pixels ignored); two touching objects
count as one, so the count is a lower bound. Why it matters: the premise's G4 boost adds to the missing word at
every pixel, so it can add a missing object where the model drew one (neglect) but relabels both where the model drew
two of the same kind (benchmarks/results/toy_v2_pilots/README.md).

Also the attention margin where the present object is: log(map of the present word / map of the missing word) at the
present word's peak 8x8 pixel, over the first 5 steps (where the boost acts and the layout is decided), by what the
boost then did. A +1 logit boost can only flip pixels whose margin is below about 1, so small margins on the present
object predict swaps. The maps are averages over heads, layers and steps of attention probabilities, so this log
ratio approximates the logit gap; it is not that gap.
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from sae_utils import premise
from sae_utils.attention import map_resolution
from sae_utils.models import load_pipeline


def count_objects(image: np.ndarray, min_pixels: int = 6) -> int:
    """Connected components of the pixels darker than 200 in every channel (the toy's background is white)."""
    mask = image.astype(int).min(-1) < 200
    labels, n = ndimage.label(mask)
    sizes = np.asarray(ndimage.sum(mask, labels, range(1, n + 1)))
    return int((sizes >= min_pixels).sum())


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--per-pair", type=int, default=16)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    pipe = load_pipeline(args.model, device="cpu")
    sets = premise.toy_sets(pipe)
    settings = premise.PremiseSettings(pair_per_prompt=args.per_pair, levels="model")
    words = [list(p) for p in sets.target for _ in range(args.per_pair)]
    seeds = [settings.seed + i for _ in sets.target for i in range(args.per_pair)]
    drawn = premise.draw(pipe, words, seeds, settings, capture=True)  # as the premise draws its target set
    present = premise.toy_judge(drawn.images, drawn.words)
    one = np.flatnonzero(present.sum(1) == 1)
    missing = np.where(present[:, 0], 1, 0)[one]
    after = premise.draw(pipe, [words[i] for i in one], [seeds[i] for i in one], settings, boost_word=list(missing))
    now = premise.toy_judge(after.images, after.words)
    rows = np.arange(len(one))
    swapped = np.flatnonzero(now[rows, missing] & ~now[rows, 1 - missing])
    early = drawn.early_by_resolution[map_resolution(pipe)][torch.from_numpy(one)].flatten(2).double()  # (n, 2, hw)
    r, m = torch.from_numpy(rows), torch.from_numpy(missing)
    on_present, on_missing = early[r, 1 - m], early[r, m]  # (n, h*w) each
    peak = on_present.argmax(-1)
    margin = torch.log(on_present[r, peak] / on_missing[r, peak].clamp_min(1e-12)).numpy()
    both = np.flatnonzero(now.all(1))
    result = {"model": args.model, "per_pair": args.per_pair, "one_missing": len(one),
              "objects_in_one_missing": dict(Counter(count_objects(drawn.images[i]) for i in one)),
              "objects_after_boost": dict(Counter(count_objects(image) for image in after.images)),
              "swapped": len(swapped),
              "objects_in_swapped": dict(Counter(count_objects(after.images[k]) for k in swapped)),
              "objects_in_both_present": dict(Counter(count_objects(drawn.images[i])
                                                      for i in np.flatnonzero(present.all(1)))),
              "margin_at_present_peak": {  # median [quartiles] of the log ratio, by what the boost did
                  name: {"n": len(k), "median_iqr": [round(float(q), 3) for q in np.percentile(margin[k], [50, 25, 75])]
                         if len(k) else None}
                  for name, k in (("all", rows), ("both after boost", both), ("swapped", swapped))}}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
