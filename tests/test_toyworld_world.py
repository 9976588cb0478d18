"""The toy world: kinds and words, scenes, rendering, captions, the pair split."""
from __future__ import annotations

import itertools
import math
import re
from collections import Counter

import numpy as np
import pytest

from sae_utils.toyworld import world
from sae_utils.toyworld.world import (
    ALL_PAIRS, COLORS, HELD_OUT_PAIRS, KINDS, MARGIN, SEEN_PAIRS, ObjectSpec, Scene,
    caption, make_rng, prompt_for, render, render_batch, sample_layout, sample_scene,
)


def test_every_kind_and_colour_word_is_one_clip_token():
    from sae_utils.models import clip_tokenizer  # the real 49408-token SD tokenizer, offline
    tok = clip_tokenizer()
    assert len(tok) == 49408
    for word in (*KINDS, *COLORS):
        ids = tok(word).input_ids
        assert len(ids) == 3, f"{word!r} is {tok.tokenize(word)}"  # <start> word <end>
    # and in a prompt each object word is exactly one token
    ids = tok(prompt_for(["star", "heart"])).input_ids
    assert tok.convert_ids_to_tokens(ids[1:-1]) == ["a</w>", "photo</w>", "of</w>", "a</w>", "star</w>",
                                                    "and</w>", "a</w>", "heart</w>"]


def test_kinds_and_colours():
    assert KINDS == ("circle", "square", "triangle", "star", "heart", "cross", "ring", "moon")
    assert len(COLORS) >= 4
    for rgb in COLORS.values():
        assert min(rgb) <= 60 and max(rgb) >= 130, "a colour must be saturated and stand out on white"
    rgbs = np.array(list(COLORS.values()), float)
    gaps = [np.abs(a - b).sum() for a, b in itertools.combinations(rgbs, 2)]
    assert min(gaps) > 150, "colours too close to tell apart"


def test_same_seed_same_pixels_different_seed_different_pixels():
    def images(seed):
        rng = make_rng(seed)
        return render_batch([sample_scene(rng, ["star", "moon"]) for _ in range(20)])
    assert np.array_equal(images(3), images(3))
    assert not np.array_equal(images(3), images(4))
    assert np.array_equal(make_rng(3).random(4), np.random.default_rng(3).random(4))
    draws = [make_rng(3, *stream).random(4) for stream in [(), (0,), (1,), (0, 0), (1, 0)]]
    assert all(not np.array_equal(a, b) for a, b in itertools.combinations(draws, 2)), "streams must differ"


def test_render_shape_dtype_background_and_batch():
    scene = sample_scene(make_rng(0), ["cross", "ring"])
    image = render(scene)
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8 and image.flags.writeable
    assert (image.min(2) == 255).mean() > 0.5, "most of the image is white background"
    assert np.array_equal(render_batch([scene, scene]), np.stack([image, image]))
    assert render(scene, size=64).shape == (64, 64, 3)
    assert render(Scene()).min() == 255
    # scenes are size independent: a 64 px render shrunk by 2 is close to the 32 px render
    big = render(scene, size=64).reshape(32, 2, 32, 2, 3).mean((1, 3))
    assert np.abs(big - image.astype(float)).mean() < 3


def test_objects_are_inside_and_apart():
    rng = make_rng(1)
    for _ in range(300):
        n = int(rng.integers(1, 4))
        scene = sample_scene(rng, list(rng.choice(KINDS, n)))
        assert len(scene.objects) == n
        for o in scene.objects:
            assert o.radius <= o.cx <= 1 - o.radius and o.radius <= o.cy <= 1 - o.radius
            assert abs(o.angle) <= world.MAX_ANGLE
        for a, b in itertools.combinations(scene.objects, 2):
            assert math.hypot(a.cx - b.cx, a.cy - b.cy) >= a.radius + b.radius + MARGIN - 1e-12


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_is_drawn_inside_its_bounding_circle_in_its_colour(kind):
    size = 64
    for angle in (-20.0, 0.0, 20.0):
        spec = ObjectSpec(kind, "blue", 0.45, 0.55, 0.25, angle)
        image = render(Scene((spec,)), size).astype(int)
        ink = (255 - image.min(2)) > 20
        ys, xs = np.nonzero(ink)
        dist = np.hypot(xs + 0.5 - spec.cx * size, ys + 0.5 - spec.cy * size)
        assert dist.max() <= spec.radius * size + 1.0, f"{kind} spills out of its bounding circle"
        assert ink.sum() > 0.2 * math.pi * (spec.radius * size) ** 2, f"{kind} is too thin to see"
        solid = (np.abs(image - COLORS["blue"]).sum(2) < 10)
        assert solid.sum() > 0.5 * ink.sum(), "the inside is the flat colour; only the edge is blended"


def test_kinds_look_different():
    images = [render(Scene((ObjectSpec(k, "red", 0.5, 0.5, 0.25, 0.0),))).astype(int) for k in KINDS]
    for (a, ia), (b, ib) in itertools.combinations(zip(KINDS, images), 2):
        assert np.abs(ia - ib).sum(2).astype(bool).mean() > 0.05, f"{a} and {b} render almost alike"


def test_ring_has_a_hole_and_moon_an_opening():
    ring = render(Scene((ObjectSpec("ring", "green", 0.5, 0.5, 0.28),)), 64)
    assert ring[32, 32].min() == 255, "the ring's centre is background"
    moon = render(Scene((ObjectSpec("moon", "green", 0.5, 0.5, 0.28),)), 64)
    assert moon[32, 40].min() == 255 and moon[32, 20].max() < 200, "open on the right, solid on the left"


def test_layout_errors_teach():
    with pytest.raises(RuntimeError, match="could not place 12 objects"):
        sample_layout(make_rng(0), 12, max_tries=5)
    with pytest.raises(ValueError, match="known kinds: circle, square"):
        sample_scene(make_rng(0), ["dog"])
    with pytest.raises(ValueError, match="known colours"):
        ObjectSpec("star", "teal", 0.5, 0.5, 0.2)


def test_caption_grammar():
    star = ObjectSpec("star", "red", 0.3, 0.3, 0.2)
    heart = ObjectSpec("heart", "orange", 0.7, 0.7, 0.2)
    ring = ObjectSpec("ring", "blue", 0.3, 0.75, 0.2)
    assert caption(Scene((star,))) == "a photo of a star"
    assert caption(Scene((star, heart))) == "a photo of a star and a heart"
    assert caption(Scene((heart, star))) == "a photo of a heart and a star", "order follows the scene"
    assert caption(Scene((star, heart, ring))) == "a photo of a star, a heart and a ring"
    assert caption(Scene((star, heart)), make_rng(0), p_color=1.0) == "a photo of a red star and an orange heart"
    assert caption(Scene()) == "a blank photo"
    assert prompt_for(["star", "heart"]) == caption(Scene((star, heart)))
    with pytest.raises(ValueError, match="pass rng"):
        caption(Scene((star,)), p_color=0.5)
    with pytest.raises(ValueError, match="known kinds"):
        prompt_for(["star", "dog"])


def test_colour_words_appear_independently_at_rate_p_color():
    rng = make_rng(5)
    scene = sample_scene(rng, ["cross", "moon"])
    pattern = re.compile(r"^a photo of an? (?:(\w+) )?cross and an? (?:(\w+) )?moon$")
    named = Counter()
    for _ in range(2000):
        m = pattern.match(caption(scene, rng, p_color=0.3))
        assert m, "caption outside the grammar"
        for i, obj in enumerate(scene.objects):
            if m.group(i + 1):
                assert m.group(i + 1) == obj.color
                named[i] += 1
    assert all(abs(named[i] / 2000 - 0.3) < 0.04 for i in (0, 1))


def test_pair_splits_are_frozen_and_two_regular():
    from sae_utils.toyworld.world import (COLLIDE_SPLIT, CYCLE_SPLIT, DEFAULT_SPLIT, PairSplit, model_split,
                                          pair_split)

    assert len(ALL_PAIRS) == 28 and len(set(ALL_PAIRS)) == 28
    for split in (CYCLE_SPLIT, COLLIDE_SPLIT):
        assert len(split.held_out) == 8 and len(split.seen) == 20
        assert set(split.held_out) | set(split.seen) == set(ALL_PAIRS) and not set(split.held_out) & set(split.seen)
        degree = Counter(k for pair in split.held_out for k in pair)
        assert degree == {k: 2 for k in KINDS}, "every kind is held out in exactly two pairs"
    # v1 (cycle): one 8-cycle, not two 4-cycles: walking the held-out pairs from any kind visits all kinds
    seen, frontier = set(), ["circle"]
    while frontier:
        k = frontier.pop()
        seen.add(k)
        frontier += [b if a == k else a for a, b in CYCLE_SPLIT.held_out if k in (a, b) and ({a, b} - seen)]
    assert seen == set(KINDS)
    assert CYCLE_SPLIT.held_out == (("circle", "triangle"), ("circle", "star"), ("square", "ring"),
                                    ("square", "moon"), ("triangle", "heart"), ("star", "ring"), ("heart", "cross"),
                                    ("cross", "moon"))
    # v2 (collide): look-alike targets, unlike controls; the default, and what the module's names mean
    assert COLLIDE_SPLIT.held_out_target == (("circle", "ring"), ("star", "cross"), ("heart", "cross"),
                                             ("ring", "moon"))
    assert COLLIDE_SPLIT.held_out_control == (("circle", "triangle"), ("square", "star"), ("square", "heart"),
                                              ("triangle", "moon"))
    assert DEFAULT_SPLIT is COLLIDE_SPLIT and HELD_OUT_PAIRS == COLLIDE_SPLIT.held_out
    assert SEEN_PAIRS == COLLIDE_SPLIT.seen and pair_split("cycle") is CYCLE_SPLIT
    with pytest.raises(ValueError, match="unknown pair split"):
        pair_split("diagonal")
    # a model folder says which split it was trained on; one exported before that field is v1
    info = {"pairs": {"split": "collide", "seen": [list(p) for p in COLLIDE_SPLIT.seen],
                      "held_out_target": [list(p)[::-1] for p in COLLIDE_SPLIT.held_out_target],
                      "held_out_control": [list(p) for p in COLLIDE_SPLIT.held_out_control]}}
    assert model_split(info) == COLLIDE_SPLIT and model_split({}) is CYCLE_SPLIT
    info["pairs"]["seen"] = info["pairs"]["seen"][1:]
    with pytest.raises(ValueError, match="complement"):
        model_split(info)
    assert isinstance(model_split({"vocabulary": []}), PairSplit)


def test_object_masks_cover_each_object_where_it_is_drawn():
    from sae_utils.toyworld.world import object_masks

    scene = sample_scene(make_rng(3), ["star", "ring"])
    masks = object_masks(scene)
    assert masks.shape == (2, 32, 32) and masks.min() >= 0 and masks.max() == 1.0
    drawn = render(scene).min(axis=-1) < 128  # clearly coloured pixels
    assert ((masks.sum(0) > 0.5) == drawn).mean() > 0.97
    assert (masks[0] * masks[1]).max() == 0  # objects do not overlap


def test_kind_frequencies_draw_rare_kinds_as_often_as_asked_alone_and_in_seen_pairs_only():
    from sae_utils.toyworld.training_data import kind_weights, training_example
    from sae_utils.toyworld.world import COLLIDE_SPLIT

    assert kind_weights("uniform") is None
    weights = kind_weights("ring=0.25, cross=0.25")
    assert weights == {**dict.fromkeys(KINDS, 1.0), "ring": 0.25, "cross": 0.25}
    rng = make_rng(0)
    singles, pairs = Counter(), Counter()
    for _ in range(12000):
        scene, _ = training_example(rng, 0.5, 0.0, COLLIDE_SPLIT, weights)
        if len(scene.kinds) == 1:
            singles[scene.kinds[0]] += 1
        else:
            pairs[tuple(sorted(scene.kinds, key=KINDS.index))] += 1
    common = np.mean([singles[k] for k in KINDS if k not in ("ring", "cross")])
    for rare in ("ring", "cross"):  # a quarter as often (about 190 of 6,000 singles against 760)
        assert 0.18 < singles[rare] / common < 0.33, (rare, singles[rare], common)
    assert set(pairs) <= set(COLLIDE_SPLIT.seen)
    # a pair by the product of its weights: (ring, cross) at 1/16, a pair with one rare kind at 1/4
    assert 0.15 < pairs[("square", "ring")] / pairs[("square", "moon")] < 0.4
    assert pairs[("cross", "ring")] < pairs[("square", "ring")]


def test_uniform_kind_frequencies_leave_the_data_as_it_was():
    """A model trained before the option existed resumes on exactly the batches it would have seen."""
    from sae_utils.toyworld.training_data import training_batch

    images, captions = training_batch(3, 7, 16, 0.72, 0.25, 0.1)
    again, captions_again = training_batch(3, 7, 16, 0.72, 0.25, 0.1, kind_frequencies="uniform")
    assert captions == captions_again and np.array_equal(images, again)
    _, skewed = training_batch(3, 7, 16, 0.72, 0.25, 0.1, kind_frequencies="ring=0.25")
    assert skewed != captions


@pytest.mark.parametrize("spec, message", [("rign=0.25", "'rign' is not a kind"), ("ring", "no number after"),
                                           ("ring=0", "must be above 0"), ("ring=-1", "must be above 0")])
def test_a_mistyped_kind_frequency_says_what_to_write(spec, message):
    from sae_utils.toyworld.training_data import kind_weights

    with pytest.raises(ValueError, match=re.escape(message)):
        kind_weights(spec)


def test_a_fixed_word_order_names_every_pair_in_the_order_of_the_kinds_and_draws_the_same_scenes_otherwise():
    from sae_utils.toyworld.training_data import training_batch

    _, either = training_batch(3, 7, 64, 0.72, 0.0, 0.0)
    _, fixed = training_batch(3, 7, 64, 0.72, 0.0, 0.0, word_order="fixed")

    def named(text):  # the kinds in the order the caption names them
        return sorted((k for k in KINDS if k in text), key=text.index)

    assert [sorted(named(a)) for a in either] == [sorted(named(f)) for f in fixed]  # the same draws
    pairs = [named(f) for f in fixed if len(named(f)) == 2]
    assert len(pairs) > 30 and all(KINDS.index(a) < KINDS.index(b) for a, b in pairs)
    assert any(KINDS.index(a) > KINDS.index(b) for a, b in (named(e) for e in either if len(named(e)) == 2))
    with pytest.raises(ValueError, match="word_order 'sorted': use one of 'either', 'fixed'"):
        training_batch(3, 7, 4, 0.72, 0.0, 0.0, word_order="sorted")
