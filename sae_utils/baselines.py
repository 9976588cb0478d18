"""Test-time baselines: Attend-and-Excite (Chefer et al., SIGGRAPH 2023) and SepEn's test-time variant.

Both nudge the noisy latents during the first denoising steps, by gradient descent on a loss of the model's
map-level cross-attention (`attention.map_resolution`: 16x16 for SD v1, 8x8 for the toy) in the conditional
branch, then take the ordinary classifier-free-guided step:

    generators = [torch.Generator().manual_seed(seed) for seed in range(4)]
    out = attend_and_excite(pipe, "a cat and a dog", ["cat", "dog"], generators)
    out.images          # 4 PIL images, each the same whatever the batch it was drawn in (up to float rounding)
    out.log             # per denoising step: losses, object peaks, refinement iterations, step size, latent shift

Built on the project's capture (sae_utils.attention) and losses (sae_utils.losses), with a denoising loop of the
pipeline's own components (encode_prompt, scheduler, unet, vae, image_processor); diffusers' Attend-and-Excite
pipeline (deprecated) is not used and the pipeline is not patched. A batch of images is optimised at once: the
images share no computation in the UNet, so the gradient of the summed losses is each image's own gradient.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image

from .attention import capture_cross_attention, forward_until_captured, map_resolution
from .conditioning import TextConditions, added_conditions
from .losses import attend_and_excite_loss, attend_and_excite_token_maps, object_peaks, sepen_loss_terms
from .maps import gather_word_maps
from .models import model_family
from .tokens import WordSpec, count_tokens, word_token_positions

# Attend-and-Excite as configured publicly (sepen-facts.md): 50 steps, guidance 7.5, the first 25 steps altered,
# step size 20, refinement at steps 0, 10, 20 up to peaks 0.05, 0.5, 0.8, at most 20 refinement iterations.
AAE_SAMPLING = {"num_inference_steps": 50, "guidance_scale": 7.5}
AAE_MAX_ITER_TO_ALTER = 25
AAE_THRESHOLDS = {0: 0.05, 10: 0.5, 20: 0.8}
AAE_SCALE_FACTOR = 20.0
AAE_MAX_REFINEMENT_STEPS = 20
STEP_SIZE_SCHEDULES = ("sqrt", "linear")

# Objective: token maps (B, T, h, w) of the conditional branch -> (loss (B,), object peaks (B, K)) to log
Objective = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class OptimisedSamples(NamedTuple):
    """What a test-time method returns.

    images: B PIL images. log: one dict per denoising step (see `optimise_and_sample`). word_maps: (B, K, h, w),
    the objects' maps of the conditional branch averaged over the denoising calls, with capture_attention=True,
    else None. nsfw: the safety checker's verdict per image, None without a checker.
    """
    images: list[Image.Image]
    log: list[dict]
    word_maps: torch.Tensor | None
    nsfw: list[bool] | None


# ----------------------------------------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------------------------------------
def step_sizes(num_timesteps: int, scale_factor: float = AAE_SCALE_FACTOR, schedule: str = "sqrt") -> list[float]:
    """The step size alpha_i of every denoising step i.

    The scale goes linearly from 1.0 to 0.5 over the denoising steps (sepen-facts.md: "step size 20 scaled
    linearly from 1.0 to 0.5"). The public Attend-and-Excite code (the authors' repository and diffusers'
    port) applies a square root to that scale: alpha_i = 20 * sqrt(linspace(1, 0.5, T)[i]), 20 -> 14.1; that is
    `schedule="sqrt"`, the default, because it is the configuration behind the published numbers.
    `schedule="linear"` is the facts file's literal reading, alpha_i = 20 * linspace(1, 0.5, T)[i], 20 -> 10.
    num_timesteps: len(scheduler.timesteps) (PNDM, SD's sampler, has one more timestep than steps).
    """
    if schedule not in STEP_SIZE_SCHEDULES:
        raise ValueError(f"schedule={schedule!r}: use 'sqrt' (the public code's) or 'linear' (alpha from 20 to 10).")
    scale = np.linspace(1.0, 0.5, num_timesteps)
    return (scale_factor * (np.sqrt(scale) if schedule == "sqrt" else scale)).tolist()


def attend_and_excite_schedule(num_inference_steps: int) -> tuple[int, dict[int, float]]:
    """(max_iter_to_alter, thresholds) of Attend-and-Excite, placed proportionally for other step counts.

    At 50 steps exactly the public setting: alter steps 0..24, refine at 0, 10, 20. At N steps: alter the first
    ceil(N/2), refine at floor(N * 0/50), floor(N * 10/50), floor(N * 20/50) (where two coincide, the later,
    stricter threshold is kept). The toy model's 25 steps: alter 0..12, refine at 0, 5, 10.
    """
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}.")
    fraction = num_inference_steps / AAE_SAMPLING["num_inference_steps"]
    thresholds = {}
    for step, threshold in sorted(AAE_THRESHOLDS.items()):
        thresholds[int(step * fraction)] = threshold
    return math.ceil(AAE_MAX_ITER_TO_ALTER * fraction), thresholds


# ----------------------------------------------------------------------------------------------------------
# The two methods
# ----------------------------------------------------------------------------------------------------------
def attend_and_excite(pipe, prompt: str, words: Sequence[WordSpec], generator, num_inference_steps: int = 50,
                      guidance_scale: float = 7.5, max_iter_to_alter: int = AAE_MAX_ITER_TO_ALTER,
                      scale_factor: float = AAE_SCALE_FACTOR, thresholds: dict[int, float] | None = None,
                      max_refinement_steps: int = AAE_MAX_REFINEMENT_STEPS, step_size_schedule: str = "sqrt",
                      height: int | None = None, width: int | None = None, resolution: int | None = None,
                      capture_attention: bool = False, token_range: str | None = None) -> OptimisedSamples:
    """Attend-and-Excite: images of `prompt` whose object `words` are each strongly attended to.

    generator: a torch.Generator (one image) or a list of them (one image each, drawn as one batch).
    At each of the first `max_iter_to_alter` denoising steps i (of the scheduler's timesteps):
    1. run the UNet on the current latents z with the prompt's embeddings alone (the conditional branch, no
       classifier-free batch), with gradients w.r.t. z, capturing the map-level cross-attention (mean over layers
       and heads);
    2. maps: `attend_and_excite_token_maps` (start token dropped, the kept tokens x100 and softmaxed over them;
       which tokens follows the official code per model family: SD 1.x tokens 1..75, the end token and padding
       included; SD 2.x (and SDXL, which the official code does not cover) the prompt's tokens only; `token_range` overrides); a word of several tokens gets the sum of its tokens' maps (the public code handles single-token
       words only); loss = `attend_and_excite_loss` = max over objects of (1 - peak of the 3x3-Gaussian-smoothed
       map; the public code's kernel, see losses.gaussian_kernel_3x3);
    3. at the steps of `thresholds` (default {0: 0.05, 10: 0.5, 20: 0.8}, those before max_iter_to_alter),
       iterative refinement: while an image's loss exceeds 1 - threshold (some object peaks below it),
       z <- z - alpha_i grad, at most `max_refinement_steps` times. As in the public code, the stopping test
       reads the loss measured before the latest update, so an image takes one more update after it first
       meets the target;
    4. z <- z - alpha_i * grad(loss) (skipped for an image whose loss is exactly 0), alpha_i from `step_sizes`
       (20 * sqrt of a scale going linearly from 1.0 to 0.5; `step_size_schedule="linear"` drops the sqrt);
    5. the normal classifier-free-guided denoising step from the updated z.
    Refinement steps must lie among the altered steps (the public code would refine later steps too; here the
    latents change in the first `max_iter_to_alter` steps only). Deterministic given the generators.
    """
    if thresholds is None:  # the public refinement steps that fall among the altered ones
        thresholds = {step: value for step, value in AAE_THRESHOLDS.items() if step < max_iter_to_alter}
    bad = {step: value for step, value in thresholds.items() if not 0 <= value <= 1}
    if bad:
        raise ValueError(f"thresholds are peaks of softmaxed maps, in [0, 1]; got {bad}.")
    tokenizer = pipe.tokenizer
    n_text_tokens = count_tokens(tokenizer, prompt) - 2  # the prompt's tokens between start and end
    positions = word_token_positions(tokenizer, prompt, words)

    # SDXL: the official code has none; its keys past the end token carry tokenizer_2's "!" padding, as SD 2.x's do,
    # where the official code renormalises over the prompt's tokens: so does this one
    token_range = token_range or ("all-but-last" if model_family(pipe) == "sd1" else "prompt")

    def objective(token_maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch = token_maps.shape[0]
        renormalised = attend_and_excite_token_maps(token_maps, [n_text_tokens] * batch, token_range)
        maps = gather_word_maps(renormalised, [positions] * batch, combine="sum")
        return attend_and_excite_loss(maps), object_peaks(maps)

    # "every peak >= threshold" is "loss = max(1 - peak) <= 1 - threshold"
    loss_targets = {step: 1.0 - value for step, value in thresholds.items()}
    return optimise_and_sample(
        pipe, prompt, positions, generator, objective, num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale, max_iter_to_alter=max_iter_to_alter, scale_factor=scale_factor,
        loss_targets=loss_targets, max_refinement_steps=max_refinement_steps, step_size_schedule=step_size_schedule,
        height=height, width=width, resolution=resolution, capture_attention=capture_attention)


def sepen_test_time(pipe, prompt: str, words: Sequence[WordSpec], generator, num_inference_steps: int = 50,
                    guidance_scale: float = 7.5, max_iter_to_alter: int = AAE_MAX_ITER_TO_ALTER,
                    scale_factor: float = AAE_SCALE_FACTOR, loss_targets: dict[int, float] | None = None,
                    max_refinement_steps: int = AAE_MAX_REFINEMENT_STEPS, step_size_schedule: str = "sqrt",
                    lambda_sep: float = 1.0, lambda_en: float = 0.5, height: int | None = None,
                    width: int | None = None, resolution: int | None = None, capture_attention: bool = False,
                    ) -> OptimisedSamples:
    """SepEn's test-time variant: Attend-and-Excite's latent optimisation with the SepEn loss instead.

    The loss is `sepen_loss` (lambda_sep * separate + lambda_en * enhance, defaults 1 and 0.5) on the plain
    cross-attention probabilities of the object words (softmax over all 77 tokens, start token kept, map-level layers
    averaged; several tokens of a word summed), as in finetuning. The log's "peaks" are those maps' smoothed peaks.

    Assumptions (sepen-facts.md names this variant and its results but gives no schedule):
    - the loop, the altered steps (first 25 of 50), the step sizes (`step_sizes`) and guidance 7.5 are
      Attend-and-Excite's;
    - no iterative refinement by default. Attend-and-Excite's thresholds (peaks 0.05/0.5/0.8) are peaks of maps
      re-normalised over the prompt's tokens; the plain probabilities SepEn reads peak far lower (0.155 and
      0.029 in the paper's project-page example), so those thresholds would never be met and every refinement
      would run its full iteration budget. `loss_targets={step: target}` turns refinement on: at that step an
      image is updated while its SepEn loss exceeds `target` (same rule and bound as Attend-and-Excite's).
    """
    loss_targets = dict(loss_targets or {})
    positions = word_token_positions(pipe.tokenizer, prompt, words)
    if len(positions) < 2:
        raise ValueError(f"The SepEn loss compares objects: give at least two words, got {list(words)}.")

    def objective(token_maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = gather_word_maps(token_maps, [positions] * token_maps.shape[0], combine="sum")
        return sepen_loss_terms(maps, lambda_sep, lambda_en).total, object_peaks(maps)

    return optimise_and_sample(
        pipe, prompt, positions, generator, objective, num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale, max_iter_to_alter=max_iter_to_alter, scale_factor=scale_factor,
        loss_targets=loss_targets, max_refinement_steps=max_refinement_steps, step_size_schedule=step_size_schedule,
        height=height, width=width, resolution=resolution, capture_attention=capture_attention)


# ----------------------------------------------------------------------------------------------------------
# The shared loop
# ----------------------------------------------------------------------------------------------------------
def optimise_and_sample(pipe, prompt: str, positions: Sequence[Sequence[int]], generator, objective: Objective, *,
                        num_inference_steps: int, guidance_scale: float, max_iter_to_alter: int,
                        scale_factor: float, loss_targets: dict[int, float], max_refinement_steps: int,
                        step_size_schedule: str = "sqrt", height: int | None = None, width: int | None = None,
                        resolution: int | None = None, capture_attention: bool = False) -> OptimisedSamples:
    """Classifier-free-guided sampling whose latents are optimised on `objective` in the first steps.

    positions: the K object words' token positions in `prompt` (word_token_positions). objective: token maps
    (B, T, h, w) of the conditional branch -> (loss (B,), peaks (B, K)). loss_targets: {step: target} for the
    iterative refinement (see `attend_and_excite`). Log entries: step, timestep, step_size; at altered steps
    also loss and peaks (per image, before any update), refinement (the losses after each refinement update),
    refinement_iterations (per image), loss_refined (the loss whose gradient makes the step's last update: after
    refinement, else the first loss) and latent_shift (per image, the L2 norm of the step's total change of the
    latents); at the other steps latent_shift is 0 and no extra UNet call runs.
    """
    generators = [generator] if isinstance(generator, torch.Generator) else \
        list(generator) if isinstance(generator, (list, tuple)) else []
    if not generators or not all(isinstance(g, torch.Generator) for g in generators):
        raise TypeError("generator must be a torch.Generator or a list of them (one per image), e.g. "
                        "[torch.Generator().manual_seed(seed) for seed in seeds].")
    late = sorted(step for step in loss_targets if not 0 <= step < max_iter_to_alter)
    if late:
        raise ValueError(f"Refinement at steps {late} lies outside the altered steps 0..{max_iter_to_alter - 1}; "
                         "raise max_iter_to_alter or drop those steps from the thresholds.")
    if max_refinement_steps < 0:
        raise ValueError(f"max_refinement_steps must be >= 0, got {max_refinement_steps}.")
    unet, scheduler, batch = pipe.unet, pipe.scheduler, len(generators)
    device, dtype = pipe._execution_device, unet.dtype
    height = height or unet.config.sample_size * pipe.vae_scale_factor
    width = width or unet.config.sample_size * pipe.vae_scale_factor
    do_cfg = guidance_scale > 1.0
    cond, uncond = encode_with_pipeline(pipe, prompt, device, batch, do_cfg)
    denoise = uncond.cat(cond) if do_cfg else cond
    cond_added = added_conditions(pipe, cond.pooled, height, width)  # SDXL's pooled text and time ids, else None
    denoise_added = added_conditions(pipe, denoise.pooled, height, width)
    scheduler.set_timesteps(num_inference_steps, device=device)
    timesteps = scheduler.timesteps
    latents = pipe.prepare_latents(batch, unet.config.in_channels, height, width, cond.embeds.dtype, device,
                                   generators)
    extra_step_kwargs = pipe.prepare_extra_step_kwargs(generators, 0.0)
    alphas = step_sizes(len(timesteps), scale_factor, step_size_schedule)
    word_positions = [list(positions)] * batch
    log, maps_sum = [], None

    resolution = resolution or map_resolution(pipe, height // pipe.vae_scale_factor)  # a bare UNet declares none
    with capture_cross_attention(unet, resolution=resolution, latent_size=height // pipe.vae_scale_factor,
                                 keep="last", cfg=False) as store:
        def loss_and_grad(z: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            """z: (B, C, h, w) -> loss (B,), peaks (B, K), d(sum of losses)/dz (B, C, h, w) in float32."""
            leaf = z.detach().float().requires_grad_(True)
            with torch.enable_grad():
                store.stop_when_complete = True  # the maps are all we need: skip the rest of the UNet
                forward_until_captured(unet, scheduler.scale_model_input(leaf.to(dtype), t), t,
                                       encoder_hidden_states=cond.embeds, added_cond_kwargs=cond_added)
                loss, peaks = objective(store.token_maps())
                (grad,) = torch.autograd.grad(loss.sum(), leaf)
            return loss.detach().float(), peaks.detach().float(), grad

        for i, t in enumerate(timesteps):
            entry = {"step": i, "timestep": int(t), "step_size": alphas[i]}
            if i < max_iter_to_alter:
                latents = _optimise_step(latents, t, alphas[i], loss_targets.get(i), max_refinement_steps,
                                         loss_and_grad, entry)
            else:
                entry["latent_shift"] = [0.0] * batch
            with torch.no_grad():
                store.stop_when_complete = False
                model_input = torch.cat([latents] * 2) if do_cfg else latents
                model_input = scheduler.scale_model_input(model_input, t)
                noise = unet(model_input, t, encoder_hidden_states=denoise.embeds,
                             added_cond_kwargs=denoise_added).sample
                if capture_attention:
                    token_maps = store.token_maps()[-batch:]  # the conditional half
                    step_maps = gather_word_maps(token_maps, word_positions).float()
                    maps_sum = step_maps if maps_sum is None else maps_sum + step_maps
                if do_cfg:
                    noise_uncond, noise_text = noise.chunk(2)
                    noise = noise_uncond + guidance_scale * (noise_text - noise_uncond)
                latents = scheduler.step(noise, t, latents, **extra_step_kwargs).prev_sample
            log.append(entry)

    images, nsfw = decode_latents(pipe, latents)
    word_maps = maps_sum.cpu() / len(timesteps) if maps_sum is not None else None
    return OptimisedSamples(images, log, word_maps, nsfw)


def _optimise_step(latents: torch.Tensor, t, alpha: float, target: float | None, max_refinement_steps: int,
                   loss_and_grad, entry: dict) -> torch.Tensor:
    """One altered denoising step: optional iterative refinement, then one gradient step. Fills `entry`."""
    start = latents.float()
    z = start
    loss, peaks, grad = loss_and_grad(z, t)
    entry.update(loss=loss.tolist(), peaks=peaks.tolist())
    iterations = torch.zeros(len(z), dtype=torch.long)
    history = []
    if target is not None:
        active = loss > target
        previous = loss  # the public code tests the loss measured before its latest update
        while bool(active.any()) and len(history) < max_refinement_steps:
            z = z - alpha * grad * (active & (loss != 0)).float().view(-1, 1, 1, 1)
            iterations += active.cpu().long()
            loss, peaks, grad = loss_and_grad(z, t)
            history.append(loss.tolist())
            active = active & (previous > target)
            previous = loss
    z = z - alpha * grad * (loss != 0).float().view(-1, 1, 1, 1)
    entry.update(refinement=history, refinement_iterations=iterations.tolist(), loss_refined=loss.tolist(),
                 latent_shift=(z - start).flatten(1).norm(dim=1).tolist())
    return z.to(latents.dtype)


def encode_with_pipeline(pipe, prompt: str, device, batch: int, do_cfg: bool
                         ) -> tuple[TextConditions, TextConditions | None]:
    """The prompt's conditional and unconditional conditions, B copies each, by the pipeline's public
    `encode_prompt` (SDXL's returns the pooled embeddings as well; its empty negative prompt is zeros)."""
    with torch.no_grad():
        if getattr(pipe, "text_encoder_2", None) is not None:
            cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(
                prompt, device=device, num_images_per_prompt=batch, do_classifier_free_guidance=do_cfg)
            return TextConditions(cond, pooled), (TextConditions(uncond, uncond_pooled) if do_cfg else None)
        cond, uncond = pipe.encode_prompt(prompt, device, batch, do_cfg)
    return TextConditions(cond), (TextConditions(uncond) if do_cfg else None)


def decode_latents(pipe, latents: torch.Tensor) -> tuple[list[Image.Image], list[bool] | None]:
    """Latents (B, C, h, w) -> PIL images, through the autoencoder and the pipeline's safety checker (if any).

    SDXL's autoencoder overflows in float16 (`force_upcast` in its config): it decodes in float32, as its
    pipeline does, and goes back to float16 afterwards. SDXL has no safety checker (nsfw None)."""
    vae = pipe.vae
    upcast = vae.dtype == torch.float16 and vae.config.get("force_upcast", False)
    with torch.no_grad():
        if upcast:
            vae.to(torch.float32)
        try:
            decoded = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
        finally:
            if upcast:
                vae.to(torch.float16)
        decoded = decoded.to(latents.dtype)
        checker = getattr(pipe, "run_safety_checker", None)
        decoded, nsfw = checker(decoded, latents.device, latents.dtype) if checker else (decoded, None)
        denormalize = [True] * len(decoded) if nsfw is None else [not flagged for flagged in nsfw]
        images = pipe.image_processor.postprocess(decoded, output_type="pil", do_denormalize=denormalize)
    return images, (list(map(bool, nsfw)) if nsfw is not None else None)
