"""Generation at scale on `tiny` (32 px images, 2 denoising steps): batching, resuming, metadata, deltas, shards."""
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from sae_utils.delta import extract_delta, save_delta, trainable_parameter_names
from sae_utils.prompts import attend_and_excite_prompts, multi_concept_split
from sae_utils.sampling import (GenerationConfig, append_records, generate, image_relpath, object_words,
                                prompt_category, prompt_set, prompt_slug, read_metadata, sampler_defaults,
                                SD_SAMPLING)

PROMPT = "a cat and a dog"



def config(tmp_path, name="run", **overrides):
    settings = dict(model="tiny", prompts=[PROMPT], seeds=[0, 1, 2], num_inference_steps=2, height=32, width=32,
                    output_dir=str(tmp_path / name), progress=False, device="cpu")
    return GenerationConfig(**{**settings, **overrides})


def pixels(path):
    return np.asarray(Image.open(path)).astype(int)


def test_sampler_defaults_are_kept(tiny):
    assert SD_SAMPLING == {"num_inference_steps": 50, "guidance_scale": 6.0}
    assert sampler_defaults(tiny) == SD_SAMPLING and sampler_defaults(tiny) is not SD_SAMPLING


def test_an_image_does_not_depend_on_the_batch(tiny, tmp_path):
    one = generate(config(tmp_path, "one", batch_size=1), pipe=tiny)
    three = generate(config(tmp_path, "three", batch_size=3), pipe=tiny)
    assert (one.generated, three.generated) == (3, 3)
    for seed in range(3):
        a = pixels(tmp_path / "one" / image_relpath(PROMPT, seed))
        b = pixels(tmp_path / "three" / image_relpath(PROMPT, seed))
        # batched kernels round differently (a pixel may move by 1 level); a shared generator would change everything
        assert np.abs(a - b).max() <= 1 and np.abs(a - b).mean() < 0.05
    first, second = (pixels(tmp_path / "one" / image_relpath(PROMPT, s)) for s in (0, 1))
    assert np.abs(first - second).mean() > 5


def test_a_second_run_resumes(tiny, tmp_path):
    assert generate(config(tmp_path, batch_size=1), pipe=tiny).generated == 3
    lost = tmp_path / "run" / image_relpath(PROMPT, 1)
    before = pixels(lost)
    again = generate(config(tmp_path, batch_size=1), pipe=tiny)
    assert (again.generated, again.skipped) == (0, 3)
    lost.unlink()
    again = generate(config(tmp_path, batch_size=1), pipe=tiny)
    assert (again.generated, again.skipped) == (1, 2)
    assert np.array_equal(pixels(lost), before)  # the same image, drawn again from its seed
    assert len((tmp_path / "run" / "metadata.jsonl").read_text().splitlines()) == 4  # the new record is appended
    assert sorted(r["seed"] for r in read_metadata(tmp_path / "run")) == [0, 1, 2]  # ... and replaces the old one
    assert not list((tmp_path / "run").rglob(".*.tmp-*"))  # no temporary file left behind


def test_metadata_and_attention(tiny, tmp_path):
    generate(config(tmp_path, prompts=[PROMPT, "a photo of a star with a heart"], seeds=[5], capture_attention=True),
             pipe=tiny)
    records = {r["prompt"]: r for r in read_metadata(tmp_path / "run")}
    cat_dog, toy = records[PROMPT], records["a photo of a star with a heart"]
    assert (cat_dog["words"], cat_dog["category"], toy["words"], toy["category"]) == (
        ["cat", "dog"], "animals", ["star", "heart"], "toy-seen")
    assert cat_dog["seed"] == 5 and cat_dog["method"] == "sd" and cat_dog["label"] == "sd"
    assert cat_dog["model"] == "tiny" and cat_dog["delta"] is None
    assert cat_dog["sampler"] == {"num_inference_steps": 2, "guidance_scale": 6.0, "height": 32, "width": 32,
                                  "scheduler": "PNDMScheduler"}
    assert Image.open(tmp_path / "run" / cat_dog["image"]).size == (32, 32)
    attention = cat_dog["attention"]
    maps = load_file(tmp_path / "run" / attention["maps"])["word_maps"]
    assert maps.shape == (2, 4, 4)  # tiny's map level (latents / 4) at 32 px
    assert attention["peak"] == pytest.approx(maps.flatten(1).amax(1).tolist())
    assert attention["peak_ratio"] == pytest.approx(min(attention["peak"]) / max(attention["peak"]))
    assert 0 <= attention["overlap"] <= 1
    saved = json.loads((tmp_path / "run" / "run.json").read_text())
    assert saved["method"] == "sd" and saved["capture_attention"] is True
    with pytest.raises(ValueError, match="other settings"):
        generate(config(tmp_path, prompts=[PROMPT], seeds=[5], capture_attention=True, guidance_scale=3.0), pipe=tiny)


def test_a_test_time_method_records_its_losses(tiny, tmp_path):
    generate(config(tmp_path, method="attend-and-excite", seeds=[0], max_refinement_steps=2), pipe=tiny)
    record, = read_metadata(tmp_path / "run")
    assert record["sampler"]["guidance_scale"] == 7.5  # Attend-and-Excite's own setting on SD-like models
    assert record["method_settings"]["max_iter_to_alter"] == 1  # 25 of 50 steps -> 1 of 2
    assert record["method_settings"]["thresholds"] == {"0": 0.8}
    assert len(record["test_time"]["loss"]) == 1 and record["test_time"]["refinement_iterations"] == {"0": 2}


def test_a_delta_is_applied_for_the_run_and_undone(tiny, tmp_path):
    names = trainable_parameter_names(tiny.unet, "k")
    params = dict(tiny.unet.named_parameters())
    originals = {name: params[name].detach().clone() for name in names}
    with torch.no_grad():
        for name in names:
            params[name].mul_(3.0)
    delta_path = save_delta(extract_delta(tiny, names), tmp_path / "keys3x" / "delta.safetensors")
    with torch.no_grad():
        for name in names:
            params[name].copy_(originals[name])
    generate(config(tmp_path, "plain", seeds=[0]), pipe=tiny)
    generate(config(tmp_path, "with-delta", seeds=[0], delta=str(delta_path)), pipe=tiny)
    assert all(torch.equal(params[name], originals[name]) for name in names)  # undone after the run
    plain, tuned = (pixels(tmp_path / run / image_relpath(PROMPT, 0)) for run in ("plain", "with-delta"))
    assert np.abs(plain - tuned).mean() > 1
    record, = read_metadata(tmp_path / "with-delta")
    assert record["label"] == "sd+keys3x" and record["delta"]["path"] == str(delta_path.resolve())
    assert len(record["delta"]["sha256"]) == 16 and record["delta"]["fingerprint"]


def test_processes_split_the_work_and_their_shards_merge(tiny, tmp_path, monkeypatch):
    import accelerate

    class TwoProcesses:
        def __init__(self, rank):
            self.process_index, self.num_processes, self.is_main_process = rank, 2, rank == 0
            self.device = torch.device("cpu")

    for rank in (1, 0):
        monkeypatch.setattr(accelerate, "PartialState", lambda cpu=False, rank=rank: TwoProcesses(rank))
        summary = generate(config(tmp_path, seeds=[0, 1, 2, 3]), pipe=tiny)
        assert summary.generated == 2
        shard = read_metadata_of(tmp_path / "run" / f"metadata-{rank}.jsonl")
        assert [r["seed"] for r in shard] == [rank, rank + 2] and all(r["process"] == rank for r in shard)
    monkeypatch.undo()
    assert sorted(r["seed"] for r in read_metadata(tmp_path / "run")) == [0, 1, 2, 3]
    assert generate(config(tmp_path, seeds=[0, 1, 2, 3]), pipe=tiny).generated == 0  # one process: all there


def read_metadata_of(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_read_metadata_skips_only_a_cut_off_last_line(tmp_path):
    append_records(tmp_path / "metadata.jsonl", [{"prompt": "p", "seed": 0, "method": "sd", "image": "0.png"}])
    with open(tmp_path / "metadata.jsonl", "a") as f:
        f.write('{"prompt": "p", "se')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert len(read_metadata(tmp_path)) == 1
    assert "cut off" in str(caught[0].message)
    with open(tmp_path / "metadata.jsonl", "a") as f:
        f.write('\n{"prompt": "p", "seed": 1, "method": "sd", "image": "1.png"}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_metadata(tmp_path)


def test_the_named_prompt_sets(tmp_path):
    benchmark = prompt_set("attend-and-excite")
    assert len(benchmark) == 276 and benchmark == attend_and_excite_prompts()
    assert [len(prompt_set(f"attend-and-excite/{c}")) for c in ("animals", "animals_objects", "objects")] == \
        [66, 144, 66]
    assert len(prompt_set("multi-concept")) == 200
    assert [len(prompt_set(f"multi-concept/{p}")) for p in ("seen-seen", "seen-unseen", "unseen-unseen")] == \
        [100, 80, 20]
    assert (len(prompt_set("toy")), len(prompt_set("toy/seen")), len(prompt_set("toy/held-out"))) == (28, 20, 8)
    listed = tmp_path / "prompts.txt"
    listed.write_text("# my prompts\na cat and a dog\n\na photo of a car with a bird\n")
    assert prompt_set(str(listed)) == ["a cat and a dog", "a photo of a car with a bird"]
    with pytest.raises(ValueError, match="neither a named prompt set"):
        prompt_set("attend-and-excitement")
    with pytest.raises(ValueError, match="more than once"):
        generate(GenerationConfig(model="tiny", prompts=[PROMPT, PROMPT], output_dir=str(tmp_path / "x")))


def test_words_categories_and_folders():
    benchmark = next(p for p in attend_and_excite_prompts("animals_objects") if len(p.split()) > 5)
    assert len(object_words(benchmark)) == 2 and all(w in benchmark for w in object_words(benchmark))
    assert object_words("a photo of a red car and a dog") == ["car", "dog"]
    split = multi_concept_split()
    seen, unseen = split["seen"][0], split["unseen"][0]
    assert prompt_category(f"a photo of a {unseen} and a {seen}", [unseen, seen]) == "seen-unseen"
    assert prompt_category(f"a photo of a {unseen} and a {split['unseen'][1]}", [unseen, split["unseen"][1]]) == \
        "unseen-unseen"
    assert prompt_category("a photo of a circle and a square", ["circle", "square"]) == "toy-seen"
    assert prompt_category("a photo of a circle and a ring", ["circle", "ring"]) == "toy-held-out"
    assert prompt_category("a zorb and a blip", ["zorb", "blip"]) == "custom"
    assert prompt_slug("a cat and a dog") == "a_cat_and_a_dog"
    variants = ["a cat and a dog", "a cat, and a dog", "A cat and a dog", "a_cat and a dog"]
    assert len({prompt_slug(p) for p in variants}) == 4


def test_every_shipped_prompt_reads_its_objects_on_tokens_of_their_own(tokenizer):
    from sae_utils.sampling import object_word_specs
    from sae_utils.tokens import word_token_positions

    for name in ("attend-and-excite", "multi-concept", "toy"):
        for prompt in prompt_set(name):
            specs = object_word_specs(prompt)
            assert [w for w, _ in specs] == object_words(prompt)
            positions = word_token_positions(tokenizer, prompt, specs)  # raises on a shared or ambiguous word
            assert len({p for word in positions for p in word}) == sum(map(len, positions)), prompt
