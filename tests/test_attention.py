import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from sae_utils.attention import (CrossAttentionCaptureProcessor, capture_cross_attention, cross_attention_layers,
                                 layers_at_resolution)


def unet_inputs(pipe, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = pipe.unet.config.sample_size
    sample = torch.randn(batch, 4, size, size, generator=g)
    text = torch.randn(batch, 77, pipe.unet.config.cross_attention_dim, generator=g)
    return sample, torch.tensor([999, 10][:batch] + [500] * max(0, batch - 2)), text


@pytest.mark.parametrize("which", ["16x16", "all"])
def test_capture_does_not_change_the_unet_output(tiny, which):
    sample, t, text = unet_inputs(tiny)
    layers = list(cross_attention_layers(tiny.unet)) if which == "all" else None
    with torch.no_grad():
        expected = tiny.unet(sample, t, text).sample
        with capture_cross_attention(tiny, layers=layers):
            captured = tiny.unet(sample, t, text).sample
    torch.testing.assert_close(captured, expected, atol=1e-5, rtol=0)


def test_maps_are_probabilities_over_tokens(tiny):
    sample, t, text = unet_inputs(tiny)
    with torch.no_grad(), capture_cross_attention(tiny, keep="steps", heads="all") as store:
        tiny.unet(sample, t, text)
    for layer in store.layers:
        maps = store.layer_maps(layer)  # (B, heads, T, h, w)
        assert maps.shape[:3] == (2, 8, 77) and maps.shape[-2:] == (8, 8)  # tiny's map level: SD v1's 16x16 layers
        torch.testing.assert_close(maps.sum(dim=2), torch.ones(2, 8, 8, 8), atol=1e-5, rtol=0)
    assert store.token_maps().shape == (2, 77, 8, 8)


def test_default_layers_are_the_map_level_ones_and_others_keep_sdpa(tiny):
    before = dict(tiny.unet.attn_processors)
    with capture_cross_attention(tiny) as store:
        processors = tiny.unet.attn_processors
        captured = {name for name, p in processors.items() if isinstance(p, CrossAttentionCaptureProcessor)}
        # the layers SD v1 reads at 16x16 (down_blocks.2, up_blocks.1): 8x8 on tiny's 32x32 latent
        assert captured == {f"{name}.processor" for name in layers_at_resolution(tiny.unet, 8)}
        assert {name.split(".attentions")[0] for name in store.layers} == {"down_blocks.2", "up_blocks.1"}
        assert all(isinstance(p, AttnProcessor2_0) for name, p in processors.items() if name not in captured)
    assert all(tiny.unet.attn_processors[name] is p for name, p in before.items())
    with capture_cross_attention(tiny, resolution=16) as store:  # an explicit resolution wins
        assert set(store.layers) == set(layers_at_resolution(tiny.unet, 16))


def test_previous_processors_are_restored_even_after_an_error(tiny):
    custom = {name: AttnProcessor() for name in tiny.unet.attn_processors}
    tiny.unet.set_attn_processor(dict(custom))
    try:
        with pytest.raises(RuntimeError, match="boom"):
            with capture_cross_attention(tiny):
                raise RuntimeError("boom")
        assert all(tiny.unet.attn_processors[name] is p for name, p in custom.items())
        assert not tiny.unet._forward_pre_hooks, "the step hook must be removed"
    finally:
        tiny.unet.set_attn_processor(AttnProcessor2_0())


def test_cfg_keeps_only_the_conditional_half(tiny):
    prompts = ["a cat and a dog", "a red car"]
    latents = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(3))
    with capture_cross_attention(tiny, keep="steps") as store:
        tiny(prompts, num_inference_steps=2, guidance_scale=7.5, latents=latents.clone())
    assert store.token_maps(step=0).shape[0] == 2  # not 4: the unconditional half is dropped

    # the same first step by hand, conditional embeddings only
    cond, _ = tiny.encode_prompt(prompts, "cpu", 1, do_classifier_free_guidance=False)
    tiny.scheduler.set_timesteps(2)
    t0 = tiny.scheduler.timesteps[0]
    with torch.no_grad(), capture_cross_attention(tiny, cfg=False) as by_hand:
        tiny.unet(tiny.scheduler.scale_model_input(latents, t0), t0, cond)
    torch.testing.assert_close(store.token_maps(step=0), by_hand.token_maps(), atol=1e-6, rtol=0)


def test_without_guidance_nothing_is_dropped(tiny):
    latents = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(3))
    with capture_cross_attention(tiny) as store:
        tiny(["a cat", "a cat"], num_inference_steps=2, guidance_scale=1.0, latents=latents.repeat(2, 1, 1, 1))
    assert store.token_maps().shape[0] == 2


def test_gradients_reach_only_parameters_that_require_them(tiny):
    unet = tiny.unet
    keys = [p for name, p in unet.named_parameters() if "attn2.to_k" in name]
    unet.requires_grad_(False)
    for p in keys:
        p.requires_grad_(True)
    try:
        sample, t, text = unet_inputs(tiny)
        with capture_cross_attention(tiny, keep="last") as store:
            unet(sample, t, text)
            maps = store.token_maps()
            assert maps.requires_grad
            maps[:, 5].amax(dim=(-1, -2)).sum().backward()
        frozen = [name for name, p in unet.named_parameters() if not p.requires_grad and p.grad is not None]
        assert frozen == []
        captured_keys = [unet.get_submodule(layer).to_k.weight for layer in store.layers]
        assert all(k.grad is not None and k.grad.abs().sum() > 0 for k in captured_keys)
    finally:
        unet.requires_grad_(False)
        unet.zero_grad(set_to_none=True)


def test_no_graph_is_kept_without_gradients(tiny):
    sample, t, text = unet_inputs(tiny)
    with torch.no_grad(), capture_cross_attention(tiny) as store:
        tiny.unet(sample, t, text)
    assert not store.token_maps().requires_grad


def test_keep_mean_equals_the_mean_of_steps(tiny):
    sample, t, text = unet_inputs(tiny)
    with torch.no_grad():
        with capture_cross_attention(tiny, keep="steps") as steps:
            tiny.unet(sample, t, text)
            tiny.unet(sample * 0.5, t, text)
        with capture_cross_attention(tiny, keep="mean") as mean:
            tiny.unet(sample, t, text)
            tiny.unet(sample * 0.5, t, text)
        with capture_cross_attention(tiny, keep="last") as last:
            tiny.unet(sample, t, text)
            tiny.unet(sample * 0.5, t, text)
    assert steps.num_steps == mean.num_steps == 2
    expected = (steps.token_maps(step=0) + steps.token_maps(step=1)) / 2
    torch.testing.assert_close(mean.token_maps(), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(steps.token_maps(), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(last.token_maps(), steps.token_maps(step=-1), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="keep='steps'"):
        mean.token_maps(step=0)


def test_word_maps_follow_the_tokens(tiny):
    prompt = "a photo of a hippopotamus and a cat"
    with capture_cross_attention(tiny) as store:
        tiny(prompt, num_inference_steps=2, num_images_per_prompt=2)
    tokens = store.token_maps()
    words = store.word_maps(prompt, ["hippopotamus", "cat"])
    assert words.shape == (2, 2, 8, 8)
    torch.testing.assert_close(words[:, 0], tokens[:, 5:8].sum(1))
    torch.testing.assert_close(words[:, 1], tokens[:, 10])
    mean = store.word_maps(prompt, ["hippopotamus"], combine="mean")
    torch.testing.assert_close(mean[:, 0], tokens[:, 5:8].mean(1))


def test_word_maps_per_prompt_words(tiny):
    prompts = ["a cat and a dog", "a bird with a crown"]
    with capture_cross_attention(tiny) as store:
        tiny(prompts, num_inference_steps=2)
    maps = store.word_maps(prompts, [["cat", "dog"], ["bird", "crown"]])
    tokens = store.token_maps()
    torch.testing.assert_close(maps[1, 1], tokens[1, 5])
    with pytest.raises(ValueError, match="one per prompt"):
        store.word_maps(prompts, [["cat", "dog"]])


def test_errors_name_the_problem(tiny):
    with pytest.raises(ValueError, match=r"cross-attention at \[32, 16, 8, 4\]"):
        with capture_cross_attention(tiny, resolution=64):
            pass
    with pytest.raises(ValueError, match="Not cross-attention layers"):
        with capture_cross_attention(tiny, layers=["down_blocks.0.attentions.0.transformer_blocks.0.attn1"]):
            pass
    with capture_cross_attention(tiny) as store:
        with pytest.raises(RuntimeError, match="Nothing recorded"):
            store.token_maps()


def test_maps_follow_the_latent_aspect_ratio(tiny):
    sample = torch.randn(1, 4, 32, 48)
    text = torch.randn(1, 77, 32)
    with torch.no_grad(), capture_cross_attention(tiny) as store:
        tiny.unet(sample, 10, text)
    assert store.token_maps().shape == (1, 77, 8, 12)
