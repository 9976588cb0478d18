"""Scores, summaries and figures of finished runs, on run folders built by hand (toy renders as the images)."""
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from sae_utils.evaluation import bootstrap_ci
from sae_utils.results import (compare_runs, evaluate_run, format_summary, load_run, parse_metrics, score_run,
                               summarise_scores)
from sae_utils.sampling import append_records, image_relpath
from sae_utils.toyworld import caption, make_rng, render, sample_scene

PAIRS = [("star", "heart"), ("circle", "square")]


def fake_run(folder, label="sd", one_object_seeds=(), seeds=range(4), attention=False):
    """A run folder whose "generated" images are toy renders: of both objects of the prompt, or, for the seeds in
    `one_object_seeds`, of the first object only."""
    records = []
    for a, b in PAIRS:
        prompt = caption(sample_scene(make_rng(0), [a, b]))
        for seed in seeds:
            kinds = [a] if seed in one_object_seeds else [a, b]
            path = folder / image_relpath(prompt, seed)
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(render(sample_scene(make_rng(seed, 7), kinds))).save(path)
            record = {"prompt": prompt, "words": [a, b], "seed": seed, "method": "sd", "label": label,
                      "category": "toy-seen", "image": image_relpath(prompt, seed)}
            if attention:
                record["attention"] = {"peak": [0.1 + seed / 100, 0.2], "peak_ratio": (0.1 + seed / 100) / 0.2,
                                       "overlap": 0.3}
            records.append(record)
    append_records(folder / "metadata.jsonl", records)
    return folder


def test_toy_metric_on_renders(tmp_path):
    both = evaluate_run(fake_run(tmp_path / "both"), "toy", n_boot=200)
    row = both.set_index("category").loc["all"]
    assert row["toy_both_present"] == 1.0 and row["toy_objects_found"] == 1.0
    assert (row["toy_both_present_low"], row["toy_both_present_high"]) == (1.0, 1.0)
    assert row["n"] == 8 and row["n_units"] == 2
    half = evaluate_run(fake_run(tmp_path / "half", one_object_seeds={1, 3}), "toy", n_boot=200)
    row = half.set_index("category").loc["all"]
    assert row["toy_both_present"] == 0.5 and row["toy_objects_found"] == 0.75
    assert row["toy_object1_present"] == 1.0 and row["toy_object2_present"] == 0.5
    scores = pd.read_csv(tmp_path / "half" / "scores.csv")
    assert len(scores) == 8
    assert scores.groupby("seed")["toy_both_present"].all().to_dict() == {0: True, 1: False, 2: True, 3: False}
    for name in ("summary.csv", "summary.json", "figures/bar_toy_both_present.png", "figures/grid.png"):
        assert (tmp_path / "half" / name).is_file(), name
    about = json.loads((tmp_path / "half" / "summary.json").read_text())
    assert "bootstrap" in about["interval"] and len(about["rows"]) == len(half)


def test_summary_intervals_over_prompts():
    rows = []
    for label, rates in (("always", [1, 1, 1, 1]), ("half", [1, 1, 0, 0])):
        for p, rate in enumerate(rates):
            for seed in range(3):
                rows.append({"label": label, "category": "animals" if p < 2 else "objects", "prompt": f"p{p}",
                             "seed": seed, "image": f"images/p{p}/{seed:04d}.png", "toy_both_present": bool(rate),
                             "attn_overlap": 0.1 * p + 0.01 * seed})
    summary = summarise_scores(pd.DataFrame(rows), n_boot=500).set_index(["label", "category"])
    always, half = summary.loc[("always", "all")], summary.loc[("half", "all")]
    assert (always["toy_both_present"], always["toy_both_present_low"], always["toy_both_present_high"]) == (1, 1, 1)
    assert half["toy_both_present_low"] < half["toy_both_present"] == 0.5 < half["toy_both_present_high"]
    assert (half["n"], half["n_units"]) == (12, 4)
    # the interval resamples prompts (each prompt's mean), not images
    prompt_means = [0.1 * p + 0.01 for p in range(4)]
    assert tuple(half[["attn_overlap", "attn_overlap_low", "attn_overlap_high"]]) == pytest.approx(
        bootstrap_ci(prompt_means, n_boot=500))
    assert summary.loc[("half", "animals"), "toy_both_present"] == 1.0
    assert summary.loc[("half", "objects"), "toy_both_present"] == 0.0
    assert "half | all | n=12 images, 4 prompts | toy_both_present 0.500" in format_summary(summary.reset_index())


def test_attention_stats_come_from_the_metadata(tmp_path):
    scores = score_run(fake_run(tmp_path / "run", attention=True), "toy")
    first = scores[scores["seed"] == 2].iloc[0]
    assert (first["attn_peak_min"], first["attn_peak_max"]) == pytest.approx((0.12, 0.2))
    assert first["attn_peak_ratio"] == pytest.approx(0.6) and first["attn_overlap"] == pytest.approx(0.3)


def test_comparison_and_grids_use_the_same_seeds(tmp_path):
    a = fake_run(tmp_path / "a", seeds=range(4))
    b = fake_run(tmp_path / "b", seeds=range(2, 6), one_object_seeds={2, 3, 4, 5})
    for run in (a, b):
        evaluate_run(run, "toy", n_boot=100, figures=False)
    summary = compare_runs([a, b], tmp_path / "cmp", n_boot=100)
    rates = summary[summary["category"] == "all"].set_index("label")["toy_both_present"]
    assert rates.to_dict() == {"a:sd": 1.0, "b:sd": 0.0}  # same label "sd": told apart by folder
    grids = sorted((tmp_path / "cmp" / "figures").glob("grid_*.png"))
    assert len(grids) == 2  # one per prompt
    width, height = Image.open(grids[0]).size
    assert width > height  # 2 runs x 2 common seeds (2 and 3), with titles
    assert (tmp_path / "cmp" / "figures" / "bar_toy_both_present.png").is_file()
    assert len(pd.read_csv(tmp_path / "cmp" / "scores.csv")) == 16


def test_errors_name_the_fix(tmp_path):
    run = fake_run(tmp_path / "run")
    (run / load_run(run)[0]["image"]).unlink()
    with pytest.raises(FileNotFoundError, match="regenerates exactly the missing ones"):
        load_run(run)
    with pytest.raises(FileNotFoundError, match="not a finished run"):
        load_run(tmp_path / "empty")
    with pytest.raises(ValueError, match="Unknown metrics"):
        parse_metrics("toy,fid")
    other = tmp_path / "animals"
    (other / "images").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(other / "images" / "x.png")
    append_records(other / "metadata.jsonl", [{"prompt": "a cat and a dog", "words": ["cat", "dog"], "seed": 0,
                                               "method": "sd", "image": "images/x.png"}])
    with pytest.raises(ValueError, match="toy-world prompts only"):
        score_run(other, "toy")
    with pytest.raises(FileNotFoundError, match="sae-evaluate"):
        compare_runs([other, run])


def test_transformers_metrics_per_image(tmp_path):
    """The CLIP path on a tiny random-weight CLIP (the real class, built offline): each image's row holds the
    scores `clip_scores` gives for that image and its own prompt."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor

    from sae_utils.evaluation import MetricModels, clip_scores
    from sae_utils.models import clip_tokenizer

    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=dict(small, vocab_size=49408, max_position_embeddings=77),
                                 vision_config=dict(small, image_size=32, patch_size=8), projection_dim=16)).eval()
    processor = CLIPProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": 32},
                                                                    crop_size={"height": 32, "width": 32}),
                              tokenizer=clip_tokenizer())
    run = fake_run(tmp_path / "run", seeds=range(2))
    scores = score_run(run, "clip", models=MetricModels(clip=model, clip_processor=processor))
    for prompt, rows in scores.groupby("prompt", sort=False):
        images = [run / path for path in rows["image"]]
        expected = clip_scores(images, prompt, rows["words"].iloc[0].split("|"), model, processor)
        assert rows["clip_full"].tolist() == pytest.approx(expected["full"].tolist(), abs=1e-6)
        assert rows["clip_min_object"].tolist() == pytest.approx(expected["min_object"].tolist(), abs=1e-6)
    summary = summarise_scores(scores, n_boot=50)
    assert {"clip_full", "clip_full_low", "clip_min_object_high"} <= set(summary.columns)
    assert "toy_both_present" not in scores.columns


def test_attention_only_scoring_is_allowed():
    assert parse_metrics("none") == [] and parse_metrics([]) == []
    assert parse_metrics("toy, clip") == ["toy", "clip"]
