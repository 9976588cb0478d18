"""The test-time baselines on `tiny` at 32 px (16x16 latents: its map level, latents / 4, is then 4x4)."""
import math

import numpy as np
import pytest
import torch

from sae_utils.attention import capture_cross_attention
from sae_utils.baselines import (AAE_THRESHOLDS, attend_and_excite, attend_and_excite_schedule, sepen_test_time,
                                 step_sizes)
from sae_utils.losses import attend_and_excite_token_maps, object_peaks
from sae_utils.maps import gather_word_maps
from sae_utils.tokens import count_tokens, word_token_positions

PROMPT, WORDS = "a cat and a dog", ["cat", "dog"]
SIZE = dict(height=32, width=32)



def generators(*seeds):
    return [torch.Generator().manual_seed(seed) for seed in seeds]


def pixels(images):
    return np.stack([np.asarray(image) for image in images]).astype(int)


def test_step_sizes_and_schedule():
    sqrt, linear = step_sizes(51), step_sizes(51, schedule="linear")
    assert sqrt[0] == linear[0] == 20.0
    assert sqrt[-1] == pytest.approx(20 * math.sqrt(0.5)) and linear[-1] == pytest.approx(10.0)
    assert sqrt[25] == pytest.approx(20 * math.sqrt(0.75))
    assert all(a > b for a, b in zip(sqrt, sqrt[1:]))
    assert attend_and_excite_schedule(50) == (25, AAE_THRESHOLDS)
    assert attend_and_excite_schedule(25) == (13, {0: 0.05, 5: 0.5, 10: 0.8})
    with pytest.raises(ValueError, match="schedule"):
        step_sizes(10, schedule="cosine")


def test_nothing_altered_is_the_pipeline(tiny):
    """With no altered step, the hand-written loop must give the pipeline's own images: the capture processors on
    the map layers compute attention explicitly, the pipeline's own SDPA, so at most a grey level of rounding."""
    reference = tiny(PROMPT, generator=generators(0, 1), num_images_per_prompt=2, num_inference_steps=3,
                     guidance_scale=7.5, **SIZE).images
    out = attend_and_excite(tiny, PROMPT, WORDS, generators(0, 1), num_inference_steps=3, max_iter_to_alter=0,
                            thresholds={}, **SIZE)
    difference = np.abs(pixels(out.images) - pixels(reference))
    assert difference.max() <= 1 and (difference > 0).mean() < 1e-2
    assert all(entry["latent_shift"] == [0.0, 0.0] and "loss" not in entry for entry in out.log)


def test_refinement_lowers_the_loss_for_a_fixed_latent(tiny):
    # threshold 1.0 (target loss 0) is never met: all 6 refinement iterations run from the seed's latent
    out = attend_and_excite(tiny, PROMPT, WORDS, generators(3), num_inference_steps=2, max_iter_to_alter=1,
                            thresholds={0: 1.0}, max_refinement_steps=6, **SIZE)
    first = out.log[0]
    losses = [first["loss"][0]] + [step[0] for step in first["refinement"]]
    assert len(losses) == 7 and first["refinement_iterations"] == [6]
    assert all(a > b for a, b in zip(losses, losses[1:])), losses
    assert first["loss_refined"] == first["refinement"][-1]
    # a threshold already met: no refinement, one ordinary update
    met = attend_and_excite(tiny, PROMPT, WORDS, generators(3), num_inference_steps=2, max_iter_to_alter=1,
                            thresholds={0: 0.01}, **SIZE)
    assert met.log[0]["refinement"] == [] and met.log[0]["refinement_iterations"] == [0]
    assert met.log[0]["latent_shift"][0] > 0


@pytest.mark.parametrize("method", ["attend-and-excite", "sepen-test-time"])
def test_latents_change_only_in_the_altered_steps(tiny, monkeypatch, method):
    """Record the latents leaving each scheduler step and entering each guided UNet call: they differ exactly
    at the first max_iter_to_alter steps."""
    after_step, into_denoising, calls = [], [], []
    original_step = tiny.scheduler.step

    def recording_step(*args, **kwargs):
        out = original_step(*args, **kwargs)
        after_step.append(out.prev_sample.clone())
        return out

    def hook(module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        if sample.shape[0] == 4:  # the classifier-free batch: [unconditional, conditional] x 2 images
            into_denoising.append(sample[:2].clone())
        calls.append("D" if sample.shape[0] == 4 else "O")  # O: a gradient call on the conditional branch

    monkeypatch.setattr(tiny.scheduler, "step", recording_step)
    handle = tiny.unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run = attend_and_excite if method == "attend-and-excite" else sepen_test_time
        out = run(tiny, PROMPT, WORDS, generators(0, 1), num_inference_steps=4, max_iter_to_alter=2,
                  **({"thresholds": {}} if method == "attend-and-excite" else {}), **SIZE)
    finally:
        handle.remove()
    initial = torch.stack([torch.randn(4, 16, 16, generator=g) for g in generators(0, 1)])
    before = [initial * tiny.scheduler.init_noise_sigma] + after_step[:-1]
    assert len(into_denoising) == len(out.log) == 5  # PNDM: 4 steps are 5 timesteps
    changed = [not torch.equal(b, a) for b, a in zip(before, into_denoising)]
    assert changed == [True, True, False, False, False]
    assert [max(entry["latent_shift"]) > 0 for entry in out.log] == changed
    assert "".join(calls) == "ODODDDD"  # one gradient call in each altered step (no refinement here), none after


def test_deterministic_and_batch_independent(tiny):
    kwargs = dict(num_inference_steps=3, max_iter_to_alter=2, thresholds={0: 0.9}, max_refinement_steps=2, **SIZE)
    a = attend_and_excite(tiny, PROMPT, WORDS, generators(0, 1), **kwargs)
    b = attend_and_excite(tiny, PROMPT, WORDS, generators(0, 1), **kwargs)
    assert np.array_equal(pixels(a.images), pixels(b.images)) and a.log == b.log
    alone = attend_and_excite(tiny, PROMPT, WORDS, generators(1), **kwargs)
    # float rounding differs between batch shapes; the images must not (a shared generator would change them all)
    assert np.abs(pixels(alone.images)[0] - pixels(a.images)[1]).max() <= 1
    assert np.abs(pixels(a.images)[0] - pixels(a.images)[1]).mean() > 5


def _first_step_maps(pipe, embeds_index):
    """Token maps (1, T, 4, 4) of one independent UNet call on the seed-0 starting latents at the first timestep;
    embeds_index 0: the prompt's (conditional) embeddings, 1: the empty prompt's."""
    pipe.scheduler.set_timesteps(2)
    t = pipe.scheduler.timesteps[0]
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)) * pipe.scheduler.init_noise_sigma
    embeds = pipe.encode_prompt(PROMPT, "cpu", 1, True)[embeds_index]
    with torch.no_grad(), capture_cross_attention(pipe.unet, latent_size=16, keep="last", cfg=False) as store:
        pipe.unet(latents, t, encoder_hidden_states=embeds)
    return store.token_maps()


@pytest.mark.parametrize("method", ["attend-and-excite", "sepen-test-time"])
def test_the_loss_reads_the_conditional_branch(tiny, method):
    positions = [word_token_positions(tiny.tokenizer, PROMPT, WORDS)]

    def peaks(token_maps):
        if method == "attend-and-excite":
            # tiny is of the SD 1 family: the official token range 1..75 (end token and padding included)
            token_maps = attend_and_excite_token_maps(token_maps, [count_tokens(tiny.tokenizer, PROMPT) - 2],
                                                      token_range="all-but-last")
        return object_peaks(gather_word_maps(token_maps, positions))[0]

    run = attend_and_excite if method == "attend-and-excite" else sepen_test_time
    out = run(tiny, PROMPT, WORDS, generators(0), num_inference_steps=2, max_iter_to_alter=1, **SIZE)
    logged = torch.tensor(out.log[0]["peaks"][0])
    conditional, unconditional = peaks(_first_step_maps(tiny, 0)), peaks(_first_step_maps(tiny, 1))
    assert torch.allclose(logged, conditional, rtol=0, atol=1e-6)
    assert (logged - unconditional).abs().max() > 20 * 1e-6  # the unconditional branch's maps are not those


def test_sepen_test_time_refines_only_on_request(tiny):
    # tiny's plain maps are nearly uniform (about 1/77 everywhere), so the pixel holding a max switches under large
    # steps; a step size of 10 stays where the first-order decrease shows (about 3e-6 a step, 50 float32 ulps)
    kwargs = dict(num_inference_steps=2, max_iter_to_alter=1, scale_factor=10.0, **SIZE)
    default = sepen_test_time(tiny, PROMPT, WORDS, generators(1), **kwargs)
    assert default.log[0]["refinement"] == []
    refined = sepen_test_time(tiny, PROMPT, WORDS, generators(1), loss_targets={0: 0.0}, max_refinement_steps=4,
                              **kwargs)
    first = refined.log[0]
    losses = [first["loss"][0]] + [step[0] for step in first["refinement"]]
    assert first["loss"] == default.log[0]["loss"] and len(losses) == 5
    assert all(a > b for a, b in zip(losses, losses[1:])), losses


def test_attention_maps_are_returned_on_request(tiny):
    out = attend_and_excite(tiny, PROMPT, WORDS, generators(0, 1), num_inference_steps=2, max_iter_to_alter=1,
                            thresholds={}, capture_attention=True, **SIZE)
    assert out.word_maps.shape == (2, 2, 4, 4) and out.nsfw is None  # tiny's map level at 32 px
    assert (out.word_maps >= 0).all() and (out.word_maps.flatten(2).sum(-1) < 16).all()


def test_bad_settings_are_explained(tiny):
    with pytest.raises(ValueError, match="outside the altered steps"):
        attend_and_excite(tiny, PROMPT, WORDS, generators(0), num_inference_steps=2, max_iter_to_alter=1,
                          thresholds={1: 0.5}, **SIZE)
    with pytest.raises(TypeError, match="torch.Generator"):
        attend_and_excite(tiny, PROMPT, WORDS, 0, num_inference_steps=2, **SIZE)
    with pytest.raises(ValueError, match="at least two words"):
        sepen_test_time(tiny, PROMPT, ["cat"], generators(0), num_inference_steps=2, **SIZE)
