"""The toy world: flat-colour shapes on white, their captions, and the seen/held-out pair split.

A scene is a tuple of objects; each object is a kind (one of 8 shapes), a colour, a centre and a
radius as fractions of the image side (so one scene renders at any size), and a small rotation.
Scenes are drawn with PIL at SUPERSAMPLE x the size and box-filtered down: edges come out
anti-aliased but crisp. Everything is reproducible from an integer seed: `rng = make_rng(seed)`.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw

KINDS = ("circle", "square", "triangle", "star", "heart", "cross", "ring", "moon")
# Saturated and far apart in hue, all dark enough to stand out on white at 32 px.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 150, 50),
    "blue": (35, 75, 225),
    "orange": (245, 135, 0),
    "purple": (135, 40, 185),
}
BACKGROUND = (255, 255, 255)
SUPERSAMPLE = 4
RADIUS_RANGE = (0.16, 0.28)  # of the image side: 5-9 px at 32 px
MAX_ANGLE = 20.0  # degrees; more and a square reads as a diamond, a cross as an x
MARGIN = 0.04  # gap between bounding circles, of the image side (about 1 px at 32 px)

ALL_PAIRS: tuple[tuple[str, str], ...] = tuple(itertools.combinations(KINDS, 2))


@dataclass(frozen=True)
class PairSplit:
    """Which pairs of kinds a toy model saw together in training, and which it never did.

    held_out_target: never together in training, and chosen to fail: look-alike shapes, whose words' keys
        are likely to collide, so the two words compete for the same pixels (the failure SepEn targets).
    held_out_control: never together either, but unlike shapes, which a fluent model should compose anyway:
        they tell a compositional failure from a plain "never saw it" one, and a fix from damage.
    """
    name: str
    held_out_target: tuple[tuple[str, str], ...]
    held_out_control: tuple[tuple[str, str], ...] = ()

    @property
    def held_out(self) -> tuple[tuple[str, str], ...]:
        return self.held_out_target + self.held_out_control

    @property
    def seen(self) -> tuple[tuple[str, str], ...]:
        return tuple(p for p in ALL_PAIRS if p not in self.held_out)


def _canonical(pairs) -> tuple[tuple[str, str], ...]:
    """Pairs spelt and ordered as in ALL_PAIRS."""
    return tuple(sorted((tuple(sorted(p, key=KINDS.index)) for p in pairs), key=ALL_PAIRS.index))


# The toy model v1 (benchmarks/results/toy_v1): the 8-cycle circle-star-ring-square-moon-cross-heart-triangle,
# every kind held out in two pairs, look-alike pairs seen. It composed held-out pairs as well as seen ones.
_CYCLE = ("circle", "star", "ring", "square", "moon", "cross", "heart", "triangle")
CYCLE_SPLIT = PairSplit("cycle", _canonical(zip(_CYCLE, _CYCLE[1:] + _CYCLE[:1])))
# The toy model v2 (in training, issue 12; the default for new models): four look-alike pairs held out as
# targets, four unlike pairs held out as controls; every kind is held out in exactly two pairs and seen beside
# the five others.
COLLIDE_SPLIT = PairSplit(
    "collide",
    held_out_target=_canonical([("circle", "ring"), ("ring", "moon"), ("heart", "cross"), ("star", "cross")]),
    held_out_control=_canonical([("circle", "triangle"), ("square", "star"), ("triangle", "moon"),
                                 ("square", "heart")]))
SPLITS = {split.name: split for split in (CYCLE_SPLIT, COLLIDE_SPLIT)}
DEFAULT_SPLIT = COLLIDE_SPLIT


def pair_split(name: str) -> PairSplit:
    if name not in SPLITS:
        raise ValueError(f"unknown pair split {name!r}; known splits: {', '.join(SPLITS)}")
    return SPLITS[name]


def model_split(info: dict) -> PairSplit:
    """The split a toy model was trained with, from its toy_model.json (`models.model_info`): its "pairs" field;
    a model exported before the field existed (toy v1) was trained on the cycle split."""
    pairs = info.get("pairs")
    if not pairs:
        return CYCLE_SPLIT
    split = PairSplit(pairs["split"], _canonical(pairs["held_out_target"]), _canonical(pairs["held_out_control"]))
    if set(split.seen) != set(_canonical(pairs["seen"])):
        raise ValueError(f"toy_model.json lists seen pairs that are not the complement of its held-out pairs "
                         f"(split {pairs['split']!r}): the file was edited or is corrupt; re-export the model.")
    return split


# The default split's pairs, by name (a model's own split is in its toy_model.json: see toy_split)
HELD_OUT_PAIRS = DEFAULT_SPLIT.held_out
TARGET_PAIRS, CONTROL_PAIRS = DEFAULT_SPLIT.held_out_target, DEFAULT_SPLIT.held_out_control
SEEN_PAIRS = DEFAULT_SPLIT.seen


def make_rng(seed: int, *stream: int) -> np.random.Generator:
    """np.random.default_rng(seed); extra integers pick an independent stream of it (train vs eval, step i).

    Streams are numpy's spawn keys, so make_rng(s, 0), make_rng(s, 1) and make_rng(s) all differ.
    """
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=stream))


@dataclass(frozen=True)
class ObjectSpec:
    kind: str
    color: str
    cx: float  # centre, fraction of the image width
    cy: float  # centre, fraction of the image height (0 = top)
    radius: float  # bounding-circle radius, fraction of the image side
    angle: float = 0.0  # degrees, counter-clockwise

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown kind {self.kind!r}; known kinds: {', '.join(KINDS)}")
        if self.color not in COLORS:
            raise ValueError(f"unknown colour {self.color!r}; known colours: {', '.join(COLORS)}")


@dataclass(frozen=True)
class Scene:
    objects: tuple[ObjectSpec, ...] = ()

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(o.kind for o in self.objects)


# ---------------------------------------------------------------- placement

def sample_layout(rng: np.random.Generator, n: int, avoid: Sequence[tuple[float, float, float]] = (),
                  radius_range: tuple[float, float] = RADIUS_RANGE, margin: float = MARGIN,
                  max_tries: int = 100) -> list[tuple[float, float, float]]:
    """n circles (cx, cy, radius) inside the unit square, `margin` apart from `avoid` and each other.

    Rejection sampling, one circle at a time: the first of 64 random candidates that fits is kept;
    when none fits the layout restarts, up to `max_tries` times.
    """
    for _ in range(max_tries):
        placed = np.asarray(avoid, dtype=float).reshape(-1, 3)
        for _ in range(n):
            r = rng.uniform(*radius_range, size=64)
            centre = rng.uniform(r[:, None], 1 - r[:, None], size=(64, 2))
            apart = np.linalg.norm(centre[:, None, :] - placed[None, :, :2], axis=2)  # (64, placed)
            fits = (apart >= r[:, None] + placed[:, 2] + margin).all(1)
            if not fits.any():
                break
            i = int(fits.argmax())
            placed = np.concatenate([placed, [[*centre[i], r[i]]]])
        else:
            return [tuple(map(float, c)) for c in placed[len(avoid):]]
    raise RuntimeError(f"could not place {n} objects {margin} apart (radius {radius_range}, "
                       f"{len(avoid)} already placed) in {max_tries} tries; use fewer or smaller objects")


def sample_scene(rng: np.random.Generator, kinds: Sequence[str], colors: Sequence[str] | None = None,
                 margin: float = MARGIN, radius_range: tuple[float, float] = RADIUS_RANGE) -> Scene:
    """A scene with one object of each of `kinds`, in that order, at random colour/place/size/angle.

    Objects lie fully inside the image and their bounding circles are `margin` apart (a negative
    margin lets them touch or overlap a little, as a generator's objects may).
    """
    for kind in kinds:
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; known kinds: {', '.join(KINDS)}")
    palette = list(COLORS) if colors is None else list(colors)
    layout = sample_layout(rng, len(kinds), radius_range=radius_range, margin=margin)
    objects = []
    for kind, (cx, cy, r) in zip(kinds, layout):
        color = str(palette[rng.integers(len(palette))])
        objects.append(ObjectSpec(str(kind), color, cx, cy, r, float(rng.uniform(-MAX_ANGLE, MAX_ANGLE))))
    return Scene(tuple(objects))


# ---------------------------------------------------------------- outlines (unit circle, y up)

def _regular(n: int, radius: float, phase: float) -> np.ndarray:
    t = phase + 2 * math.pi * np.arange(n) / n
    return radius * np.stack([np.cos(t), np.sin(t)], 1)


def _star() -> np.ndarray:
    outer, inner = _regular(5, 1.0, math.pi / 2), _regular(5, 0.42, math.pi / 2 + math.pi / 5)
    return np.stack([outer, inner], 1).reshape(10, 2)


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, 72, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
    pts = np.stack([x, y - (y.max() + y.min()) / 2], 1)
    return 0.95 * pts / np.linalg.norm(pts, axis=1).max()


def _cross(arm: float = 0.92, half_width: float = 0.3) -> np.ndarray:
    a, w = arm, half_width
    return np.array([(w, a), (w, w), (a, w), (a, -w), (w, -w), (w, -a),
                     (-w, -a), (-w, -w), (-a, -w), (-a, w), (-w, w), (-w, a)])


def _moon(radius: float = 0.92, offset: float = 0.45, inner: float = 0.8) -> np.ndarray:
    """A crescent opening to the right: the outer circle minus a circle shifted right by `offset`."""
    # Where the two circles cross (unit-radius frame scaled at the end).
    x = (1 + offset ** 2 - inner ** 2) / (2 * offset)
    y = math.sqrt(1 - x * x)
    a_out = math.atan2(y, x)
    a_in = math.atan2(y, x - offset)
    outer = np.linspace(a_out, 2 * math.pi - a_out, 40)  # the long way round, through the left
    back = np.linspace(2 * math.pi - a_in, a_in, 30)  # the inner arc, back through its left side
    pts = np.concatenate([np.stack([np.cos(outer), np.sin(outer)], 1),
                          np.stack([offset + inner * np.cos(back), inner * np.sin(back)], 1)])
    return radius * pts


_OUTLINES = {
    "square": _regular(4, 0.68 * math.sqrt(2), math.pi / 4),
    "triangle": _regular(3, 0.95, math.pi / 2) + np.array([0.0, -0.08]),  # sits a little low, looks centred
    "star": _star(),
    "heart": _heart(),
    "cross": _cross(),
    "moon": _moon(),
}
_CIRCLE, _RING_OUTER, _RING_INNER = 0.85, 0.9, 0.48


def _to_canvas(pts: np.ndarray, cx: float, cy: float, radius: float, angle: float,
               side: int) -> list[tuple[float, float]]:
    a = math.radians(angle)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    xy = pts @ rot.T * (radius * side)
    # y up -> y down; PIL samples pixel (i, j) at its corner, so shift half a pixel to centres.
    return list(zip(cx * side + xy[:, 0] - 0.5, cy * side - xy[:, 1] - 0.5))


def _draw_object(draw: ImageDraw.ImageDraw, spec: ObjectSpec, side: int, color=None, background=BACKGROUND) -> None:
    color = COLORS[spec.color] if color is None else color
    if spec.kind in ("circle", "ring"):
        x, y = spec.cx * side - 0.5, spec.cy * side - 0.5
        outer = (_CIRCLE if spec.kind == "circle" else _RING_OUTER) * spec.radius * side
        draw.ellipse((x - outer, y - outer, x + outer, y + outer), fill=color)
        if spec.kind == "ring":
            inner = _RING_INNER * spec.radius * side
            draw.ellipse((x - inner, y - inner, x + inner, y + inner), fill=background)
    else:
        draw.polygon(_to_canvas(_OUTLINES[spec.kind], spec.cx, spec.cy, spec.radius, spec.angle, side), fill=color)


def draw_outline(draw: ImageDraw.ImageDraw, pts: np.ndarray, cx: float, cy: float, radius: float,
                 angle: float, rgb: tuple[int, int, int], side: int, stroke: float | None = None) -> None:
    """Draw any outline `pts: (P, 2)` (unit circle, y up) placed like an object: filled, or as a
    polyline `stroke` (fraction of the image side) wide. The evaluator trainer draws its distractors so."""
    xy = _to_canvas(pts, cx, cy, radius, angle, side)
    if stroke is None:
        draw.polygon(xy, fill=rgb)
    else:
        draw.line(xy, fill=rgb, width=max(1, round(stroke * side)), joint="curve")


# ---------------------------------------------------------------- rendering

def render(scene: Scene, size: int = 32,
           extra: Callable[[ImageDraw.ImageDraw, int], None] | None = None) -> np.ndarray:
    """The scene as `(size, size, 3)` uint8, white background; deterministic.

    `extra(draw, side)` may draw more on the supersampled canvas (the evaluator trainer's distractors).
    """
    side = size * SUPERSAMPLE
    canvas = Image.new("RGB", (side, side), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for spec in scene.objects:
        _draw_object(draw, spec, side)
    if extra is not None:
        extra(draw, side)
    return np.array(canvas.reduce(SUPERSAMPLE))  # a writable copy


def object_masks(scene: Scene, size: int = 32) -> np.ndarray:
    """(K, size, size) float32 in [0, 1]: how much of each pixel each object covers (anti-aliased like render)."""
    side = size * SUPERSAMPLE
    masks = np.zeros((len(scene.objects), size, size), np.float32)
    for k, spec in enumerate(scene.objects):
        canvas = Image.new("L", (side, side), 0)
        _draw_object(ImageDraw.Draw(canvas), spec, side, color=255, background=0)
        masks[k] = np.asarray(canvas.reduce(SUPERSAMPLE), dtype=np.float32) / 255.0
    return masks


def render_batch(scenes: Sequence[Scene], size: int = 32) -> np.ndarray:
    """`(N, size, size, 3)` uint8."""
    out = np.empty((len(scenes), size, size, 3), np.uint8)
    for i, scene in enumerate(scenes):
        out[i] = render(scene, size)
    return out


# ---------------------------------------------------------------- captions

def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _phrase(words: Sequence[str]) -> str:
    if not words:
        return "a blank photo"  # the empty scene; the CFG "no prompt" stays the empty string
    named = [f"{_article(w)} {w}" for w in words]
    listed = named[0] if len(named) == 1 else ", ".join(named[:-1]) + " and " + named[-1]
    return f"a photo of {listed}"


def prompt_for(kinds: Sequence[str]) -> str:
    """'a photo of a star and a heart' for ("star", "heart"), in the given order."""
    for kind in kinds:
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; known kinds: {', '.join(KINDS)}")
    return _phrase(list(kinds))


def caption(scene: Scene, rng: np.random.Generator | None = None, p_color: float = 0.0) -> str:
    """The scene's caption, objects in scene order; each is named with its colour with probability p_color.

    'a photo of a star', 'a photo of a red star and a heart', 'an orange ...'; 3 objects: 'a, b and c'.
    """
    if p_color > 0 and rng is None:
        raise ValueError("caption(p_color > 0) draws which objects get a colour word: pass rng=make_rng(seed)")
    words = [f"{o.color} {o.kind}" if p_color > 0 and rng.random() < p_color else o.kind for o in scene.objects]
    return _phrase(words)
