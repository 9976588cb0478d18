"""Metrics on tiny random-weight versions of the real transformers classes (CLIP, BLIP, OWLv2), built offline."""
import copy
import importlib.util
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from transformers import (BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessorPil,
                          BlipProcessor, CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor, Owlv2Config,
                          Owlv2ForObjectDetection, Owlv2ImageProcessorPil, Owlv2Processor)

from sae_utils.evaluation import (IMAGENET_TEMPLATES, MetricModelNotAvailable, MetricModels, blip_captions,
                                  blip_text_similarity, bootstrap_ci, box_scores_to_object_scores,
                                  clip_image_text_similarity, clip_scores, detect_objects, detection_success,
                                  ensemble_texts, evaluate_images, fid, frechet_distance, load_blip, load_clip,
                                  load_detector, object_subprompts, objects_present, summarise, text_embeddings,
                                  text_text_similarity, to_pil_images)
from sae_utils.models import ModelNotAvailableError, clip_tokenizer
from sae_utils.prompts import attend_and_excite_prompts, attend_and_excite_words, multi_concept_eval_prompts

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
SMALL_VISION = dict(SMALL, image_size=32, patch_size=8)


# ----------------------------------------------------------------------------------------------------------
# Tiny models and inputs
# ----------------------------------------------------------------------------------------------------------

def random_images(n, seed=0, size=(40, 48)):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=dict(SMALL, vocab_size=49408, max_position_embeddings=77),
                                 vision_config=SMALL_VISION, projection_dim=16)).eval()
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return model, CLIPProcessor(image_processor=image_processor, tokenizer=clip_tokenizer())


@pytest.fixture(scope="module")
def blip():
    words = "[PAD] [UNK] [CLS] [SEP] [MASK] [DEC] a picture of cat dog and with the on red car sits".split()
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(words)}, bos_token="[DEC]")
    text = dict(SMALL, vocab_size=len(words), max_position_embeddings=64, bos_token_id=words.index("[DEC]"),
                pad_token_id=0, sep_token_id=words.index("[SEP]"), eos_token_id=words.index("[SEP]"))
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=SMALL_VISION,
                                                    projection_dim=32)).eval()
    image_processor = BlipImageProcessorPil(size={"height": 32, "width": 32})
    return model, BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def owl():
    tokenizer = copy.deepcopy(clip_tokenizer())
    tokenizer.model_max_length = 16  # OWLv2 reads 16 text tokens
    torch.manual_seed(0)
    model = Owlv2ForObjectDetection(Owlv2Config(
        text_config=dict(SMALL, vocab_size=49408, max_position_embeddings=16), vision_config=SMALL_VISION,
        projection_dim=32)).eval()
    image_processor = Owlv2ImageProcessorPil(size={"height": 32, "width": 32})
    return model, Owlv2Processor(image_processor=image_processor, tokenizer=tokenizer)


# ----------------------------------------------------------------------------------------------------------
# Sub-prompts and templates
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prompt, words, expected", [
    ("a cat and a dog", ["cat", "dog"], ["a cat", "a dog"]),
    ("a horse with a glasses", ["horse", "glasses"], ["a horse", "a glasses"]),
    ("a monkey and a red car", ["monkey", "car"], ["a monkey", "a red car"]),
    ("a pink crown and a purple bow", ["crown", "bow"], ["a pink crown", "a purple bow"]),
    ("a photo of a cat and a dog", ["cat", "dog"], ["a photo of a cat", "a photo of a dog"]),
    ("a photo of a lion with a crown", ["lion", "crown"], ["a photo of a lion", "a photo of a crown"]),
    ("a photo of a cat and a photo of a dog", ["cat", "dog"], ["a photo of a cat", "a photo of a dog"]),
    ("a cat and a dog and a bird", ["cat", "dog", "bird"], ["a cat", "a dog", "a bird"]),
    ("a teddy bear with a red car", ["teddy bear", "car"], ["a teddy bear", "a red car"]),
    ("a cat sitting next to a dog", ["cat", "dog"], ["a cat", "a dog"]),  # no connector: "a {word}"
])
def test_object_subprompts(prompt, words, expected):
    assert object_subprompts(prompt, words) == expected


@pytest.mark.parametrize("prompt, words, message", [
    ("a black and white cat with a dog", ["cat", "dog"], "3 pieces"),
    ("a cat and a dog", ["dog", "cat"], "order"),
    ("a cat and a dog", "cat", "list of object words"),
])
def test_object_subprompts_errors_explain(prompt, words, message):
    with pytest.raises(ValueError, match=message):
        object_subprompts(prompt, words)


def test_subprompts_agree_with_attend_and_excite_split_on_the_benchmark():
    prompts = attend_and_excite_prompts()
    assert len(prompts) == 276
    for prompt in prompts:
        words = attend_and_excite_words(prompt)
        reference = prompt.split(" and ") if " and " in prompt else prompt.split(" with ")  # their split
        parts = object_subprompts(prompt, words)
        assert parts == reference and all(w in p.split() for w, p in zip(words, parts))


def test_templated_prompts_share_their_lead_in():
    for prompt in multi_concept_eval_prompts():
        first, second = re.split(r" (?:and|with) ", prompt)
        words = [first.removeprefix("a photo of a "), second.removeprefix("a ")]
        assert object_subprompts(prompt, words) == [f"a photo of a {w}" for w in words]


def test_templates_are_openai_clip_imagenet_templates():
    source = (Path(importlib.util.find_spec("open_clip").submodule_search_locations[0])
              / "zero_shot_metadata.py").read_text()
    block = source.split("OPENAI_IMAGENET_TEMPLATES = (")[1].split("\n)")[0]
    assert IMAGENET_TEMPLATES == tuple(t.replace("{c}", "{}") for t in re.findall(r"lambda c: f'(.*?)',", block))
    assert len(IMAGENET_TEMPLATES) == 80


def test_ensemble_texts_keeps_attend_and_excite_article_cleanup():
    texts = ensemble_texts("a cat and a dog")
    assert texts[0] == "a bad photo of a cat and a dog." and len(texts) == 80
    assert ensemble_texts("a dog and a apple", ["a photo of the {}."]) == ["a photo of a dog and apple."]
    with pytest.raises(ValueError, match="'{}'"):
        ensemble_texts("a cat", ["a photo"])


# ----------------------------------------------------------------------------------------------------------
# CLIP
# ----------------------------------------------------------------------------------------------------------
def test_clip_similarity_equals_the_models_own_cosine(clip):
    model, processor = clip
    images, texts = random_images(4), ["a cat", "a dog and a frog", "a red car", "two birds on a bench"]
    similarity = clip_image_text_similarity(images, texts, model, processor, batch_size=3)
    inputs = processor(text=texts, images=images, padding=True, return_tensors="pt")
    with torch.no_grad():  # CLIP's forward: logits_per_image = exp(logit_scale) * cosine
        out = model(**inputs)
    expected = out.logits_per_image.diagonal() / model.logit_scale.exp()
    assert similarity.shape == (4,)
    torch.testing.assert_close(similarity, expected, atol=1e-5, rtol=1e-5)
    assert similarity.abs().max() <= 1


def test_text_embeddings_do_not_depend_on_padding_or_batch(clip):
    model, processor = clip
    alone = text_embeddings(["a cat"], model, processor)
    padded = text_embeddings(["a cat", "a much longer sentence about a dog sitting on a bench"], model, processor,
                             batch_size=2)
    torch.testing.assert_close(alone[0], padded[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone.norm(dim=-1), torch.ones(1))


def test_clip_scores_full_objects_and_min(clip):
    model, processor = clip
    images = random_images(5, seed=1)
    scores = clip_scores(images, "a monkey and a red car", ["monkey", "car"], model, processor, templates=None)
    assert scores["objects"].shape == (5, 2)
    torch.testing.assert_close(scores["full"], clip_image_text_similarity(images, "a monkey and a red car",
                                                                          model, processor), atol=1e-6, rtol=0)
    for k, text in enumerate(["a monkey", "a red car"]):
        torch.testing.assert_close(scores["objects"][:, k],
                                   clip_image_text_similarity(images, text, model, processor), atol=1e-6, rtol=0)
    expected_min = torch.minimum(scores["objects"][:, 0], scores["objects"][:, 1])
    assert torch.equal(scores["min_object"], expected_min)


def test_template_ensemble_is_the_normalised_mean_of_template_embeddings(clip):
    model, processor = clip
    identity = text_embeddings(["a cat and a dog"], model, processor, templates=["{}"])
    torch.testing.assert_close(identity, text_embeddings(["a cat and a dog"], model, processor))
    templates = ["a photo of a {}.", "a drawing of the {}."]
    plain = text_embeddings(["a photo of a cat.", "a drawing of the cat."], model, processor)
    mean = plain.mean(0)
    torch.testing.assert_close(text_embeddings(["cat"], model, processor, templates=templates)[0],
                               mean / mean.norm(), atol=1e-6, rtol=0)


def test_text_text_similarity_is_one_on_identical_texts_and_symmetric(clip):
    model, processor = clip
    a, b = ["a cat and a dog", "a red car"], ["two cats sleeping on a couch", "a car parked in a street"]
    torch.testing.assert_close(text_text_similarity(a, a, model, processor), torch.ones(2), atol=1e-5, rtol=0)
    ab, ba = text_text_similarity(a, b, model, processor), text_text_similarity(b, a, model, processor)
    torch.testing.assert_close(ab, ba, atol=1e-6, rtol=0)
    assert (ab < 0.9999).all()
    with pytest.raises(ValueError, match="one text per item"):
        text_text_similarity(a, ["x", "y", "z"], model, processor)


def test_clip_scores_are_deterministic_and_batch_independent(clip):
    model, processor = clip
    images = random_images(5, seed=2)
    first = clip_scores(images, "a cat and a dog", ["cat", "dog"], model, processor, batch_size=2)
    second = clip_scores(images, "a cat and a dog", ["cat", "dog"], model, processor, batch_size=2)
    one_batch = clip_scores(images, "a cat and a dog", ["cat", "dog"], model, processor, batch_size=5)
    for key in first:
        assert torch.equal(first[key], second[key])
        torch.testing.assert_close(first[key], one_batch[key], atol=1e-5, rtol=0)


def test_image_inputs_agree_across_formats(clip, tmp_path):
    model, processor = clip
    images = random_images(2, seed=3)
    tensor = torch.from_numpy(np.stack([np.asarray(i) for i in images])).permute(0, 3, 1, 2).float() / 255
    paths = []
    for i, image in enumerate(images):
        image.save(tmp_path / f"{i}.png")
        paths.append(tmp_path / f"{i}.png")
    reference = clip_image_text_similarity(images, "a cat", model, processor)
    for other in (tensor, paths, [np.asarray(i) for i in images]):
        assert torch.equal(clip_image_text_similarity(other, "a cat", model, processor), reference)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        to_pil_images(tensor * 2)
    with pytest.raises(TypeError, match="list of images"):
        to_pil_images(images[0])


# ----------------------------------------------------------------------------------------------------------
# BLIP
# ----------------------------------------------------------------------------------------------------------
def test_blip_captions_strip_the_prompt_and_are_deterministic(blip):
    model, processor = blip
    images = random_images(3, seed=4)
    captions = blip_captions(images, model, processor, batch_size=2, max_length=12, min_length=8)
    assert captions == blip_captions(images, model, processor, batch_size=3, max_length=12, min_length=8)
    inputs = processor(images=images, text=["a picture of "] * 3, return_tensors="pt")
    with torch.no_grad():
        full = model.generate(**inputs, num_beams=3, max_length=12, min_length=8)
    decoded = processor.batch_decode(full, skip_special_tokens=True)
    assert len(captions) == 3 and any(captions)
    assert decoded == [f"a picture of {c}".strip() for c in captions]
    unconditional = blip_captions(images, model, processor, prompt=None, max_length=6, min_length=3)
    assert len(unconditional) == 3 and all(isinstance(c, str) for c in unconditional)


def test_blip_text_similarity_compares_captions_with_the_prompt(blip, clip):
    images = random_images(2, seed=5)
    result = blip_text_similarity(images, "a cat and a dog", *blip, *clip, max_length=10, min_length=6)
    expected = text_text_similarity(result["captions"], "a cat and a dog", *clip, templates_b=IMAGENET_TEMPLATES)
    torch.testing.assert_close(result["similarity"], expected)
    assert result["similarity"].shape == (2,)


# ----------------------------------------------------------------------------------------------------------
# Detection
# ----------------------------------------------------------------------------------------------------------
def test_object_scores_are_the_max_sigmoid_over_boxes():
    logits = torch.tensor([[[0.0, -3.0], [2.0, -1.0], [-1.0, 1.0]],    # image 0: 3 boxes x 2 objects
                           [[-5.0, -5.0], [-4.0, 0.5], [-6.0, -2.0]]])
    expected = torch.tensor([[2.0, 1.0], [-4.0, 0.5]]).sigmoid()
    torch.testing.assert_close(box_scores_to_object_scores(logits), expected)


def test_threshold_and_all_objects_success():
    scores = torch.tensor([[0.50, 0.31], [0.30, 0.90], [0.05, 0.02]])
    present = objects_present(scores, threshold=0.3)
    assert present.tolist() == [[True, True], [False, True], [False, False]]  # 0.30 is not above 0.3
    assert detection_success(present).tolist() == [True, False, False]
    assert objects_present(scores, threshold=0.0).all()
    with pytest.raises(ValueError, match="bool"):
        detection_success(scores)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        objects_present(scores, threshold=30)


def test_tiny_owlv2_matches_transformers_post_processing(owl):
    model, processor = owl
    images, words = random_images(3, seed=6), ["cat", "dog"]
    scores, present = detect_objects(images, words, model, processor, threshold=0.5, batch_size=2)
    assert scores.shape == (3, 2) and present.dtype == torch.bool
    assert torch.equal(present, scores > 0.5) and ((0 <= scores) & (scores <= 1)).all()
    again, _ = detect_objects(images, words, model, processor, threshold=0.5, batch_size=3)
    torch.testing.assert_close(scores, again, atol=1e-6, rtol=0)
    inputs = processor(text=[["a photo of a cat", "a photo of a dog"]] * 3, images=images, return_tensors="pt")
    with torch.no_grad():
        boxes = processor.post_process_grounded_object_detection(model(**inputs), threshold=0.0)
    for image_scores, kept in zip(scores, boxes):  # each kept box carries its best object's score
        torch.testing.assert_close(kept["scores"].max(), image_scores.max(), atol=1e-6, rtol=0)
        for k in range(2):
            assert (kept["scores"][kept["labels"] == k] <= image_scores[k] + 1e-6).all()


# ----------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loader, name", [(load_clip, "openai/clip-vit-base-patch16"),
                                          (load_blip, "Salesforce/blip-image-captioning-base"),
                                          (load_detector, "google/owlv2-base-patch16-ensemble")])
def test_missing_weights_fail_fast_with_instructions(loader, name, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(MetricModelNotAvailable) as error:
        loader(name, device="cpu")
    assert time.perf_counter() - start < 5
    message = str(error.value)
    assert name in message and f"hf download {name}" in message and "HF_HUB_OFFLINE" in message
    assert isinstance(error.value, ModelNotAvailableError)


def test_unreachable_hub_fails_fast_without_offline_mode(monkeypatch):
    import sae_utils.evaluation.loading as loading

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(loading, "_hub_reachable", lambda: False)  # no socket opened: the test stays offline
    with pytest.raises(MetricModelNotAvailable, match="cannot be reached"):
        load_clip("openai/clip-vit-base-patch16", device="cpu")


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(MetricModelNotAvailable, match="does not exist"):
        load_clip(str(tmp_path / "no-such-model"), device="cpu")


def test_local_folders_load_back(clip, blip, owl, tmp_path):
    for (model, processor), folder in ((clip, tmp_path / "clip"), (blip, tmp_path / "blip"), (owl, tmp_path / "owl")):
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
    loaded_clip = load_clip(tmp_path / "clip", device="cpu")
    # PIL image processors, also where torchvision is installed (its backend resizes to other pixels)
    assert type(loaded_clip[1].image_processor) is CLIPImageProcessorPil
    images = random_images(2, seed=7)
    torch.testing.assert_close(clip_image_text_similarity(images, "a cat", *loaded_clip),
                               clip_image_text_similarity(images, "a cat", *clip))
    loaded_blip = load_blip(tmp_path / "blip", device="cpu")
    assert type(loaded_blip[1].image_processor) is BlipImageProcessorPil
    assert blip_captions(images, *loaded_blip, max_length=10) == blip_captions(images, *blip, max_length=10)
    loaded_owl = load_detector(str(tmp_path / "owl"), device="cpu")
    assert type(loaded_owl[1].image_processor) is Owlv2ImageProcessorPil
    torch.testing.assert_close(detect_objects(images, ["cat"], *loaded_owl)[0],
                               detect_objects(images, ["cat"], *owl)[0])


# ----------------------------------------------------------------------------------------------------------
# Aggregation
# ----------------------------------------------------------------------------------------------------------
def test_bootstrap_ci_contains_the_mean_and_narrows_with_more_samples():
    rng = np.random.default_rng(0)
    small, large = rng.normal(0.3, 0.1, 30), rng.normal(0.3, 0.1, 3000)
    mean, low, high = bootstrap_ci(small)
    assert mean == pytest.approx(small.mean()) and low < mean < high
    _, low_large, high_large = bootstrap_ci(large)
    assert high_large - low_large < (high - low) / 5
    normal_width = 2 * 1.96 * large.std(ddof=1) / np.sqrt(len(large))  # the textbook interval, for large n
    assert high_large - low_large == pytest.approx(normal_width, rel=0.15)


def test_bootstrap_ci_is_deterministic_and_exact_on_constants():
    values = np.random.default_rng(1).random(50)
    assert bootstrap_ci(values, seed=3) == bootstrap_ci(values, seed=3)
    assert bootstrap_ci(values, seed=3) != bootstrap_ci(values, seed=4)
    assert bootstrap_ci([0.1] * 37) == (0.1, 0.1, 0.1)
    assert bootstrap_ci([True, False, True, True])[0] == 0.75
    with pytest.raises(ValueError, match="NaN"):
        bootstrap_ci([0.1, float("nan")])


def test_summarise_by_method_and_category_with_prompt_units():
    records = []
    for method, offset in (("sd", 0.0), ("sepen", 0.1)):
        for category, prompts in (("animals", ["a cat and a dog", "a bird and a frog"]), ("objects", ["a bow"])):
            for p, prompt in enumerate(prompts):
                for image in range(2 + p):  # unequal images per prompt: prompt means differ from image means
                    records.append(dict(method=method, category=category, prompt=prompt, image=image, seed=image,
                                        clip_full=offset + 0.1 * image + p, success=image % 2 == 0))
    table = summarise(records, by=["method", "category"], n_boot=200)
    frame = pd.DataFrame(records)
    assert list(table.columns[:3]) == ["method", "category", "n"] and len(table) == 4
    assert "image" not in table.columns and "seed" not in table.columns
    expected = frame.groupby(["method", "category"])[["clip_full", "success"]].mean().reset_index()
    np.testing.assert_allclose(table["clip_full"], expected["clip_full"])
    np.testing.assert_allclose(table["success"], expected["success"])
    assert (table["clip_full_low"] <= table["clip_full"]).all()
    assert (table["clip_full"] <= table["clip_full_high"]).all()
    by_prompt = summarise(records, by="method", metrics=["clip_full"], unit="prompt", n_boot=200)
    prompt_means = frame.groupby(["method", "prompt"])["clip_full"].mean().groupby("method").mean()
    np.testing.assert_allclose(by_prompt["clip_full"], prompt_means.to_numpy())
    assert by_prompt["n_units"].tolist() == [3, 3]
    with pytest.raises(ValueError, match="not in the records"):
        summarise(records, by=["model"])


# ----------------------------------------------------------------------------------------------------------
# FID and the one-call evaluation
# ----------------------------------------------------------------------------------------------------------
def test_frechet_distance_closed_forms():
    mu, sigma = np.array([0.5, -1.0]), np.array([[2.0, 0.3], [0.3, 1.0]])
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-6)
    # diagonal covariances: |mu1 - mu2|^2 + sum (s1 - s2)^2 over the standard deviations
    s1, s2 = np.array([1.0, 4.0]), np.array([0.25, 1.0])
    expected = 1.0 ** 2 + 2.0 ** 2 + (1.0 - 0.5) ** 2 + (2.0 - 1.0) ** 2
    assert frechet_distance([0.0, 0.0], np.diag(s1), [1.0, 2.0], np.diag(s2)) == pytest.approx(expected)


def test_fid_without_clean_fid_names_the_package(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "cleanfid" else real_find_spec(name, *a))
    with pytest.raises(MetricModelNotAvailable, match="pip install clean-fid"):
        fid(random_images(2), random_images(2, seed=1))


def test_evaluate_images_gives_one_record_per_image(clip, blip, owl):
    models = MetricModels(*clip, *blip, *owl)
    images = random_images(3, seed=8)
    records = evaluate_images(images, "a cat and a dog", ["cat", "dog"], models, threshold=0.5, batch_size=2,
                              method="tiny", category="animals")
    assert len(records) == 3 and [r["image"] for r in records] == [0, 1, 2]
    scores = clip_scores(images, "a cat and a dog", ["cat", "dog"], *clip)
    assert [r["clip_min_object"] for r in records] == pytest.approx(scores["min_object"].tolist(), abs=1e-6)
    _, present = detect_objects(images, ["cat", "dog"], *owl, threshold=0.5)
    assert [r["success"] for r in records] == detection_success(present).tolist()
    assert all(isinstance(r["caption"], str) and -1 <= r["blip_similarity"] <= 1 for r in records)
    table = summarise(records, by=["method"], unit="prompt", n_boot=50)
    assert {"clip_full", "clip_min_object", "blip_similarity", "objects_found", "success"} <= set(table.columns)
    assert "threshold" not in table.columns


def test_wilson_interval_known_values():
    from sae_utils.evaluation import wilson_interval

    rate, low, high = wilson_interval(20, 100)
    assert rate == 0.2 and low == pytest.approx(0.1333, abs=1e-4) and high == pytest.approx(0.2888, abs=1e-4)
    assert wilson_interval(0, 10)[1] == 0.0 and wilson_interval(10, 10)[2] == 1.0
    assert wilson_interval(0, 10)[2] == pytest.approx(0.2775, abs=1e-4)  # not the degenerate [0, 0]
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(11, 10)
