"""Checks for the two exercises where the learner writes the method itself, run on the notebook's own model.

    check_capture_processor(MyCaptureProcessor, pipe)    # notebook 01: a processor that records the maps
    check_training_step(my_training_step, finetuner)     # notebook 03: one data-free SepEn step, up to backward

Both compare the learner's code with the package on fixed inputs (a fixed latent, timestep and prompts; a fixed
random draw) and, when it differs, compute the most likely mistakes on the same inputs: the hint names the one
that gives exactly the learner's numbers. A mistake changes the numbers on every model (random `tiny`, the `toy`,
Stable Diffusion): each is a different function of the same weights, so none can pass by coincidence. Each
prints "Well done" and returns True, or raises `ExerciseError` (an AssertionError); "Not done yet" while the
learner's code still raises NotImplementedError.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch

from .attention import (CrossAttentionCaptureProcessor, capture_cross_attention, cross_attention_layers,
                        layers_at_resolution, map_resolution)
from .conditioning import encode_prompts, unconditional, unet_conditions, zero_conditions
from .exercises import ExerciseError

CHECK_PROMPTS = ("a photo of a star and a heart", "a photo of a ring and a moon")  # any two prompts differ


def cross_attention_order(model) -> list[str]:
    """Every cross-attention layer of the UNet in the order a forward pass runs them (down, mid, up blocks), found
    by running the UNet once on a small zero latent. (`cross_attention_layers` lists them in module order.)"""
    unet = getattr(model, "unet", model)
    order: list[str] = []
    hooks = [unet.get_submodule(name).register_forward_pre_hook(lambda module, args, name=name: order.append(name))
             for name in cross_attention_layers(unet)]
    side = max(8, unet.config.sample_size // 4)
    param = next(unet.parameters())
    try:
        with torch.no_grad():
            unet(torch.zeros(1, unet.config.in_channels, side, side, device=param.device, dtype=param.dtype),
                 torch.tensor(0, device=param.device), **zero_conditions(unet, 1, side * 8))
    finally:
        for hook in hooks:
            hook.remove()
    return list(dict.fromkeys(order))


def layers_after_maps(model) -> list[str]:
    """The cross-attention layers that run after the last map-level one. Training reads only the map-level maps and
    stops the UNet there (`early_exit`), so these layers' keys get no gradient from Separate and Enhance: they
    cannot change (only a loss on the UNet's output, such as the norm loss, reaches them)."""
    unet = getattr(model, "unet", model)
    maps = set(layers_at_resolution(unet, map_resolution(model)))
    order = cross_attention_order(unet)
    last = max(i for i, name in enumerate(order) if name in maps)
    return order[last + 1:]


# ----------------------------------------------------------------------------------------------------------
# Notebook 01: a capture processor
# ----------------------------------------------------------------------------------------------------------
class _RecordingProcessor(CrossAttentionCaptureProcessor):
    """The package's processor, also keeping its layer's inputs and output (for the one-layer check)."""

    def __init__(self, store, layer):
        super().__init__(store, layer)
        self.inputs = None
        self.output = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        self.inputs = (hidden_states.detach().clone(), encoder_hidden_states.detach().clone())
        self.output = super().__call__(attn, hidden_states, encoder_hidden_states, *args, **kwargs)
        return self.output


def _heads(attn, hidden, text, split: bool = True):
    """Queries, keys (float32) as (B, heads, L, d) and (B, heads, T, d); one head of the full width if not split."""
    query, key = attn.to_q(hidden).float(), attn.to_k(text).float()
    heads = attn.heads if split else 1
    B = hidden.shape[0]
    return tuple(x.view(B, -1, heads, x.shape[-1] // heads).transpose(1, 2) for x in (query, key))


def _fold(probs: torch.Tensor) -> torch.Tensor:
    """(B, L, T) -> (B, T, h, w) for a square map."""
    side = math.isqrt(probs.shape[-2])
    return probs.transpose(-1, -2).reshape(probs.shape[0], probs.shape[-1], side, side)


def _capture_mistakes(attn, hidden, text) -> dict[str, torch.Tensor]:
    """The maps (conditional half, (B/2, T, h, w)) that the likely mistakes record, on one layer's inputs."""
    B = hidden.shape[0]
    q, k = _heads(attn, hidden, text)
    head_dim, width = q.shape[-1], q.shape[-1] * attn.heads
    scores = q @ k.transpose(-1, -2)
    right = (scores * attn.scale).softmax(-1)  # (B, heads, L, T)
    q1, k1 = _heads(attn, hidden, text, split=False)
    one_head = (q1 @ k1.transpose(-1, -2))
    cond = slice(B // 2, None)
    return {
        f"you left out the softmax scale: scores = Q K^T * attn.scale (1/sqrt(d), d = {head_dim}, one head's "
        f"width), then the softmax":
            _fold((scores.softmax(-1))[cond].mean(1)),
        f"you scaled by 1/sqrt({width}), the full width: the scale is 1/sqrt(d) of one head, d = {head_dim} "
        f"(attn.scale)":
            _fold((scores / math.sqrt(width)).softmax(-1)[cond].mean(1)),
        "you kept the first half of the batch, the unconditional (empty) prompt: under classifier-free guidance "
        "the UNet's batch is [unconditional, conditional]; keep probs[B // 2:]":
            _fold(right[:B // 2].mean(1)),
        f"you summed the {attn.heads} heads: average them (mean over the head axis), so that each pixel's "
        "maps still sum to 1 over the tokens":
            _fold(right[cond].sum(1)),
        f"you kept only the first head: average over all {attn.heads} heads":
            _fold(right[cond][:, 0]),
        f"you did not split the heads: view Q and K as (B, L, {attn.heads}, {head_dim}) and transpose to "
        f"(B, {attn.heads}, L, {head_dim}) before Q K^T; one attention over the whole width is another function":
            _fold((one_head * attn.scale).softmax(-1)[cond].squeeze(1)),
        "you reshaped (B, L, T) to (B, T, h, w) without transposing: a token's map is a column of A, so "
        "transpose the last two axes first (probs.transpose(-1, -2))":
            right[cond].mean(1).reshape(B // 2, -1, math.isqrt(q.shape[-2]), math.isqrt(q.shape[-2])),
        "you took the softmax over the pixels: it runs over the 77 tokens (the last axis), so that each pixel's "
        "attention sums to 1":
            _fold((scores * attn.scale).softmax(-2)[cond].mean(1)),
    }


def _fixed_unet_inputs(pipe, prompts, seed: int):
    """A classifier-free guidance batch as the pipeline builds it: latents twice, text [unconditional, prompts]
    (as UNet keyword arguments: `encoder_hidden_states`, and SDXL's `added_cond_kwargs`)."""
    unet = pipe.unet
    side = unet.config.sample_size
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(len(prompts), unet.config.in_channels, side, side, generator=g)
    text = unconditional(pipe, len(prompts)).cat(encode_prompts(pipe, prompts))
    latents = torch.cat([latents, latents]).to(unet.device, unet.dtype)
    timestep = torch.tensor(500, device=unet.device)
    return latents, timestep, unet_conditions(pipe, text)


def _close(a: torch.Tensor, b: torch.Tensor, atol: float) -> bool:
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return a.shape == b.shape and bool(torch.isfinite(a).all()) and torch.allclose(a, b, rtol=1e-3, atol=atol)


def _shape_hint(got: tuple, expected: tuple, heads: int, length: int) -> str:
    B, T = expected[:2]
    if got == (2 * B, *expected[1:]):
        return ("you kept both halves of the batch: under classifier-free guidance it is [unconditional, "
                "conditional]; keep the second half, probs[B // 2:]")
    if got == (B, heads, *expected[1:]):
        return f"one map per head: average the {heads} heads (mean over dim 1)"
    if got == (B, heads, length, T):
        return (f"one (L, 77) matrix per head: average the {heads} heads (mean over dim 1), then fold into maps: "
                "transpose to (B, 77, L) and reshape to (B, 77, h, w)")
    if got == (B, length, T):
        return "fold the probabilities into maps: transpose to (B, 77, L), then reshape to (B, 77, h, w)"
    return f"record (B, 77, h, w) = {expected}: the conditional half, heads averaged, one map per token"


def _stub(make_processor: Callable, attn, inputs) -> bool:
    try:
        make_processor()(attn, inputs[0], encoder_hidden_states=inputs[1])
    except NotImplementedError:
        return True
    except Exception:  # noqa: BLE001 - reported with its context below
        pass
    return False


def check_capture_processor(make_processor: Callable, pipe, prompts=CHECK_PROMPTS, seed: int = 0) -> bool:
    """Notebook 01's exercise: `make_processor()` gives a new diffusers attention processor which, at each call,
    returns the layer's output and appends to its list `.maps` the call's cross-attention maps: the conditional
    half of the batch, averaged over heads, folded to (B, 77, h, w).

    Checked on fixed inputs (a random latent, timestep 500, two prompts under classifier-free guidance): first on
    the first map-level layer alone (its maps and output), then installed on every map-level layer of the UNet
    against `capture_cross_attention`.
    """
    unet = pipe.unet
    layers = layers_at_resolution(unet, map_resolution(pipe))
    latents, timestep, text = _fixed_unet_inputs(pipe, prompts, seed)
    atol = 1e-5 if unet.dtype == torch.float32 else 3e-3
    previous = unet.attn_processors
    recorders = {name: _RecordingProcessor(None, name) for name in layers}
    try:
        with capture_cross_attention(unet, layers=layers, keep="last", cfg=True) as store, torch.no_grad():
            for name in layers:  # the package's processors, recording their inputs as well
                recorders[name].store = store
            unet.set_attn_processor({**unet.attn_processors, **{f"{n}.processor": p for n, p in recorders.items()}})
            expected_output = unet(latents, timestep, **text).sample
            expected = {name: store.layer_maps(name) for name in layers}
    finally:
        unet.set_attn_processor(dict(previous))

    first = layers[0]
    attn = unet.get_submodule(first)
    hidden, encoder = recorders[first].inputs
    if _stub(make_processor, attn, recorders[first].inputs):
        print("Not done yet: write the processor above, then run this cell again.")
        return False
    where = f"on layer {first} (maps {tuple(expected[first].shape[-2:])}, a batch of {hidden.shape[0]} = " \
            f"{hidden.shape[0] // 2} unconditional + {hidden.shape[0] // 2} conditional)"

    def fail(message: str, hint: str) -> ExerciseError:
        return ExerciseError(f"your processor {message} {where}.\nhint: {hint}")

    processor = make_processor()
    if not isinstance(getattr(processor, "maps", None), list):
        raise fail("has no list `.maps`", "start with self.maps = [] in __init__ and append one tensor per call")
    try:
        with torch.no_grad():
            output = processor(attn, hidden, encoder_hidden_states=encoder)
    except Exception as error:  # a learner's bug: say where
        raise fail(f"raised {type(error).__name__}: {error}",
                   f"hidden_states is (B, L, C) = {tuple(hidden.shape)}, encoder_hidden_states (B, 77, D) = "
                   f"{tuple(encoder.shape)}; attn.heads = {attn.heads}") from error
    if len(processor.maps) != 1:
        raise fail(f"recorded {len(processor.maps)} tensors in one call", "append exactly one (B, 77, h, w) per call")
    got = processor.maps[0]
    if not isinstance(got, torch.Tensor):
        raise fail(f"recorded a {type(got).__name__}", "append a tensor, (B, 77, h, w)")
    want = expected[first]
    if tuple(got.shape) != tuple(want.shape):
        raise fail(f"recorded shape {tuple(got.shape)}, expected {tuple(want.shape)}",
                   _shape_hint(tuple(got.shape), tuple(want.shape), attn.heads, hidden.shape[1]))
    if not _close(got, want, atol):
        hints = [h for h, maps in _capture_mistakes(attn, hidden, encoder).items() if _close(got, maps, atol)]
        error = (got.detach().float().cpu() - want.float().cpu()).abs().max().item()
        raise fail(f"recorded maps that differ from capture_cross_attention's by up to {error:.3g}",
                   hints[0] if hints else "compare with A = softmax(Q K^T * attn.scale) step by step: split the heads, "
                   "take the conditional half, average the heads, fold (B, L, 77) into (B, 77, h, w)")
    if not isinstance(output, torch.Tensor) or output.shape != recorders[first].output.shape:
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise fail(f"returned {shape} instead of the layer's output {tuple(recorders[first].output.shape)}",
                   "return the attention's output, as the layer you replace does: probs @ V, heads merged, "
                   "then attn.to_out[0] and attn.to_out[1]")
    if not _close(output, recorders[first].output, atol * 10):
        raise fail("records the right maps but returns another output",
                   "output = probs @ V for all of the batch (both halves), heads merged back with transpose(1, 2)"
                   ".reshape(B, L, heads * d), then attn.to_out[0] (the projection) and attn.to_out[1] (dropout)")

    # the whole UNet, with the learner's processors on every map-level layer
    mine = {name: make_processor() for name in layers}
    try:
        unet.set_attn_processor({**unet.attn_processors, **{f"{n}.processor": p for n, p in mine.items()}})
        with torch.no_grad():
            output = unet(latents, timestep, **text).sample
    finally:
        unet.set_attn_processor(dict(previous))
    for name in layers:
        if len(mine[name].maps) != 1 or not _close(mine[name].maps[0], expected[name], atol):
            raise ExerciseError(f"installed on the whole UNet, your processor's maps of {name} differ from "
                                f"capture_cross_attention's.\nhint: each layer has its own processor and records "
                                f"its own maps; the first layer's were right, so look at what differs between layers "
                                f"(their width, their number of pixels)")
    if not _close(output, expected_output, atol * 100):
        raise ExerciseError("with your processors the UNet's noise prediction differs from the original.\nhint: "
                            "return the layer's output unchanged: the processor only watches")
    print(f"Well done: your processor records the maps of all {len(layers)} map-level layers exactly as "
          f"capture_cross_attention does (conditional half, heads averaged, {tuple(want.shape[-2:])}), and the UNet "
          "computes what it computed before.")
    return True


# ----------------------------------------------------------------------------------------------------------
# Notebook 03: one training step
# ----------------------------------------------------------------------------------------------------------
def expected_draw(generator: torch.Generator, batch_size: int, latent_shape: tuple, scale: float,
                  timestep_range: tuple[int, int] = (0, 1000)):
    """The exercise's draw, in its order: clean latents (N(0, 1) x scale), noise, timesteps."""
    clean = torch.randn(batch_size, *latent_shape, generator=generator) * scale
    noise = torch.randn(batch_size, *latent_shape, generator=generator)
    timesteps = torch.randint(*timestep_range, (batch_size,), generator=generator)
    return clean, noise, timesteps


@contextlib.contextmanager
def _fresh_unet(unet, keep: list[torch.nn.Parameter]):
    """Every UNet parameter requires grad and has none (as `load_pipeline` gives the UNet); on exit the flags,
    gradients and the trained tensors' values are put back as they were."""
    flags = {name: p.requires_grad for name, p in unet.named_parameters()}
    values = [p.detach().clone() for p in keep]
    try:
        for p in unet.parameters():
            p.requires_grad_(True)
            p.grad = None
        yield
    finally:
        for name, p in unet.named_parameters():
            p.requires_grad_(flags[name])
            p.grad = None
        with torch.no_grad():
            for p, value in zip(keep, values):
                p.copy_(value)


class _Inputs:
    """Records what the first UNet call of a step was given (a forward pre-hook)."""

    def __init__(self, unet):
        self.calls = []
        self.hook = unet.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        sample = args[0] if args else kwargs.get("sample")
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        text = args[2] if len(args) > 2 else kwargs.get("encoder_hidden_states")
        self.calls.append(tuple(x.detach().clone() if isinstance(x, torch.Tensor) else x
                                for x in (sample, timestep, text)))


def _grads(unet) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().float().clone() for name, p in unet.named_parameters() if p.grad is not None}


def check_training_step(step_fn: Callable, finetuner, seed: int = 1234) -> bool:
    """Notebook 03's exercise: `step_fn(pipe, noise_scheduler, prompt, words, generator, batch_size)` makes one
    data-free SepEn step on the fixed draw of `generator` and stops after backward: it returns the loss (a 0-d
    tensor, the mean over the batch) and leaves the gradients in the .grad of the cross-attention keys, and
    nowhere else. No optimizer step.

    The draw, in this order: z0 = N(0, 1) x the autoencoder's scaling factor, (B, 4, h, w); noise N(0, 1); t =
    torch.randint(0, 1000, (B,)); all from `generator`. The UNet is handed over as `load_pipeline` gives it
    (every parameter requires grad). Compared with the package's step (`Finetuner.sepen_terms_from` on the same
    draw): the UNet's inputs, the loss, which tensors get gradients, and their values. The step is run twice
    on the same draw: the second must give the same gradients.
    """
    pipe, unet, config = finetuner.pipe, finetuner.unet, finetuner.config
    sample = finetuner.sampler.batch(config.seed, 0, 0, 1)[0]
    prompt, words = sample.prompt, list(sample.word_specs)
    B = config.batch_size
    shape = (unet.config.in_channels, finetuner.latent_size, finetuner.latent_size)
    scale = pipe.vae.config.scaling_factor
    half = finetuner.weight_dtype != torch.float32
    tol = dict(rtol=2e-2, atol=2e-3) if half else dict(rtol=1e-4, atol=1e-6)
    keys = list(finetuner.parameters)
    key_names = list(finetuner.trainable_names)

    def run():
        recorder = _Inputs(unet)
        try:
            with finetuner.autocast():  # fp16 weights with float32 keys: the precision the package trains in
                loss = step_fn(pipe, finetuner.noise_scheduler, prompt, words, torch.Generator().manual_seed(seed), B)
        finally:
            recorder.hook.remove()
        return loss, recorder.calls, _grads(unet)

    before = [p.detach().clone() for p in keys]
    with _fresh_unet(unet, keys):
        try:
            loss, calls, grads = run()
        except NotImplementedError:
            print("Not done yet: write my_training_step above, then run this cell again.")
            return False
        except Exception as error:  # a learner's bug: report it
            raise ExerciseError(f"my_training_step raised {type(error).__name__}: {error}\nhint: the step gets "
                                f"prompt={prompt!r}, words={words}, a CPU torch.Generator and batch_size={B}; draw on "
                                f"the CPU with generator=generator, then move to {unet.device}") from error
        changed = [n for n, p, v in zip(key_names, keys, before) if not torch.equal(p.detach(), v)]
        _, _, grads_again = run()

    # the package's step on the same draw
    clean, noise, timesteps = expected_draw(torch.Generator().manual_seed(seed), B, shape, scale)
    noisy = finetuner.noise_scheduler.add_noise(clean, noise, timesteps)
    text = finetuner.text_embeddings([prompt] * B)
    pooled = finetuner.pooled_embeddings([prompt] * B)  # SDXL's; None for SD 1.x and 2.x
    with _fresh_unet(unet, keys):
        unet.requires_grad_(False)
        for p in keys:
            p.requires_grad_(True)
        with finetuner.capturing():
            terms = finetuner.sepen_terms_from(noisy.to(finetuner.device, finetuner.weight_dtype),
                                               timesteps.to(finetuner.device), text, finetuner.word_masks([sample] * B),
                                               pooled)
            expected_loss = terms.total.mean()
            expected_loss.backward()
        expected_grads = _grads(unet)

    def fail(message: str, hint: str) -> ExerciseError:
        return ExerciseError(f"my_training_step {message}.\nhint: {hint}")

    if not calls:
        raise fail("never called the UNet", "run pipe.unet(noisy, t, **unet_conditions(pipe, prompts)) inside "
                   "capture_cross_attention(pipe, keep='last')")
    got_noisy, got_t, got_text = calls[0]
    got_t = torch.as_tensor(got_t).detach().cpu()
    # 1. the timesteps
    if got_t.dtype.is_floating_point or got_t.shape != timesteps.shape or not torch.equal(got_t.long(), timesteps):
        g = torch.Generator().manual_seed(seed)
        torch.randn(B, *shape, generator=g), torch.randn(B, *shape, generator=g)
        state = g.get_state()
        variants = {}
        for low, high, hint in ((0, 999, "randint's upper bound is exclusive: randint(0, 999) never draws 999; the "
                                          "schedule has 1000 timesteps, 0..999: torch.randint(0, 1000, (B,))"),
                                (1, 1000, "timesteps run from 0 to 999: torch.randint(0, 1000, (B,))"),
                                (1, 1001, "timesteps run from 0 to 999 (there is no 1000): torch.randint(0, 1000, (B,))"),
                                (0, 1001, "there is no timestep 1000: randint's upper bound is exclusive, "
                                          "torch.randint(0, 1000, (B,))")):
            g.set_state(state)
            variants[hint] = torch.randint(low, high, (B,), generator=g)
        g = torch.Generator().manual_seed(seed)
        variants["draw in the order of the exercise: z0 first, then the noise, then t (each call moves the "
                 "generator on)"] = torch.randint(0, 1000, (B,), generator=g)
        hints = [h for h, v in variants.items() if got_t.shape == v.shape and torch.equal(got_t.long(), v)]
        if got_t.dtype.is_floating_point:
            hints.insert(0, "timesteps are integers: torch.randint(0, 1000, (B,), generator=generator)")
        elif got_t.numel() != B:
            hints.insert(0, f"one timestep per sample, shape ({B},): torch.randint(0, 1000, ({B},), generator=generator)")
        if not hints and got_t.numel() and (got_t.max() >= 1000 or got_t.min() < 0):
            hints = ["a timestep outside 0..999: the schedule has 1000 steps"]
        raise fail(f"gave the UNet timesteps {got_t.tolist()}, expected {timesteps.tolist()}",
                   hints[0] if hints else "t = torch.randint(0, 1000, (B,), generator=generator), drawn after z0 "
                                          "and the noise")
    # 2. the noisy latents
    got_noisy = got_noisy.detach().float().cpu()
    if not (got_noisy.shape == noisy.shape and torch.allclose(got_noisy, noisy, **tol)):
        add = finetuner.noise_scheduler.add_noise
        eps0 = clean / scale
        variants = {
            f"your clean latents are N(0, 1): scale them by the autoencoder's factor, z0 = N(0, 1) x "
            f"pipe.vae.config.scaling_factor ({scale:.5g} for this model), as the released code does":
                add(eps0, noise, timesteps),
            f"you divided by the scaling factor: multiply, z0 = N(0, 1) x {scale:.5g}":
                add(eps0 / scale, noise, timesteps),
            "you gave the UNet the clean latents: noise them to t with noise_scheduler.add_noise(z0, noise, t)":
                clean,
            "you swapped z0 and the noise: draw z0 first (then scale it), then the noise":
                add(noise * scale, eps0, timesteps),
        }
        hints = [h for h, v in variants.items() if got_noisy.shape == v.shape and torch.allclose(got_noisy, v, **tol)]
        raise fail(f"gave the UNet other noisy latents (shape {tuple(got_noisy.shape)}, expected {tuple(noisy.shape)})",
                   hints[0] if hints else "z0 = torch.randn(B, 4, h, w, generator=generator) * scaling_factor, then "
                   "noise = torch.randn(..., generator=generator), then t; noisy = noise_scheduler.add_noise(z0, noise, t)")
    # 3. the prompt
    if got_text is None or not torch.allclose(got_text.float().cpu(), text.float().cpu(), **tol):
        raise fail("gave the UNet other text embeddings",
                   f"encode [prompt] * {B} padded to 77 tokens: pipe.text_encoder(pipe.tokenizer(..., "
                   "padding='max_length', max_length=77, return_tensors='pt').input_ids)[0] (any model: "
                   "sae_utils.conditioning.unet_conditions(pipe, [prompt] * B)); no unconditional half")
    # 4. the loss
    if not isinstance(loss, torch.Tensor):
        raise fail(f"returned a {type(loss).__name__}", "return the loss tensor (no .item())")
    if loss.numel() == B and loss.ndim == 1:
        raise fail(f"returned {B} losses, shape {tuple(loss.shape)}",
                   "one loss per step: the mean over the batch, loss = sepen_loss(maps).mean()")
    got_loss, want_loss = loss.detach().float().cpu().reshape(-1), expected_loss.detach().float().cpu().reshape(-1)
    if got_loss.shape != want_loss.shape or not torch.allclose(got_loss, want_loss, **tol):
        per_sample = terms.total.detach().float().cpu()
        c = config
        variants = {
            f"you summed the batch: the step's loss is the mean over its {B} samples": per_sample.sum(),
            f"lambda_sep and lambda_en swapped? loss = {c.lambda_sep} * separate + {c.lambda_en} * enhance":
                (c.lambda_en * terms.separate + c.lambda_sep * terms.enhance).mean().detach().cpu(),
            "you left out the enhance term": (c.lambda_sep * terms.separate).mean().detach().cpu(),
            "you left out the separate term": (c.lambda_en * terms.enhance).mean().detach().cpu(),
            f"you used only the first sample: average all {B}": per_sample[0],
        }
        hints = [h for h, v in variants.items() if got_loss.numel() == 1 and torch.allclose(got_loss[0], v.float(), **tol)]
        raise fail(f"returned the loss {got_loss.tolist()}, expected {want_loss.tolist()}",
                   hints[0] if hints else "the maps of the two words at the model's map level (capture_cross_attention("
                   "pipe, keep='last'), store.word_maps(prompt, words)), then sepen_loss(maps).mean()")
    # 5. where the gradients went
    if changed:
        raise fail(f"changed {len(changed)} weights, e.g. {changed[0]}",
                   "stop after backward: this exercise compares gradients; no optimizer step, no in-place update")
    if not grads:
        raise fail("left no gradient anywhere", "call loss.backward() (outside torch.no_grad()) before returning")
    extra = sorted(set(grads) - set(expected_grads))
    missing = sorted(set(expected_grads) - set(grads))
    if extra:
        self_attention = [n for n in extra if ".attn1.to_k" in n]
        hint = (f"'to_k' also matches the self-attention keys ({self_attention[0]}): SepEn trains the cross-attention "
                f"keys, attn2.to_k" if self_attention and len(self_attention) == len(extra) else
                f"freeze the UNet first, pipe.unet.requires_grad_(False), then enable the {len(key_names)} keys "
                f"(attn2.to_k): otherwise backward fills gradients for every parameter ({len(extra)} tensors too many, "
                f"e.g. {extra[0]})")
        raise fail(f"left gradients on {len(extra)} tensors that SepEn does not train, e.g. {extra[0]}", hint)
    if missing:
        raise fail(f"left no gradient on {len(missing)} keys that the package trains, e.g. {missing[0]}",
                   "enable requires_grad on every cross-attention key (attn2.to_k of every layer), not only the "
                   "map-level layers': the keys of earlier layers change the maps through the features they paint")
    for name in expected_grads:
        want, got, again = expected_grads[name], grads[name], grads_again.get(name)
        if not torch.allclose(got, want, rtol=tol["rtol"], atol=tol["atol"] + tol["rtol"] * float(want.abs().max())):
            raise fail(f"left other gradients on {name}", "loss.backward() on the loss you return, and nothing else: "
                       "no second backward, no scaling of the loss")
        if again is None or not torch.allclose(again, want, rtol=tol["rtol"],
                                               atol=tol["atol"] + tol["rtol"] * float(want.abs().max())):
            double = again is not None and torch.allclose(again, 2 * want, rtol=tol["rtol"],
                                                          atol=tol["atol"] + 2 * tol["rtol"] * float(want.abs().max()))
            raise fail(f"gave other gradients on a second call with the same draw ({name})",
                       "you did not zero the gradients: backward adds to .grad, so the second step's gradients are the "
                       "sum of both; set p.grad = None (or unet.zero_grad()) before backward" if double else
                       "the same draw must give the same gradients: zero them before backward, use only `generator`")
    without = [n for n in key_names if n not in expected_grads]
    print(f"Well done: on the fixed draw (t = {timesteps.tolist()}) your step gives the package's loss "
          f"{float(want_loss[0]):.6f} and its gradients on the {len(expected_grads)} keys that get one "
          f"({len(without)} of the {len(key_names)} keys come after the last map layer and get none).")
    return True
