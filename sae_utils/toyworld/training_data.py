"""What the toy model is trained on: single shapes and pairs of shapes, never a held-out pair.

The share of two-object scenes (`p_two`) sets how fluently the base model composes; the pair split (see
`world.PairSplit`) says which pairs it never sees together. A two-object prompt with a held-out pair asks for a
composition the model never saw, like a rare combination for Stable Diffusion.

Every batch is a pure function of (seed, step, settings): a resumed run sees exactly the data it would have seen.
"""
from __future__ import annotations

import numpy as np

from .world import DEFAULT_SPLIT, KINDS, PairSplit, Scene, caption, make_rng, render_batch, sample_scene


def kind_weights(spec: str) -> dict[str, float] | None:
    """How often each kind is drawn: "uniform" (None), or "kind=weight,..." relative to 1 for the kinds not named.

    "ring=0.25,cross=0.25" draws a ring or a cross a quarter as often as any other kind, alone and in pairs (a pair
    by the product of its kinds' weights): rare words, which SD's neglected objects often are, lose the softmax to
    frequent ones.
    """
    if spec == "uniform":
        return None
    weights = dict.fromkeys(KINDS, 1.0)
    for item in spec.split(","):
        kind, _, value = item.strip().partition("=")
        if kind not in KINDS:
            raise ValueError(f"kind_frequencies {spec!r}: {kind!r} is not a kind; the kinds are {', '.join(KINDS)} "
                             "(write e.g. 'ring=0.25,cross=0.25', or 'uniform').")
        try:
            weights[kind] = float(value)
        except ValueError:
            raise ValueError(f"kind_frequencies {spec!r}: {item.strip()!r} has no number after '='; write "
                             f"'{kind}=0.25'.") from None
        if not weights[kind] > 0:
            raise ValueError(f"kind_frequencies {spec!r}: {kind}'s weight must be above 0 (a kind never drawn "
                             "could not be learnt); hold pairs out with the split instead.")
    return weights


WORD_ORDERS = ("either", "fixed")


def check_word_order(word_order: str) -> None:
    if word_order not in WORD_ORDERS:
        raise ValueError(f"word_order {word_order!r}: use one of {', '.join(map(repr, WORD_ORDERS))}.")


def training_example(rng: np.random.Generator, p_two: float, p_color: float,
                     split: PairSplit = DEFAULT_SPLIT, weights: dict[str, float] | None = None,
                     word_order: str = "either") -> tuple[Scene, str]:
    """One scene and its caption: a single random kind, or (with probability p_two) a seen pair.

    weights: `kind_weights`; None draws every kind and every seen pair equally often. word_order: "either" names a
    pair in both orders, half the time each; "fixed" always in the order of `world.KINDS` (the order the premise
    check and the study prompt in), so that a causal text encoder reads each second word only after the few first
    words it followed in training, and a held-out pair puts it in a context it never saw (issue 12's fallback).
    """
    if rng.random() < p_two:
        if weights is None:
            pair = split.seen[rng.integers(len(split.seen))]
        else:
            p = np.array([weights[a] * weights[b] for a, b in split.seen])
            pair = split.seen[rng.choice(len(split.seen), p=p / p.sum())]
        flip = rng.random() >= 0.5  # drawn in both orders, so that "fixed" keeps every other draw of "either"
        kinds = list(reversed(pair)) if flip and word_order == "either" else list(pair)
    elif weights is None:
        kinds = [KINDS[rng.integers(len(KINDS))]]
    else:
        p = np.array([weights[k] for k in KINDS])
        kinds = [KINDS[rng.choice(len(KINDS), p=p / p.sum())]]
    scene = sample_scene(rng, kinds)
    return scene, caption(scene, rng, p_color)


def training_batch(seed: int, step: int, batch_size: int, p_two: float, p_color: float, p_uncond: float,
                   size: int = 32, with_scenes: bool = False, split: PairSplit = DEFAULT_SPLIT,
                   kind_frequencies: str = "uniform", word_order: str = "either"):
    """Images (B, size, size, 3) uint8 and captions; a caption is "" with probability p_uncond (for CFG).

    with_scenes: also return the scenes (for the objects' masks). kind_frequencies: see `kind_weights`;
    word_order: see `training_example`.
    """
    check_word_order(word_order)
    rng = make_rng(seed, step)
    weights = kind_weights(kind_frequencies)
    examples = [training_example(rng, p_two, p_color, split, weights, word_order) for _ in range(batch_size)]
    captions = ["" if rng.random() < p_uncond else text for _, text in examples]
    scenes = [scene for scene, _ in examples]
    images = render_batch(scenes, size)
    return (images, captions, scenes) if with_scenes else (images, captions)
