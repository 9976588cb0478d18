"""SD 1.x, 2.x and SDXL through the toolkit, on each family's random-weight twin (offline, seconds each).

The twins keep their family's layout (block types, attention layout, text encoders, tokenizers, sampler) at a tiny
width; what is checked on them is what differs between the families: loading, words to tokens (SDXL's two
tokenizers), the UNet's conditioning (SDXL's pooled text and time ids), capture, training, deltas, A&E, sampling.
"""
import time

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0

from sae_utils.attention import capture_cross_attention, cross_attention_layers, layers_at_resolution, map_resolution
from sae_utils.baselines import attend_and_excite, optimise_and_sample, sepen_test_time
from sae_utils.conditioning import encode_prompts, unconditional, unet_conditions
from sae_utils.delta import DeltaError, apply_delta, load_delta, save_delta, trainable_parameter_names
from sae_utils.families import (ALIASES, FAMILIES, FAMILY_NAMES, SDXL_UNET_CONFIG, attention_layout,
                                check_token_alignment, family_of, family_of_name, full_size_pipeline,
                                real_unet_layout, tokenizers)
from sae_utils.finetune import FinetuneConfig, Finetuner, preset
from sae_utils.memory import MEMORY_PRESETS, memory_preset
from sae_utils.models import ModelNotAvailableError, clip_tokenizer, load_pipeline
from sae_utils.sampling import sample_batch
from sae_utils.tokens import token_positions, word_token_positions

TWINS = {"sd1": "tiny", "sd2": "tiny-sd2", "sdxl": "tiny-sdxl"}
_cache = {}


def twin(family):
    if family not in _cache:
        _cache[family] = load_pipeline(TWINS[family], device="cpu")
    return _cache[family]


@pytest.fixture(params=FAMILY_NAMES)
def family(request):
    return request.param


# ----------------------------------------------------------------------------------------------------------
# Loading and layout
# ----------------------------------------------------------------------------------------------------------
def test_each_twin_has_its_family_layout(family):
    pipe = twin(family)
    assert family_of(pipe) == family and family_of_name(TWINS[family]) == family
    assert isinstance(pipe, StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline)
    layers = cross_attention_layers(pipe.unet)
    maps = layers_at_resolution(pipe.unet, map_resolution(pipe))
    pads = [t.pad_token_id for t in tokenizers(pipe)]
    if family == "sd1":
        assert pads == [49407] and map_resolution(pipe) == 8
    if family == "sd2":  # OpenCLIP pads with "!"; 2.1's v-prediction sampler; maps at latents / 4 (SD 2.1: 96 -> 24)
        assert pads == [0] and pipe.tokenizer.convert_ids_to_tokens(0) == "!"
        assert pipe.scheduler.config.prediction_type == "v_prediction" and pipe.unet.config.use_linear_projection
        assert map_resolution(pipe) == pipe.unet.config.sample_size // 4 == 6
    if family == "sdxl":  # SDXL's attention layout: 2 blocks a layer at the upper level, 10 at the map level
        assert pads == [49407, 0]
        assert len(layers) == 70 and map_resolution(pipe) == 8
        assert len(maps) == 60 and {n.split(".attentions")[0].split(".transformer")[0] for n in maps} == {
            "down_blocks.2", "mid_block", "up_blocks.0"}
        assert sum(".attentions.0.transformer_blocks." in n and n.startswith("down_blocks.2") for n in layers) == 10
        assert pipe.unet.config.addition_embed_type == "text_time"


def test_the_real_sdxl_and_sd2_layouts_on_the_meta_device():
    with torch.device("meta"):
        xl = UNet2DConditionModel(**SDXL_UNET_CONFIG)
    layers = cross_attention_layers(xl)
    assert len(layers) == 70 and map_resolution(xl) == 32  # 1024 px: maps at 32x32
    assert sorted({128 // f for f in layers.values()}) == [32, 64]  # cross-attention at 64x64 and 32x32 only
    names = trainable_parameter_names(xl, "k")
    values = sum(xl.get_parameter(n).numel() for n in names)
    assert len(names) == 70 and values == 170_393_600  # 340.8 MB in fp16: README's number
    assert len(layers_at_resolution(xl, 32)) == 60 and len(layers_at_resolution(xl, 64)) == 10
    rows = attention_layout(xl)  # what notebook 01 shows
    assert [(r["maps"], r["layers"], r["per module"], r["map level"]) for r in rows] == [
        ("64x64", 10, 2, False), ("32x32", 60, 10, True)]
    two = real_unet_layout("sd2")
    values = sum(two.get_parameter(n).numel() for n in trainable_parameter_names(two, "k"))
    assert map_resolution(two) == 24 and len(cross_attention_layers(two)) == 16 and values == 12_779_520
    assert family_of(two) == "sd2" and family_of(xl) == "sdxl" and family_of(real_unet_layout("sd1")) == "sd1"
    for name in FAMILY_NAMES:  # where each family says its maps live is where the architecture's rule finds them
        assert map_resolution(real_unet_layout(name)) == FAMILIES[name].map_side


def test_the_full_size_architectures_have_the_counts_the_memory_estimates_use():
    """benchmarks/family_memory.py measures these on a GPU; sae_utils/memory.py's arithmetic counts their values."""
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    xl, two = full_size_pipeline("sdxl", "meta", torch.float16), full_size_pipeline("sd2", "meta", torch.float16)
    assert isinstance(xl, StableDiffusionXLPipeline) and family_of(xl) == "sdxl" and family_of(two) == "sd2"
    assert (count(xl.unet), count(xl.text_encoder), count(xl.text_encoder_2), count(xl.vae)) == (
        2_567_463_684, 123_060_480, 694_659_840, 83_653_863)
    assert (count(two.unet), count(two.text_encoder)) == (865_910_724, 340_387_840)
    fp16_gib = (count(xl.unet) + count(xl.text_encoder) + count(xl.text_encoder_2) + count(xl.vae)) * 2 / 2 ** 30
    assert round(fp16_gib, 2) == 6.46  # memory.py: "6.46 GiB of fp16 weights"


@pytest.mark.parametrize("name", ["sd1", "sd2", "sd2-base", "sdxl", "stabilityai/stable-diffusion-xl-base-1.0",
                                  "stabilityai/stable-diffusion-2-1"])
def test_a_real_id_offline_fails_fast_with_the_clear_error(name):
    start = time.perf_counter()
    with pytest.raises(ModelNotAvailableError) as error:
        load_pipeline(name, device="cpu")
    assert time.perf_counter() - start < 10
    message = str(error.value)
    assert ALIASES.get(name, name) in message and "HF_HUB_OFFLINE" in message
    assert repr(FAMILIES[family_of_name(name)].tiny) in message  # the family's own twin is offered


def test_a_saved_sdxl_twin_loads_as_sdxl(tmp_path):
    twin("sdxl").save_pretrained(tmp_path)
    loaded = load_pipeline(tmp_path, device="cpu")
    assert isinstance(loaded, StableDiffusionXLPipeline) and family_of_name(str(tmp_path)) == "sdxl"
    assert len(loaded.tokenizer_2) == 49408 and loaded.tokenizer_2.pad_token_id == 0


# ----------------------------------------------------------------------------------------------------------
# Words to tokens
# ----------------------------------------------------------------------------------------------------------
def test_words_map_to_the_right_tokens_in_every_tokenizer(family):
    prompt = "a cat and a dog"
    # CLIP's BPE ids: a</w> 320, cat</w> 2368, and</w> 537, dog</w> 1929; start 49406, end 49407
    expected = [49406, 320, 2368, 537, 320, 1929, 49407]
    pads = {"sd1": [49407], "sd2": [0], "sdxl": [49407, 0]}[family]  # SDXL: tokenizer, then tokenizer_2
    for tokenizer, pad in zip(tokenizers(twin(family)), pads):
        ids = tokenizer(prompt, padding="max_length", max_length=77).input_ids
        assert ids[:7] == expected and set(ids[7:]) == {pad} and len(ids) == 77
        assert word_token_positions(tokenizer, prompt, ["cat", "dog"]) == [[2], [5]]
        assert token_positions(tokenizer, "a photo of a hippopotamus and a cat", "hippopotamus") == [5, 6, 7]
        # "!" is tokenizer_2's padding id; in a prompt it is a token like any other, and words keep their places
        assert word_token_positions(tokenizer, "a cat! and a dog!", ["cat", "dog"]) == [[2], [6]]
        # ... and, as in the real tokenizers, a tokenizer that pads with "!" reads the prompt's "!" as id 0
        assert tokenizer("a cat!").input_ids[3] == (256 if pad == 49407 else 0)  # "!</w>" or the pad token "!"
    check_token_alignment(twin(family), "a cat! and a dog")


def test_misaligned_sdxl_tokenizers_are_refused():
    pipe = twin("sdxl")
    real = pipe.tokenizer_2

    class Shifted:  # another tokenizer_2, that adds a token at the front
        pad_token_id, eos_token_id = 0, 49407

        def __call__(self, prompt, **kwargs):
            return real("a " + prompt, **kwargs)

    try:
        pipe.tokenizer_2 = Shifted()
        with pytest.raises(ValueError, match="split 'a cat and a dog' differently"):
            check_token_alignment(pipe, "a cat and a dog")
    finally:
        pipe.tokenizer_2 = real


def test_sdxl_conditions_are_the_pipelines_own():
    """The maps come from the right sequence: what the toolkit feeds the UNet is what the SDXL pipeline feeds it."""
    pipe = twin("sdxl")
    prompts = ["a cat and a dog", "a photo of a hippopotamus"]
    mine = encode_prompts(pipe, prompts)
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1,
                                                                   do_classifier_free_guidance=True)
    torch.testing.assert_close(mine.embeds, embeds, atol=0, rtol=0)
    torch.testing.assert_close(mine.pooled, pooled, atol=0, rtol=0)
    empty = unconditional(pipe, 2)
    torch.testing.assert_close(empty.embeds, negative) and torch.testing.assert_close(empty.pooled, negative_pooled)
    # position 5 ("dog") of the UNet's key sequence is token 5 of both encoders, side by side
    first = pipe.text_encoder(pipe.tokenizer(prompts[:1], padding="max_length", max_length=77, return_tensors="pt")
                              .input_ids, output_hidden_states=True).hidden_states[-2]
    assert torch.equal(mine.embeds[0, 5, :32], first[0, 5])
    added = unet_conditions(pipe, prompts)["added_cond_kwargs"]
    time_ids = pipe._get_add_time_ids((64, 64), (0, 0), (64, 64), torch.float32, text_encoder_projection_dim=32)
    assert torch.equal(added["time_ids"], time_ids.expand(2, -1)) and added["text_embeds"].shape == (2, 32)


# ----------------------------------------------------------------------------------------------------------
# Capture, training, deltas
# ----------------------------------------------------------------------------------------------------------
def test_capture_equals_the_default_processors(family):
    pipe = twin(family)
    side = pipe.unet.config.sample_size
    sample = torch.randn(2, 4, side, side, generator=torch.Generator().manual_seed(0))
    conditions = unet_conditions(pipe, ["a cat and a dog", "a bear and a turtle"])
    t = torch.tensor([999, 10])
    assert all(isinstance(p, AttnProcessor2_0) for p in pipe.unet.attn_processors.values())
    with torch.no_grad():
        expected = pipe.unet(sample, t, **conditions).sample
        for layers in (list(cross_attention_layers(pipe.unet)), None):  # every layer, and the map level
            with capture_cross_attention(pipe, layers=layers, keep="last") as store:
                captured = pipe.unet(sample, t, **conditions).sample
            torch.testing.assert_close(captured, expected, atol=1e-5, rtol=0)
    maps = store.word_maps("a cat and a dog", ["cat", "dog"])
    assert maps.shape[:2] == (2, 2)
    torch.testing.assert_close(store.token_maps().sum(1), torch.ones(2, *maps.shape[-2:]), atol=1e-5, rtol=0)


def _finetuner(family, **overrides):
    config = FinetuneConfig(**{"model": TWINS[family], "pairs": [("cat", "dog")], "steps": 1, "batch_size": 2,
                               "learning_rate": 1e-2, "device": "cpu", **overrides})
    return Finetuner(config, pipeline=twin(family), resume=False)


def test_a_finetuning_step_moves_only_the_keys(family):
    finetuner = _finetuner(family)
    pipe = finetuner.pipe
    modules = {"unet": pipe.unet, "text_encoder": pipe.text_encoder, "vae": pipe.vae,
               "text_encoder_2": getattr(pipe, "text_encoder_2", None)}
    before = {f"{m}.{n}": p.detach().clone() for m, module in modules.items() if module is not None
              for n, p in module.named_parameters()}
    try:
        entry = finetuner.train_step()
        after = {f"{m}.{n}": p.detach() for m, module in modules.items() if module is not None
                 for n, p in module.named_parameters()}
        changed = [n for n in before if not torch.equal(before[n], after[n].to(before[n].dtype))]
    finally:
        finetuner.finish()
        finetuner.restore_base()
    assert entry["loss"] > 0 and len(finetuner.trainable_names) == len(cross_attention_layers(pipe.unet))
    assert changed and all(n.startswith("unet.") and ".attn2.to_k." in n for n in changed)
    if family == "sdxl":  # the 6 layers of up_blocks.1 run after the last 32x32 one: no gradient reaches them
        assert len(finetuner.trainable_names) == 70 and len(changed) == 64


def test_a_delta_round_trips_and_is_refused_by_another_family(family, tmp_path):
    finetuner = _finetuner(family)
    try:
        finetuner.train_step()
        delta = finetuner.delta()
    finally:
        finetuner.finish()
        finetuner.restore_base()
    assert delta.metadata["family"] == family
    loaded = load_delta(save_delta(delta, tmp_path / "delta.safetensors", dtype=torch.float16))
    assert loaded.metadata["family"] == family
    pipe = twin(family)
    base = {n: pipe.unet.get_parameter(n).detach().clone() for n in loaded.tensors}
    with apply_delta(pipe, loaded):
        assert all(torch.equal(pipe.unet.get_parameter(n), t.float()) for n, t in loaded.tensors.items())
    assert all(torch.equal(pipe.unet.get_parameter(n), v) for n, v in base.items())
    for other in FAMILY_NAMES:
        if other != family:
            with pytest.raises(DeltaError) as error:
                apply_delta(twin(other), loaded)
            message = str(error.value)
            assert FAMILIES[family].title in message and FAMILIES[other].title in message
            assert f"{family!r}" in message and f"{other!r}" in message


def test_memory_presets_cover_every_family_and_say_what_is_measured():
    for family in FAMILY_NAMES:
        for card in ("t4", "24gb"):
            p = memory_preset(family, card)
            assert p.status == ("measured" if family == "sd1" else "not yet measured")
            assert (p.measured and not p.estimate) if p.status == "measured" else \
                (p.estimate.startswith("estimate") and not p.measured)
            FinetuneConfig(pairs=[("cat", "dog")], **p.settings).validate()
    assert len(MEMORY_PRESETS) == 6
    xl = preset("colab-t4", model="tiny-sdxl", pairs=[("cat", "dog")])
    assert (xl.batch_size, xl.gradient_accumulation_steps, xl.gradient_checkpointing) == (1, 4, True)
    assert preset("colab-t4", pairs=[("cat", "dog")]).batch_size == 4  # SD 1.x: as before


# ----------------------------------------------------------------------------------------------------------
# Test-time methods and sampling
# ----------------------------------------------------------------------------------------------------------
def test_the_test_time_loop_without_updates_is_the_pipelines_own_sampling(family):
    pipe = twin(family)
    kwargs = dict(num_inference_steps=3, guidance_scale=5.0)
    own = pipe("a cat and a dog", generator=torch.Generator().manual_seed(3), output_type="np", **kwargs).images
    loop = optimise_and_sample(pipe, "a cat and a dog", [[2], [5]], torch.Generator().manual_seed(3),
                               lambda maps: (maps.sum((1, 2, 3)) * 0, maps[:, :2].amax((-2, -1))),
                               max_iter_to_alter=0, scale_factor=20.0, loss_targets={}, max_refinement_steps=0,
                               **kwargs)
    got = torch.tensor(list(loop.images[0].getdata()), dtype=torch.float32).view(own.shape[1:])
    assert (got - torch.from_numpy(own[0] * 255).round()).abs().max() <= 1  # the same image, up to 8-bit rounding


def test_attend_and_excite_and_sepen_test_time_run(family):
    pipe = twin(family)
    generators = [torch.Generator().manual_seed(s) for s in (0, 1)]
    out = attend_and_excite(pipe, "a cat and a dog", ["cat", "dog"], generators, num_inference_steps=3,
                            max_iter_to_alter=2, thresholds={0: 0.05}, max_refinement_steps=2, capture_attention=True)
    side = map_resolution(pipe)
    assert len(out.images) == 2 and out.word_maps.shape == (2, 2, side, side)
    assert all(shift > 0 for shift in out.log[0]["latent_shift"])  # the latents were moved
    out = sepen_test_time(pipe, "a cat and a dog", ["cat", "dog"], generators[:1], num_inference_steps=2,
                          max_iter_to_alter=1)
    assert len(out.images) == 1 and out.log[0]["loss"][0] > 0


def test_sampling_with_capture_runs(family):
    pipe = twin(family)
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    settings = dict(num_inference_steps=2, guidance_scale=5.0, height=side, width=side)
    out = sample_batch(pipe, "sd", "a cat and a dog", ["cat", "dog"], [0, 1], settings, {}, capture_attention=True)
    assert len(out["images"]) == 2 and out["word_maps"].shape[:2] == (2, 2)
    assert out["per_image"][0]["nsfw"] is None  # no safety checker on the twins (SDXL has none at all)


def test_the_sd2_tokenizer_is_the_same_bpe_with_another_padding():
    one, two = clip_tokenizer(), clip_tokenizer("!")
    assert len(one) == len(two) == 49408 and one.get_vocab() == two.get_vocab()
    assert (one.pad_token_id, two.pad_token_id) == (49407, 0)


def test_the_sdxl_t4_preset_makes_the_same_update_as_batch_4():
    """What the T4 preset changes for SDXL (batch 1 x 4 accumulation, gradient checkpointing) leaves the update as
    batch 4 makes it, up to float rounding; the norm loss runs on SDXL's conditioning."""
    t4 = memory_preset("sdxl", "t4").settings
    runs = {}
    for label, settings in (("batch 4", dict(batch_size=4)),
                            ("t4", {k: v for k, v in t4.items() if k != "mixed_precision"})):  # fp32 on the CPU
        finetuner = _finetuner("sdxl", **settings)
        try:
            finetuner.train_step()
            runs[label] = [p.detach().clone() for p in finetuner.parameters]
            moved = [not torch.equal(p, o) for p, o in zip(finetuner.parameters, finetuner.originals)]
        finally:
            finetuner.finish()
            finetuner.restore_base()
        assert sum(moved) == 64
    # AdamW's first step moves a key by about 4e-2 (lr 1e-2 x 4), dividing its gradient by |g| + 1e-8: the summation
    # order's rounding matters most where |g| is near 1e-8. 0.1 % of the step (seen: at most 1.2e-5, 1 in 4096 > 1e-5)
    for a, b in zip(runs["batch 4"], runs["t4"]):
        torch.testing.assert_close(a, b, rtol=0, atol=4e-5)
    for extra in (dict(norm_loss_weight=0.5),):
        finetuner = _finetuner("sdxl", **extra)
        try:
            finetuner.train_step()
            entry = finetuner.train_step()  # the keys have moved: the norm loss is no longer 0
        finally:
            finetuner.finish()
            finetuner.restore_base()
        assert entry["loss"] > 0 and (entry["norm"] > 0) == ("norm_loss_weight" in extra)
