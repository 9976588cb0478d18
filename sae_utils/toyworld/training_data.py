"""What the toy model is trained on: mostly single shapes, a few two-shape scenes, never a held-out pair.

The share of two-object scenes (`p_two`) sets how well the base model composes. Held-out pairs never appear
together, so a two-object prompt with a held-out pair asks for a composition the model never saw, like a
rare combination for Stable Diffusion.

Every batch is a pure function of (seed, step): a resumed run sees exactly the data it would have seen.
"""
from __future__ import annotations

import numpy as np

from .world import KINDS, SEEN_PAIRS, Scene, caption, make_rng, render_batch, sample_scene


def training_example(rng: np.random.Generator, p_two: float, p_color: float) -> tuple[Scene, str]:
    """One scene and its caption: a single random kind, or (with probability p_two) a seen pair."""
    if rng.random() < p_two:
        pair = SEEN_PAIRS[rng.integers(len(SEEN_PAIRS))]
        kinds = list(pair) if rng.random() < 0.5 else list(reversed(pair))
    else:
        kinds = [KINDS[rng.integers(len(KINDS))]]
    scene = sample_scene(rng, kinds)
    return scene, caption(scene, rng, p_color)


def training_batch(seed: int, step: int, batch_size: int, p_two: float, p_color: float, p_uncond: float,
                   size: int = 32, with_scenes: bool = False):
    """Images (B, size, size, 3) uint8 and captions; a caption is "" with probability p_uncond (for CFG).

    with_scenes: also return the scenes (for the objects' masks).
    """
    rng = make_rng(seed, step)
    examples = [training_example(rng, p_two, p_color) for _ in range(batch_size)]
    captions = ["" if rng.random() < p_uncond else text for _, text in examples]
    scenes = [scene for scene, _ in examples]
    images = render_batch(scenes, size)
    return (images, captions, scenes) if with_scenes else (images, captions)
