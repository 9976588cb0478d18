"""The toy world: 8 flat shapes on white, captions in the prompt grammar, and an evaluator.

    rng = make_rng(0)
    scene = sample_scene(rng, ["star", "heart"])
    image = render(scene)                    # (32, 32, 3) uint8
    caption(scene)                           # 'a photo of a star and a heart'
    objects_present([image], ["star", "heart"])   # tensor([[True, True]])

HELD_OUT_PAIRS (8 of the 28 kind pairs, each kind in two) are kept out of the generator's
two-object training scenes; SEEN_PAIRS are the other 20. The evaluator is a small CNN shipped in
assets/ (retrain: python -m sae_utils.toyworld.train_evaluator; accuracy in assets/evaluator_report.json).
"""
from .evaluator import detected_kinds, load_evaluator, objects_present, shape_probabilities
from .world import (
    ALL_PAIRS,
    COLORS,
    HELD_OUT_PAIRS,
    KINDS,
    SEEN_PAIRS,
    ObjectSpec,
    Scene,
    caption,
    make_rng,
    prompt_for,
    render,
    render_batch,
    sample_scene,
)

__all__ = [
    "KINDS", "COLORS", "ALL_PAIRS", "SEEN_PAIRS", "HELD_OUT_PAIRS", "ObjectSpec", "Scene", "make_rng",
    "sample_scene", "render", "render_batch", "caption", "prompt_for",
    "load_evaluator", "shape_probabilities", "objects_present", "detected_kinds",
]
