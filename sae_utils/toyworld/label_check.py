"""Check the evaluator against a person on generated images: a numbered grid to label by eye, and the agreement.

    python -m sae_utils.toyworld.label_check grid --out outputs/labels        # writes grid.png + verdicts.json
    (look at grid.png; write labels.json: {"0": ["star", "heart"], "1": ["star"], ...} for every image)
    python -m sae_utils.toyworld.label_check agree --out outputs/labels       # agreement with the evaluator

Images are the toy model's own samples for single and two-object prompts (held-out pairs included), so the
check covers what the evaluator really judges: generated shapes, not renders.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from .world import HELD_OUT_PAIRS, KINDS, SEEN_PAIRS


def make_grid(out: Path, model: str = "toy", count: int = 64, seed: int = 7_000) -> Path:
    from ..models import load_pipeline
    from ..viz import image_grid
    from .evaluator import detected_kinds
    from .study import sample

    prompts = [[k] for k in KINDS] + [list(p) for p in SEEN_PAIRS[:4]] + [list(p) for p in HELD_OUT_PAIRS]
    kinds = [prompts[i % len(prompts)] for i in range(count)]
    samples = sample(load_pipeline(model, device="cpu"), kinds, [seed + i for i in range(count)], capture=False)
    verdicts = [sorted(found) for found in detected_kinds(samples.images)]
    out.mkdir(parents=True, exist_ok=True)
    figure = image_grid(samples.images, titles=[f"#{i}: {' + '.join(k)}" for i, k in enumerate(kinds)], columns=8,
                        size=1.6)
    figure.savefig(out / "grid.png", dpi=100)
    np.save(out / "images.npy", samples.images)
    (out / "verdicts.json").write_text(json.dumps({"prompts": kinds, "evaluator": verdicts}, indent=1))
    return out / "grid.png"


def agreement(out: Path) -> dict:
    """Per image: does the evaluator's set of shapes equal the person's? Also per prompt word."""
    verdicts = json.loads((out / "verdicts.json").read_text())
    labels = json.loads((out / "labels.json").read_text())
    if len(labels) != len(verdicts["evaluator"]):
        raise ValueError(f"labels.json has {len(labels)} images, the grid {len(verdicts['evaluator'])}: label them all.")
    exact = [sorted(labels[str(i)]) == found for i, found in enumerate(verdicts["evaluator"])]
    words = [(w in labels[str(i)]) == (w in found) for i, (prompt, found) in
             enumerate(zip(verdicts["prompts"], verdicts["evaluator"])) for w in prompt]
    result = {"images": len(exact), "exact_set_agreement": round(float(np.mean(exact)), 4),
              "prompt_words": len(words), "word_agreement": round(float(np.mean(words)), 4),
              "disagreements": [i for i, ok in enumerate(exact) if not ok]}
    (out / "agreement.json").write_text(json.dumps(result, indent=1))
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["grid", "agree"])
    parser.add_argument("--out", default="outputs/labels")
    parser.add_argument("--model", default="toy")
    parser.add_argument("--count", type=int, default=64)
    args = parser.parse_args(argv)
    if args.command == "grid":
        print(make_grid(Path(args.out), args.model, args.count))
    else:
        print(json.dumps(agreement(Path(args.out)), indent=1))


if __name__ == "__main__":
    main()
