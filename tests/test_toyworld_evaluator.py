"""The shipped toy-world evaluator: accuracy on fresh renders, no false alarms, the API's contracts."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from sae_utils.toyworld import detected_kinds, objects_present, shape_probabilities
from sae_utils.toyworld import train_evaluator as trainer
from sae_utils.toyworld.evaluator import DEFAULT_WEIGHTS, as_batch, config_path, load_evaluator, save_evaluator
from sae_utils.toyworld.world import KINDS, Scene, draw_outline, make_rng, render, sample_scene

TEST_STREAM = 77  # neither the training stream (0) nor the report's (1)


def fresh_renders(n_objects: int, count: int, seed: int = 2024) -> tuple[np.ndarray, list[set[str]]]:
    """count renders (count, 32, 32, 3) of n_objects distinct kinds, and their true kind sets."""
    rng = make_rng(seed, TEST_STREAM, n_objects)
    scenes = [sample_scene(rng, list(rng.choice(KINDS, n_objects, replace=False))) for _ in range(count)]
    return np.stack([render(s) for s in scenes]), [set(s.kinds) for s in scenes]


@pytest.mark.parametrize("n_objects", [1, 2])
def test_exact_set_accuracy_on_fresh_renders(n_objects):
    images, truth = fresh_renders(n_objects, 400)
    found = detected_kinds(images)
    accuracy = np.mean([f == t for f, t in zip(found, truth)])
    assert accuracy >= 0.98, f"{n_objects}-object exact-set accuracy {accuracy:.3f}"


def test_robust_to_mild_generation_artefacts():
    images, truth = fresh_renders(2, 300, seed=7)
    x = as_batch(images)
    gen = torch.Generator().manual_seed(0)
    noisy = (x + 0.06 * torch.randn(x.shape, generator=gen)).clamp(0, 1)  # leftover noise
    tinted = x * torch.tensor([0.93, 0.9, 0.97])[:, None, None]  # off-white background
    blurred = trainer.blur(x, gen)
    for name, y in [("noise", noisy), ("tint", tinted), ("blur", blurred)]:
        accuracy = np.mean([f == t for f, t in zip(detected_kinds(y), truth)])
        assert accuracy >= 0.95, f"{name}: exact-set accuracy {accuracy:.3f}"


def test_nothing_on_blank_or_tinted_background():
    blank = np.full((3, 32, 32, 3), 255, np.uint8)
    blank[1] = (240, 232, 250)  # pastel
    blank[2] = (250, 250, 238)  # off-white
    assert detected_kinds(blank) == [set(), set(), set()]
    assert shape_probabilities(blank).max() < 0.1


def test_nothing_on_a_blob_or_a_long_ellipse():
    t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    potato = np.stack([(1 + 0.3 * np.cos(2 * t + 1) + 0.2 * np.cos(3 * t)) * np.cos(t),
                       (1 + 0.3 * np.cos(2 * t + 1) + 0.2 * np.cos(3 * t)) * np.sin(t)], 1) / 1.5
    ellipse = np.stack([np.cos(t), 0.4 * np.sin(t)], 1)

    def drawn(outline):
        def extra(draw, side):
            draw_outline(draw, outline, 0.5, 0.5, 0.25, 30.0, (40, 80, 220), side)
        return render(Scene(), extra=extra)
    assert detected_kinds(np.stack([drawn(potato), drawn(ellipse)])) == [set(), set()]


def test_few_false_alarms_on_random_distractors():
    rng = make_rng(11, TEST_STREAM)
    images = np.stack([trainer.sample_example(rng, 0, 1)[0] for _ in range(300)])
    false_alarms = sum(bool(found) for found in detected_kinds(images))
    assert false_alarms <= 0.05 * len(images), f"{false_alarms} of {len(images)} blobs called a shape"


def test_distractors_do_not_hide_objects():
    rng = make_rng(12, TEST_STREAM)
    examples = [trainer.sample_example(rng, 2, 1, distinct=True) for _ in range(200)]
    present = objects_present(np.stack([e[0] for e in examples]),
                              [[KINDS[k] for k in np.flatnonzero(e[1])] for e in examples])
    assert present.float().mean() >= 0.97


def test_input_formats_agree():
    images, _ = fresh_renders(2, 6, seed=3)
    as_uint8 = shape_probabilities(images)
    as_pil = shape_probabilities([Image.fromarray(im) for im in images])
    as_float = shape_probabilities(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)
    assert as_uint8.shape == (6, len(KINDS))
    torch.testing.assert_close(as_pil, as_uint8, rtol=0, atol=1e-6)
    torch.testing.assert_close(as_float, as_uint8, rtol=0, atol=1e-6)


def test_other_sizes_are_resized():
    scenes = [sample_scene(make_rng(s, TEST_STREAM), ["heart", "cross"]) for s in range(20)]
    big = np.stack([render(s, size=64) for s in scenes])
    assert as_batch(big).shape == (20, 3, 32, 32)
    assert all(found == {"heart", "cross"} for found in detected_kinds(big))


def test_objects_present_shapes_and_words():
    images, truth = fresh_renders(2, 4, seed=5)
    asked = [sorted(t) for t in truth]
    assert objects_present(images, asked).all()
    shared = objects_present(images, ["circle", "square", "triangle"])
    assert shared.shape == (4, 3) and shared.dtype == torch.bool
    expected = torch.tensor([[k in t for k in ("circle", "square", "triangle")] for t in truth])
    assert torch.equal(shared, expected)


def test_unknown_words_and_bad_inputs_teach():
    images, _ = fresh_renders(1, 2)
    with pytest.raises(ValueError, match="unknown kind 'dog'.*circle, square, triangle, star, heart, cross, ring, moon$"):
        objects_present(images, ["star", "dog"])
    with pytest.raises(ValueError, match="one list of K kinds per image"):
        objects_present(images, [["star"], ["star", "heart"]])
    with pytest.raises(TypeError, match="uint8"):
        shape_probabilities(images.astype(np.float32))
    with pytest.raises(TypeError, match="list of PIL images"):
        shape_probabilities(Image.fromarray(images[0]))


def test_shipped_model_is_small_and_reported():
    model = load_evaluator()
    assert sum(p.numel() for p in model.parameters()) < 500_000
    assert DEFAULT_WEIGHTS.stat().st_size < 2_000_000
    report = json.loads((DEFAULT_WEIGHTS.parent / "evaluator_report.json").read_text())
    clean = report["exact_set_accuracy"]["clean"]
    assert clean["1 object"] >= 0.98 and clean["2 objects"] >= 0.98
    assert sum(report["eval_counts"][k] for k in ("1 object", "2 objects")) >= 4000


def test_missing_or_corrupt_weights_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere\.safetensors.*train_evaluator"):
        load_evaluator(tmp_path / "nowhere.safetensors")
    corrupt = tmp_path / "evaluator.safetensors"
    corrupt.write_bytes(b"not a safetensors file")
    shutil.copy(config_path(DEFAULT_WEIGHTS), config_path(corrupt))
    with pytest.raises(RuntimeError, match=r"evaluator\.safetensors.*could not be loaded.*train_evaluator"):
        load_evaluator(corrupt)


def test_training_steps_and_save_load_round_trip(tmp_path):
    model, _ = trainer.train(steps=2, seed=0)
    path = tmp_path / "evaluator.safetensors"
    save_evaluator(model, path, trainer.CHANNELS)
    images, _ = fresh_renders(1, 8)
    reloaded = load_evaluator(path)
    torch.testing.assert_close(shape_probabilities(images, reloaded), shape_probabilities(images, model))


def test_augmentations_keep_range_and_are_seeded():
    x = as_batch(fresh_renders(2, 16)[0])
    a = trainer.augment(x, torch.Generator().manual_seed(1), always=True)
    b = trainer.augment(x, torch.Generator().manual_seed(1), always=True)
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b)
    assert (a - x).abs().mean() > 0.02, "artefacts were applied"
