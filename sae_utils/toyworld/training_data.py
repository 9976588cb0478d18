"""What the toy model is trained on: single shapes and pairs of shapes, never a held-out pair.

The share of two-object scenes (`p_two`) sets how fluently the base model composes; the pair split (see
`world.PairSplit`) says which pairs it never sees together. A two-object prompt with a held-out pair asks for a
composition the model never saw, like a rare combination for Stable Diffusion.

Every batch is a pure function of (seed, step, settings): a resumed run sees exactly the data it would have seen.
"""
from __future__ import annotations

import numpy as np

from .world import DEFAULT_SPLIT, KINDS, PairSplit, Scene, caption, make_rng, render_batch, sample_scene


def training_example(rng: np.random.Generator, p_two: float, p_color: float,
                     split: PairSplit = DEFAULT_SPLIT) -> tuple[Scene, str]:
    """One scene and its caption: a single random kind, or (with probability p_two) a seen pair, either order."""
    if rng.random() < p_two:
        pair = split.seen[rng.integers(len(split.seen))]
        kinds = list(pair) if rng.random() < 0.5 else list(reversed(pair))
    else:
        kinds = [KINDS[rng.integers(len(KINDS))]]
    scene = sample_scene(rng, kinds)
    return scene, caption(scene, rng, p_color)


def training_batch(seed: int, step: int, batch_size: int, p_two: float, p_color: float, p_uncond: float,
                   size: int = 32, with_scenes: bool = False, split: PairSplit = DEFAULT_SPLIT):
    """Images (B, size, size, 3) uint8 and captions; a caption is "" with probability p_uncond (for CFG).

    with_scenes: also return the scenes (for the objects' masks).
    """
    rng = make_rng(seed, step)
    examples = [training_example(rng, p_two, p_color, split) for _ in range(batch_size)]
    captions = ["" if rng.random() < p_uncond else text for _, text in examples]
    scenes = [scene for scene, _ in examples]
    images = render_batch(scenes, size)
    return (images, captions, scenes) if with_scenes else (images, captions)
