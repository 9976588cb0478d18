"""Train the toy-world evaluator on fresh renders with generated-image artefacts, then measure it.

    python -m sae_utils.toyworld.train_evaluator [--out DIR] [--steps N] [--seed S]

Data is made on the fly: scenes of 0-3 objects (any kinds, repeats allowed: the label is presence),
sometimes with distractors (lumpy blobs, long ellipses, irregular polygons, strokes) that are
labelled absent, then artefacts a half-trained diffusion model makes: warps, blur, down-up
resampling, colour shifts, tinted backgrounds and pixel noise. The report measures it on fresh
scenes from a disjoint seed stream, clean and under each artefact.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from .evaluator import ASSETS, ShapeDetector, save_evaluator, shape_probabilities
from .world import (COLORS, KINDS, MARGIN, RADIUS_RANGE, Scene, draw_outline, make_rng, render, sample_layout,
                    sample_scene)

CHANNELS = (16, 32, 64, 128)
BATCH_SIZE = 128
LR = 2e-3
P_TEXTURE = 0.06  # share of shapeless noise images, labelled "nothing"
TRAIN_RADIUS_RANGE = (0.13, 0.32)  # a little wider than the world's (0.16, 0.28): generated sizes drift
TRAIN_STREAM, EVAL_STREAM = 0, 1  # make_rng(seed, stream): training and evaluation never share scenes


# ---------------------------------------------------------------- distractors: none of the kinds

@dataclass
class Distractor:
    outline: np.ndarray  # (P, 2), unit circle, y up
    cx: float
    cy: float
    radius: float
    angle: float
    rgb: tuple[int, int, int]
    stroke: float | None = None  # a polyline this wide (fraction of the side) instead of a filled shape


def _polar(r: np.ndarray, t: np.ndarray) -> np.ndarray:
    return np.stack([r * np.cos(t), r * np.sin(t)], 1) / r.max()


def random_outline(rng: np.random.Generator) -> tuple[np.ndarray, float | None]:
    """A shape that is none of the kinds: lumpy blob, long ellipse, irregular polygon or stroke."""
    t = np.linspace(0, 2 * math.pi, 48, endpoint=False)
    style = rng.choice(["blob", "ellipse", "polygon", "stroke"], p=[0.4, 0.2, 0.25, 0.15])
    if style == "blob":  # a potato: low harmonics carry the lumps, high ones only roughen, so no star or cross
        k = np.arange(2, 7)[:, None]
        amplitude = np.array([0.25, 0.2, 0.06, 0.05, 0.04])[:, None] * rng.uniform(0.3, 1, (5, 1))
        wobble = (amplitude * np.cos(k * t + rng.uniform(0, 2 * math.pi, (5, 1)))).sum(0)
        return _polar(1 + wobble * rng.uniform(0.3, 0.45) / np.abs(wobble).max(), t), None
    if style == "ellipse":  # too long to be a circle
        return np.stack([np.cos(t), rng.uniform(0.3, 0.55) * np.sin(t)], 1), None
    if style == "polygon":  # 5-8 uneven corners, no gap wide enough to leave a clean triangle
        n = int(rng.integers(5, 9))
        gaps = rng.uniform(0.5, 1.5, n)
        angles = np.cumsum(2 * math.pi * gaps / gaps.sum())
        radii = rng.uniform(0.5, 1.0, n)
        radii[rng.integers(n)] = 0.4  # one deep dent: never a clean square
        return _polar(radii, angles), None
    return rng.uniform(-1, 1, (int(rng.integers(2, 5)), 2)), float(rng.uniform(0.04, 0.08))


def random_distractor(rng: np.random.Generator, cx: float, cy: float, radius: float) -> Distractor:
    outline, stroke = random_outline(rng)
    if rng.random() < 0.5:
        rgb = COLORS[list(COLORS)[rng.integers(len(COLORS))]]
    else:
        rgb = tuple(int(c) for c in rng.integers(0, 220, 3))
    return Distractor(outline, cx, cy, radius, float(rng.uniform(0, 360)), rgb, stroke)


def render_example(scene: Scene, distractors: list[Distractor], size: int = 32) -> np.ndarray:
    """(size, size, 3) uint8: the scene with the distractors drawn in."""
    def extra(draw, side):
        for d in distractors:
            draw_outline(draw, d.outline, d.cx, d.cy, d.radius, d.angle, d.rgb, side, d.stroke)
    return render(scene, size, extra)


def sample_example(rng: np.random.Generator, n_objects: int, n_distractors: int = 0, distinct: bool = False,
                   margin: float = MARGIN, radius_range: tuple[float, float] = RADIUS_RANGE
                   ) -> tuple[np.ndarray, np.ndarray]:
    """One render and its label: image (32, 32, 3) uint8, present (8,) float 0/1."""
    kinds = rng.choice(len(KINDS), n_objects, replace=not distinct)
    scene = sample_scene(rng, [KINDS[k] for k in kinds], margin=margin, radius_range=radius_range)
    distractors = []
    if n_distractors:
        try:
            taken = [(o.cx, o.cy, o.radius) for o in scene.objects]
            layout = sample_layout(rng, n_distractors, taken, max_tries=3)
            distractors = [random_distractor(rng, *c) for c in layout]
        except RuntimeError:
            pass  # no room left: this example goes without distractors
    label = np.zeros(len(KINDS), np.float32)
    label[kinds] = 1
    return render_example(scene, distractors), label


def random_texture(rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """(size, size, 3) uint8 with no object in it: noise at a random scale and contrast, as a barely
    trained generator paints (uniform pixel noise included)."""
    cells = int(rng.choice([2, 4, 8, 16, size]))
    noise = rng.integers(0, 256, (cells, cells, 3), dtype=np.uint8)
    noise = Image.fromarray(noise).resize((size, size), Image.BILINEAR)
    amount = rng.uniform(0.2, 1.0)
    base = rng.uniform(0.6, 1.0, 3)  # what the noise fades into: white to pastel
    return np.round(255 * base * (1 - amount) + np.asarray(noise) * amount).astype(np.uint8)


def training_batch(rng: np.random.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """images: (n, 3, 32, 32) in [0, 1], labels: (n, 8)."""
    images, labels = [], []
    for _ in range(n):
        if rng.random() < P_TEXTURE:
            images.append(random_texture(rng))
            labels.append(np.zeros(len(KINDS), np.float32))
            continue
        n_objects = int(rng.choice(4, p=[0.1, 0.35, 0.4, 0.15]))
        n_distractors = int(rng.choice(3, p=[0.6, 0.3, 0.1]))
        # A generator's objects may touch: 20% of training scenes let them overlap by up to ~1.5 px.
        margin = -0.05 if rng.random() < 0.2 else MARGIN
        image, label = sample_example(rng, n_objects, n_distractors, margin=margin,
                                      radius_range=TRAIN_RADIUS_RANGE)
        images.append(image)
        labels.append(label)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255, torch.from_numpy(np.stack(labels))


# ---------------------------------------------------------------- artefacts of generated images
# Each takes x: (N, 3, H, W) in [0, 1] and a torch.Generator, and draws its strength per image.

def _uniform(gen: torch.Generator, n: int, lo: float, hi: float, *shape: int) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, *shape, generator=gen)


def warp(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Slightly mangled shapes: small rotation/scale/shift plus a smooth elastic field (std up to 0.8 px)."""
    n, _, h, w = x.shape
    a, s = _uniform(gen, n, -0.2, 0.2), _uniform(gen, n, 0.92, 1.06)  # +-11 degrees on top of the scene's +-20
    shift = _uniform(gen, n, -1.0, 1.0, 2) * 2 / w
    theta = torch.stack([torch.stack([torch.cos(a) / s, -torch.sin(a) / s, shift[:, 0]], 1),
                         torch.stack([torch.sin(a) / s, torch.cos(a) / s, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    field = torch.randn(n, 2, 4, 4, generator=gen) * _uniform(gen, n, 0, 0.8 * 2 / w, 1, 1, 1)
    field = F.interpolate(field, size=(h, w), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    return F.grid_sample(x, grid + field, mode="bilinear", padding_mode="border", align_corners=False)


def blur(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Soft edges: a Gaussian blur with sigma 0.3-1.0 px."""
    n, c, h, w = x.shape
    sigma = _uniform(gen, n, 0.3, 1.0, 1)
    kernel = torch.exp(-torch.arange(-2, 3).float() ** 2 / (2 * sigma ** 2))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (n*c, 5)
    y = x.reshape(1, n * c, h, w)
    y = F.conv2d(F.pad(y, (2, 2, 0, 0), mode="replicate"), kernel[:, None, None, :], groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, 2, 2), mode="replicate"), kernel[:, None, :, None], groups=n * c)
    return y.reshape(n, c, h, w)


def down_up(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Lost detail: down to 18-26 px (area) and back up (bilinear)."""
    side = int(torch.randint(18, 27, (1,), generator=gen))
    small = F.interpolate(x, size=(side, side), mode="area")
    return F.interpolate(small, size=x.shape[-2:], mode="bilinear", align_corners=False)


def recolor(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Wrong or washed-out colours: channel permutation, per-channel gain, paler shapes, some grey."""
    n = len(x)
    perm = torch.argsort(torch.rand(n, 3, generator=gen), 1)
    x = x.gather(1, perm[:, :, None, None].expand_as(x)) * _uniform(gen, n, 0.85, 1.08, 3, 1, 1)
    x = 1 - _uniform(gen, n, 0.6, 1.0, 1, 1, 1) * (1 - x)
    grey = (torch.rand(n, 1, 1, 1, generator=gen) < 0.15).float()
    return grey * x.mean(1, keepdim=True).expand_as(x) + (1 - grey) * x


def tint(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Off-white, pastel background and low-frequency colour blotches."""
    n, _, h, w = x.shape
    x = x * (1 - _uniform(gen, n, 0, 0.25, 1, 1, 1) * torch.rand(n, 3, 1, 1, generator=gen))
    blotches = torch.randn(n, 3, 3, 3, generator=gen) * _uniform(gen, n, 0, 0.08, 1, 1, 1)
    return x + F.interpolate(blotches, size=(h, w), mode="bilinear", align_corners=False)


def noise(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Leftover sampling noise: per-pixel Gaussian, sigma 0.02-0.15, sometimes blotchy (half resolution)."""
    n, c, h, w = x.shape
    if torch.rand(1, generator=gen) < 0.3:
        z = F.interpolate(torch.randn(n, c, h // 2, w // 2, generator=gen), size=(h, w), mode="bilinear")
    else:
        z = torch.randn(x.shape, generator=gen)
    return x + z * _uniform(gen, n, 0.02, 0.15, 1, 1, 1)


ARTEFACTS = {"warp": (warp, 0.5), "blur": (blur, 0.4), "down_up": (down_up, 0.2),
             "recolor": (recolor, 0.4), "tint": (tint, 0.5), "noise": (noise, 0.6)}  # name: (op, P in training)
P_CLEAN = 0.2  # share of training images left clean (flips aside)


def augment(x: torch.Tensor, gen: torch.Generator, always: bool = False) -> torch.Tensor:
    """x: (N, 3, H, W) -> same, every artefact applied to a random subset (all of them if `always`).

    A mirror image is the same kind (a moon opening left is still a moon), so flips come first.
    """
    n = len(x)
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    keep_clean = torch.zeros(n, dtype=torch.bool) if always else torch.rand(n, generator=gen) < P_CLEAN
    for op, p in ARTEFACTS.values():
        chosen = ~keep_clean & ((torch.rand(n, generator=gen) < p) | always)
        if chosen.any():
            x = x.clone()
            x[chosen] = op(x[chosen], gen)
    return x.clamp(0, 1)


# ---------------------------------------------------------------- training

def train(steps: int, seed: int) -> tuple[ShapeDetector, float]:
    torch.manual_seed(seed)
    rng, gen = make_rng(seed, TRAIN_STREAM), torch.Generator().manual_seed(seed)
    model = ShapeDetector(CHANNELS)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=5e-4)
    warmup = max(1, steps // 30)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps)))
    start, model = time.time(), model.train()
    bar = tqdm(range(steps), desc="training evaluator")
    for step in bar:
        images, labels = training_batch(rng, BATCH_SIZE)
        loss = F.binary_cross_entropy_with_logits(model(augment(images, gen)), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    return model.eval(), time.time() - start


# ---------------------------------------------------------------- evaluation

EVAL_SETS = {  # name: (count, n_objects, n_distractors)
    "0 objects": (500, 0, 0),
    "1 object": (3000, 1, 0),
    "2 objects": (3000, 2, 0),
    "3 objects": (500, 3, 0),
    "distractors only": (1000, 0, 1),
    "objects + distractors": (1000, 2, 1),
    "noise textures": (500, None, 0),  # random_texture: no object at all
}


def eval_sets(seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """name -> (images (N, 3, 32, 32), labels (N, 8)), from the evaluation seed stream; objects distinct."""
    out = {}
    for i, (name, (count, n_obj, n_dis)) in enumerate(EVAL_SETS.items()):
        rng = make_rng(seed, EVAL_STREAM, i)
        if n_obj is None:
            pairs = [(random_texture(rng), np.zeros(len(KINDS), np.float32)) for _ in range(count)]
        else:
            pairs = [sample_example(rng, n_obj, n_dis + int(rng.integers(2)) if n_dis else 0, distinct=True)
                     for _ in range(count)]
        images = torch.from_numpy(np.stack([p[0] for p in pairs])).permute(0, 3, 1, 2).float() / 255
        out[name] = images, torch.from_numpy(np.stack([p[1] for p in pairs]))
    return out


def _conditions(seed: int) -> dict[str, callable]:
    """name -> a transform of the evaluation images: clean, each artefact alone, the training mix, all at once."""
    def gen():  # not the training generator's seed
        return torch.Generator().manual_seed(10_000 + seed)

    def one(op):
        return lambda x: op(x, gen()).clamp(0, 1)
    conditions = {"clean": lambda x: x}
    conditions |= {name: one(op) for name, (op, _) in ARTEFACTS.items()}
    conditions["training mix"] = lambda x: augment(x, gen())
    conditions["all at once"] = lambda x: augment(x, gen(), always=True)
    return conditions


def measure(model: ShapeDetector, seed: int) -> dict:
    sets = eval_sets(seed)
    accuracy = {}
    for condition, transform in _conditions(seed).items():
        accuracy[condition] = {}
        for name, (images, labels) in sets.items():
            predicted = shape_probabilities(transform(images), model) > 0.5
            accuracy[condition][name] = float((predicted == labels.bool()).all(1).float().mean())
    images, labels = sets["1 object"]
    probs = shape_probabilities(images, model)
    confusion = torch.zeros(len(KINDS), len(KINDS), dtype=torch.long)
    confusion.index_put_((labels.argmax(1), probs.argmax(1)), torch.ones(len(probs), dtype=torch.long),
                         accumulate=True)
    images, labels = sets["2 objects"]
    predicted, truth = shape_probabilities(images, model) > 0.5, labels.bool()
    hits = (predicted & truth).sum(0).float()
    per_kind = {kind: {"precision": float(hits[k] / predicted[:, k].sum().clamp(min=1)),
                       "recall": float(hits[k] / truth[:, k].sum().clamp(min=1))} for k, kind in enumerate(KINDS)}
    images, _ = sets["distractors only"]
    false_positives = (shape_probabilities(images, model) > 0.5).sum(0)
    return {"exact_set_accuracy": accuracy, "eval_counts": {k: v[0] for k, v in EVAL_SETS.items()},
            "distractors_only_false_positives_by_kind": dict(zip(KINDS, false_positives.tolist())),
            "confusion_1_object": {"rows_true_cols_predicted_top": list(KINDS), "matrix": confusion.tolist()},
            "per_kind_2_objects": per_kind}


def render_speed(seed: int, count: int = 2000) -> dict[str, float]:
    """Images per second of render() for 1- and 2-object scenes (one core)."""
    speed = {}
    for n in (1, 2):
        rng = make_rng(seed, 2, n)
        scenes = [sample_scene(rng, list(rng.choice(KINDS, n, replace=False))) for _ in range(count)]
        start = time.time()
        for scene in scenes:
            render(scene)
        speed[f"{n} object{'s' if n > 1 else ''}"] = round(count / (time.time() - start))
    return speed


def _machine() -> str:
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, 1 thread"


def print_table(report: dict) -> None:
    table = report["exact_set_accuracy"]
    columns = list(next(iter(table.values())))
    print(f"{'exact-set accuracy':<20}" + "".join(f"{c:>23}" for c in columns))
    for condition, row in table.items():
        print(f"{condition:<20}" + "".join(f"{row[c]:>23.4f}" for c in columns))
    print("\nconfusion, 1 object (rows true, columns top prediction):")
    print(" " * 10 + "".join(f"{k[:7]:>8}" for k in KINDS))
    for kind, row in zip(KINDS, report["confusion_1_object"]["matrix"]):
        print(f"{kind:<10}" + "".join(f"{v:>8}" for v in row))
    print("\n2 objects:  " + "  ".join(f"{k} P {v['precision']:.3f} R {v['recall']:.3f}"
                                       for k, v in report["per_kind_2_objects"].items()))
    print("\nfalse detections on", report["eval_counts"]["distractors only"], "distractor-only images:",
          report["distractors_only_false_positives_by_kind"])
    print(f"\nparameters {report['parameters']}, training {report['training']['seconds']:.0f} s on "
          f"{report['training']['machine']}; render speed (img/s) {report['render_images_per_second']}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ASSETS,
                        help="folder for evaluator.safetensors, its config and report (default: the shipped assets)")
    parser.add_argument("--steps", type=int, default=6000, help=f"training steps of {BATCH_SIZE} images")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model, seconds = train(args.steps, args.seed)
    save_evaluator(model, args.out / "evaluator.safetensors", CHANNELS)
    report = {"kinds": list(KINDS), "threshold": 0.5, "parameters": sum(p.numel() for p in model.parameters()),
              "training": {"steps": args.steps, "batch_size": BATCH_SIZE, "seed": args.seed,
                           "seconds": round(seconds), "machine": _machine(), "p_clean": P_CLEAN,
                           "p_texture": P_TEXTURE, "artefacts": {k: p for k, (_, p) in ARTEFACTS.items()}},
              "render_images_per_second": render_speed(args.seed)}
    report |= measure(model, args.seed)
    (args.out / "evaluator_report.json").write_text(json.dumps(report, indent=1) + "\n")
    print_table(report)


if __name__ == "__main__":
    main()
