"""Capture cross-attention maps from a diffusers UNet, with attention processors.

    with capture_cross_attention(pipe) as store:           # default: the model's map level (SD v1: 16x16)
        image = pipe("a cat and a dog", guidance_scale=7.5).images[0]
    maps = store.word_maps("a cat and a dog", ["cat", "dog"])   # (B, 2, 16, 16)

Which layers: each model reads its object-level maps at one level, `map_resolution(model)`: for Stable
Diffusion v1 at 512 px the 16x16 layers (as SepEn and Attend-and-Excite), SD 2.x at 768 px 24x24, SDXL at 1024 px
32x32, the toy model 8x8. SDXL's UNet also reads pooled text and time ids: call it with
`sae_utils.conditioning.unet_conditions(pipe, prompts)`.

How it works, in diffusers' own terms: every `Attention` module delegates its computation to a processor.
On the chosen cross-attention layers, `capture_cross_attention` installs a `CrossAttentionCaptureProcessor`,
which computes softmax(Q K^T / sqrt(d)) explicitly (diffusers' default SDPA kernel never returns the
probabilities) and hands them to an `AttentionStore`; every other layer keeps its processor (fast SDPA, no
materialised maps). On exit the previous processors are put back, whatever they were.

Each UNet call is one "step". Under classifier-free guidance the pipeline runs the unconditional and the
conditional batch in one call; only the conditional half is kept. With gradients enabled (training) the
maps keep their autograd graph; without, they are detached and only what was asked for is kept.
"""
from __future__ import annotations

import math
import re
from contextlib import contextmanager
from typing import Iterator, Literal, Sequence

import torch

from .maps import gather_word_maps
from .tokens import WordSpec, word_token_positions

Keep = Literal["mean", "steps", "last"]


class CaptureComplete(Exception):
    """Raised by a store with `stop_when_complete` once every captured layer has recorded: the rest of the
    UNet forward is not needed by the losses. `forward_until_captured` catches it."""


# ----------------------------------------------------------------------------------------------------------
# Which layers
# ----------------------------------------------------------------------------------------------------------
def cross_attention_layers(unet) -> dict[str, int]:
    """Every cross-attention layer of the UNet and its downsampling factor relative to the latent.

    Returns {"down_blocks.2.attentions.0.transformer_blocks.0.attn2": 4, ...}. A layer with factor f sees
    maps of (latent_h / f) x (latent_w / f): for SD v1 at 512 px (64x64 latents), factor 4 is 16x16.
    """
    n_down = len(unet.config.block_out_channels)
    layers = {}
    for name, module in unet.named_modules():
        if not (name.endswith("attn2") and getattr(module, "is_cross_attention", False)):
            continue
        block, index = re.match(r"(down_blocks|mid_block|up_blocks)\.?(\d*)", name).groups()
        level = {"down_blocks": lambda i: i, "mid_block": lambda i: n_down - 1,
                 "up_blocks": lambda i: n_down - 1 - i}[block](int(index or 0))
        layers[name] = 2 ** level
    return layers


def map_resolution(model, latent_size: int | None = None) -> int:
    """The side of the cross-attention maps where this model's objects are decided: what every default reads.

    A model folder may declare it (`toy_model.json`: "map_resolution", at the model's own image size). Otherwise it
    is the deepest cross-attention level of the UNet's down blocks, where an object covers a few map pixels:
    Stable Diffusion v1 and v2 at their native sizes 16x16 and 24x24 (latents / 4), the toy model 8x8 (latents / 2;
    its 16x16 layers are the counterpart of SD's 64x64 ones), `tiny` 8x8 (the same layers as SD v1's 16x16 ones).
    The mid block is not counted when it lies deeper: at the bottom of SD's UNet its maps are too coarse to place
    objects (SD v1: 8x8).

    SDXL at 1024 px: 32x32 (latents / 4). Its cross-attention runs only at 64x64 and 32x32 (none at 128x128), and
    32x32 is where it does most of it: 60 of its 70 layers (10 transformer blocks in each of down_blocks.2's, the
    mid block's and up_blocks.0's attention modules; SDXL has no lower level, so its mid block shares it). One map
    pixel covers 32x32 image pixels, as SD v1's 16x16 maps do at 512 px and SD 2's 24x24 at 768 px: the same object
    scale, the level SepEn and Attend-and-Excite chose for SD. Not measured against 64x64 (that needs the real
    weights); `resolution=64` or `map_resolution=64` (finetuning) reads the other level.

    model: a pipeline or a bare UNet. latent_size: the latent's side if not the UNet's `sample_size` (another image
    size keeps the level, so the resolution scales with it).
    """
    from .models import model_info

    unet = getattr(model, "unet", model)
    native = unet.config.sample_size
    latent_size = latent_size or native
    declared = model_info(model).get("map_resolution") if unet is not model else None
    if declared:
        factor = native // int(declared)
    else:
        down = [f for name, f in cross_attention_layers(unet).items() if name.startswith("down_blocks")]
        if not down:
            raise ValueError("This UNet has no cross-attention in its down blocks; pass `resolution` or `layers`.")
        factor = max(down)
    return latent_size // factor


def layers_at_resolution(unet, resolution: int = 16, latent_size: int | None = None) -> list[str]:
    """Names of the cross-attention layers whose maps are `resolution` x `resolution`.

    latent_size: the latent's side (default: the UNet's `sample_size`, 64 for SD v1 = 512 px images).
    """
    latent_size = latent_size or unet.config.sample_size
    layers = cross_attention_layers(unet)
    chosen = [name for name, factor in layers.items() if latent_size // factor == resolution]
    if not chosen:
        available = sorted({latent_size // f for f in layers.values()}, reverse=True)
        raise ValueError(
            f"No cross-attention layer has {resolution}x{resolution} maps for a {latent_size}x{latent_size} "
            f"latent; this UNet has cross-attention at {available}. Pass one of these as `resolution`.")
    return chosen


# ----------------------------------------------------------------------------------------------------------
# The processor
# ----------------------------------------------------------------------------------------------------------
class CrossAttentionCaptureProcessor:
    """A diffusers attention processor that computes cross-attention explicitly and records the probabilities.

    Numerically the same function as diffusers' `AttnProcessor2_0` (within float rounding). The softmax is
    taken in float32, as the UNet's own `upcast_softmax` does, so that fp16/bf16 maps are not quantised.
    `adjust_scores` is the one place a subclass may change the attention logits (see `TokenBoostProcessor`).
    """

    def __init__(self, store: "AttentionStore | None", layer: str):
        self.store, self.layer = store, layer

    def adjust_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """scores: (B, heads, L, T) attention logits; returned as they are."""
        return scores

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        if encoder_hidden_states is None:
            raise ValueError(f"{self.layer} is a self-attention layer; capture processors belong on "
                             "cross-attention (attn2) layers only.")
        if attn.spatial_norm is not None or attn.group_norm is not None or hidden_states.ndim != 3:
            raise NotImplementedError(f"{self.layer}: capture supports the transformer-block cross-attention "
                                      "of Stable Diffusion style UNets (no spatial/group norm, 3-D input).")
        residual = hidden_states
        batch, _, _ = hidden_states.shape
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        query = attn.to_q(hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        # (B, heads, L, d) for queries (L pixels), (B, heads, T, d) for keys and values (T text tokens)
        query, key, value = (x.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for x in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        scores = (query.float() @ key.float().transpose(-1, -2)) * attn.scale
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, key.shape[2], batch)
            scores = scores + mask.view(batch, attn.heads, -1, mask.shape[-1]).float()
        probs = self.adjust_scores(scores).softmax(dim=-1)  # (B, heads, L, T): each pixel's distribution over tokens
        if self.store is not None:
            self.store.record(self.layer, probs)
        hidden_states = (probs.to(value.dtype) @ value).transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class TokenBoostProcessor(CrossAttentionCaptureProcessor):
    """Adds a bias to chosen tokens' attention logits (an intervention, not a capture): every pixel then attends
    more to those tokens. The bias and the steps it applies in are held by a `TokenBoost` shared by all layers."""

    def __init__(self, boost: "TokenBoost", layer: str):
        super().__init__(store=None, layer=layer)
        self.boost = boost

    def adjust_scores(self, scores: torch.Tensor) -> torch.Tensor:
        bias = self.boost.current_bias(scores.shape[0])
        return scores if bias is None else scores + bias.to(scores.device)[:, None, None, :]


class TokenBoost:
    """bias: (B, T) logits to add for the B images of a pipeline call (the conditional half under classifier-free
    guidance: the unconditional prompt names no object); steps: the UNet calls (0-based) it applies in."""

    def __init__(self, bias: torch.Tensor, steps: Sequence[int] | None = None):
        if bias.ndim != 2:
            raise ValueError(f"bias must be (B, T): one row of token logits per image, got {tuple(bias.shape)}.")
        self.bias, self.steps = bias.float(), None if steps is None else set(steps)
        self.step = -1

    def begin_step(self) -> None:
        self.step += 1

    def current_bias(self, batch: int) -> torch.Tensor | None:
        if self.steps is not None and self.step not in self.steps:
            return None
        images = self.bias.shape[0]
        if batch == images:
            return self.bias
        if batch == 2 * images:  # [unconditional, conditional]: the empty prompt is left alone
            return torch.cat([torch.zeros_like(self.bias), self.bias])
        raise ValueError(f"A UNet batch of {batch} for a boost of {images} images: give one bias row per image.")


@contextmanager
def boost_tokens(model, bias: torch.Tensor, steps: Sequence[int] | None = None, resolution: int | None = None,
                 layers: Sequence[str] | None = None, latent_size: int | None = None) -> Iterator[TokenBoost]:
    """Raise (or lower) chosen tokens' cross-attention logits while sampling: the causal test of a premise.

        bias = torch.zeros(1, 77); bias[0, positions_of_frog] = 1.0
        with boost_tokens(pipe, bias, steps=range(25)):         # the first 25 of 50 steps
            image = pipe("a cat and a frog").images[0]

    bias: (B, T) added to the logits of the B images' conditional pass. steps: the UNet calls it applies in
    (default all). resolution/layers: as `capture_cross_attention` (default: the model's map level).
    On exit the previous processors are restored and the hook removed.
    """
    unet = getattr(model, "unet", model)
    if layers is None:
        layers = layers_at_resolution(unet, resolution or map_resolution(model, latent_size), latent_size)
    boost = TokenBoost(bias, steps)
    previous = unet.attn_processors
    processors = dict(previous)
    for name in layers:
        processors[f"{name}.processor"] = TokenBoostProcessor(boost, name)
    unet.set_attn_processor(processors)
    hook = unet.register_forward_pre_hook(lambda module, args: boost.begin_step())
    try:
        yield boost
    finally:
        hook.remove()
        unet.set_attn_processor(dict(previous))


# ----------------------------------------------------------------------------------------------------------
# The store
# ----------------------------------------------------------------------------------------------------------
class AttentionStore:
    """What the capture processors recorded, and how to read it back as maps.

    keep: "mean" (default) averages over steps as they come (constant memory), "steps" keeps each step,
        "last" keeps only the latest UNet call (training: one call per optimisation step).
    heads: "mean" averages the heads at once; "all" keeps them (B, heads, ...).
    cfg: "auto" keeps the conditional half when the pipeline runs classifier-free guidance; True/False force it.
    """

    def __init__(self, layers: dict[str, int], keep: Keep = "mean", heads: str = "mean", cfg="auto",
                 pipeline=None, tokenizer=None, stop_when_complete: bool = False):
        if keep not in ("mean", "steps", "last"):
            raise ValueError(f"keep={keep!r}: use 'mean' (average over steps), 'steps' (each step) or 'last'.")
        if heads not in ("mean", "all"):
            raise ValueError(f"heads={heads!r}: use 'mean' or 'all'.")
        if cfg not in ("auto", True, False):
            raise ValueError(f"cfg={cfg!r}: use 'auto', True or False.")
        self.layers = dict(layers)
        self.keep, self.heads, self.cfg = keep, heads, cfg
        self.pipeline = pipeline
        self.tokenizer = tokenizer if tokenizer is not None else getattr(pipeline, "tokenizer", None)
        self.stop_when_complete = stop_when_complete
        self.reset()

    def reset(self) -> None:
        """Forget everything recorded (e.g. before the next training step)."""
        self.num_steps = 0
        self.latent_hw: tuple[int, int] | None = None
        self._conditional_half = False
        self._recorded: set[str] = set()
        self._sum: dict[str, torch.Tensor] = {}
        self._steps: dict[str, list[torch.Tensor]] = {name: [] for name in self.layers}

    # -- called by the UNet pre-hook and the processors ----------------------------------------------------
    def begin_step(self, sample: torch.Tensor) -> None:
        """Called before every UNet forward: one call is one step."""
        self.num_steps += 1
        self._recorded = set()
        self.latent_hw = tuple(sample.shape[-2:])
        self._conditional_half = self._is_cfg_call(sample) if self.cfg == "auto" else bool(self.cfg)

    def _is_cfg_call(self, sample: torch.Tensor) -> bool:
        # The pipeline batches [unconditional, conditional] over the same latents: both conditions must hold.
        pipe_cfg = self.pipeline is not None and getattr(self.pipeline, "_guidance_scale", None) is not None \
            and self.pipeline.do_classifier_free_guidance
        half = sample.shape[0] // 2
        return bool(pipe_cfg and sample.shape[0] % 2 == 0 and torch.equal(sample[:half], sample[half:]))

    def record(self, layer: str, probs: torch.Tensor) -> None:
        """probs: (B, heads, L, T) attention probabilities of one layer for one UNet call."""
        if layer in self._recorded:
            return  # a layer runs once per UNet call: a second call is gradient checkpointing's recomputation
        self._recorded.add(layer)
        if self._conditional_half:
            probs = probs[probs.shape[0] // 2:]
        if self.heads == "mean":
            probs = probs.mean(dim=1)
        if not torch.is_grad_enabled():
            probs = probs.detach()
        if self.keep == "steps":
            self._steps[layer].append(probs)
        elif self.keep == "last" or layer not in self._sum:
            self._sum[layer] = probs
        else:
            self._sum[layer] = self._sum[layer] + probs
        if self.stop_when_complete and len(self._recorded) == len(self.layers):
            raise CaptureComplete

    # -- reading ---------------------------------------------------------------------------------------------
    def layer_maps(self, layer: str, step: int | None = None) -> torch.Tensor:
        """One layer's maps as (B, T, h, w), or (B, heads, T, h, w) with heads="all".

        step: None = the mean over recorded steps (keep="mean"/"steps") or the last call (keep="last");
        an int (keep="steps") = that step, negative from the end.
        """
        if layer not in self.layers:
            raise KeyError(f"{layer!r} was not captured; captured layers: {list(self.layers)}")
        if self.num_steps == 0:
            raise RuntimeError("Nothing recorded yet: run the pipeline or the UNet inside the capture context.")
        if self.keep == "steps":
            steps = self._steps[layer]
            probs = torch.stack(steps).mean(0) if step is None else steps[step]
        elif step is not None:
            raise ValueError(f"step={step} needs keep='steps'; this store keeps {self.keep!r}.")
        else:
            probs = self._sum[layer] / (self.num_steps if self.keep == "mean" else 1)
        return self._to_image(probs)

    def token_maps(self, step: int | None = None, layers: Sequence[str] | None = None) -> torch.Tensor:
        """Maps of every token, averaged over heads and the chosen layers (default: all captured): (B, T, h, w).

        Each pixel's values sum to 1 over the T tokens (they are softmax probabilities).
        """
        layers = list(layers) if layers is not None else list(self.layers)
        maps = [self.layer_maps(name, step) for name in layers]
        if self.heads == "all":
            maps = [m.mean(dim=1) for m in maps]
        sizes = {tuple(m.shape[-2:]) for m in maps}
        if len(sizes) > 1:
            raise ValueError(f"The chosen layers have maps of different sizes {sorted(sizes)}; pass `layers` of "
                             "one resolution (see layers_at_resolution) or capture one resolution only.")
        return torch.stack(maps).mean(dim=0)

    def word_maps(self, prompts: str | Sequence[str], words: Sequence[WordSpec] | Sequence[Sequence[WordSpec]],
                  step: int | None = None, layers: Sequence[str] | None = None, combine: str = "sum",
                  tokenizer=None) -> torch.Tensor:
        """Maps of the given words of each prompt: (B, K, h, w).

        prompts: one prompt for the whole batch, or B prompts, or B/n prompts each repeated n times in a row
            (as the pipeline's num_images_per_prompt does).
        words: K words for every prompt, or one list (a `list`) of K words per prompt. A word is "dog" or
            ("dog", 1) for its second occurrence.
        combine: a word of several tokens gets the "sum" of its tokens' maps (its share of the attention, so
            the maps still sum to at most 1 per pixel) or their "mean".
        """
        tokenizer = tokenizer or self.tokenizer
        if tokenizer is None:
            raise ValueError("word_maps needs the pipeline's tokenizer: pass tokenizer=pipe.tokenizer.")
        token_maps = self.token_maps(step, layers)
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        per_prompt = bool(words) and all(isinstance(w, list) for w in words)
        word_lists = list(words) if per_prompt else [list(words)] * len(prompts)
        if len(word_lists) != len(prompts):
            raise ValueError(f"{len(word_lists)} word lists for {len(prompts)} prompts: give one per prompt.")
        batch = token_maps.shape[0]
        if batch % len(prompts):
            raise ValueError(f"{len(prompts)} prompts for a batch of {batch} maps: give 1, {batch} or a divisor.")
        repeat = batch // len(prompts)
        positions = [word_token_positions(tokenizer, p, w) for p, w in zip(prompts, word_lists)]
        return gather_word_maps(token_maps, [pos for pos in positions for _ in range(repeat)], combine=combine)

    def _to_image(self, probs: torch.Tensor) -> torch.Tensor:
        """(..., L, T) -> (..., T, h, w), using the latent's aspect ratio from the last UNet call."""
        length = probs.shape[-2]
        if self.latent_hw is None:
            h = w = math.isqrt(length)
        else:
            factor = math.sqrt(self.latent_hw[0] * self.latent_hw[1] / length)
            h, w = round(self.latent_hw[0] / factor), round(self.latent_hw[1] / factor)
        if h * w != length:
            raise RuntimeError(f"Cannot fold {length} queries into a map for a latent of {self.latent_hw}.")
        return probs.transpose(-1, -2).reshape(*probs.shape[:-2], probs.shape[-1], h, w)


# ----------------------------------------------------------------------------------------------------------
# The context manager
# ----------------------------------------------------------------------------------------------------------
def forward_until_captured(unet, *args, **kwargs):
    """Call the UNet; with a `stop_when_complete` capture installed, return None once the maps are in.

    Training on the maps alone does not need the UNet's output: for SD v1 the last 16x16 layer is in
    up_blocks.1, so the two highest-resolution up blocks are skipped.
    """
    try:
        return unet(*args, **kwargs)
    except CaptureComplete:
        return None


@contextmanager
def capture_cross_attention(model, resolution: int | None = None, layers: Sequence[str] | None = None,
                            keep: Keep = "mean", heads: str = "mean", cfg="auto",
                            latent_size: int | None = None,
                            stop_when_complete: bool = False) -> Iterator[AttentionStore]:
    """Install capture processors on some cross-attention layers of a pipeline's (or a bare) UNet.

    model: a `StableDiffusionPipeline` (its tokenizer and guidance setting are used) or a `UNet2DConditionModel`.
    resolution: capture the layers whose maps are resolution x resolution for a latent of `latent_size`
        (default the UNet's sample_size); None: the model's own, `map_resolution(model)`. Ignored when `layers`
        names the layers explicitly.
    stop_when_complete: training only; stop the UNet forward once every captured layer has recorded (call
        the UNet through `forward_until_captured`).
    Yields the `AttentionStore`. On exit the previous processors are restored and the hook removed.
    """
    unet = getattr(model, "unet", model)
    pipeline = model if unet is not model else None
    all_layers = cross_attention_layers(unet)
    if layers is None:
        resolution = resolution or map_resolution(model, latent_size)
        layers = layers_at_resolution(unet, resolution, latent_size)
    unknown = [name for name in layers if name not in all_layers]
    if unknown:
        raise ValueError(f"Not cross-attention layers of this UNet: {unknown}. They are: {list(all_layers)}")
    store = AttentionStore({name: all_layers[name] for name in layers}, keep=keep, heads=heads, cfg=cfg,
                           pipeline=pipeline, stop_when_complete=stop_when_complete)
    previous = unet.attn_processors
    processors = dict(previous)
    for name in layers:
        processors[f"{name}.processor"] = CrossAttentionCaptureProcessor(store, name)
    unet.set_attn_processor(processors)
    hook = unet.register_forward_pre_hook(
        lambda module, args, kwargs: store.begin_step(args[0] if args else kwargs["sample"]), with_kwargs=True)
    try:
        yield store
    finally:
        hook.remove()
        unet.set_attn_processor(dict(previous))
