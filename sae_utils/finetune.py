"""Finetune the cross-attention keys of a diffusion model with the Separate and Enhance losses. No images.

    config = FinetuneConfig(model="toy", pairs=[("star", "heart")], steps=200)
    finetuner = Finetuner(config)          # loads the pipeline, freezes everything but attn2.to_k
    result = finetuner.train()             # tqdm progress; checkpoints, history and validation images on disk
    result.delta                           # the trained tensors + metadata (see sae_utils.delta)

One step (data-free, as in the reference code): random latents (N(0, 1) times the autoencoder's scaling
factor), a random timestep, noise; the UNet runs on "a photo of a {a} and a {b}"; the map-level cross-attention
maps of the two words give `sepen_loss`; gradients reach only the trainable tensors; AdamW with clipping.

Every sample of a step is a pure function of (seed, step, its index in the global batch), and gradients are
averaged over processes explicitly, so one process, N processes (`accelerate launch`) and a resumed run all
compute the same update.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import conditioning
from . import delta as deltas
from .attention import capture_cross_attention, forward_until_captured, map_resolution
from .checkpoint import (CheckpointError, atomic_write, check_writable, find_checkpoint, load_checkpoint,
                         optimizer_from_tensors, optimizer_to_tensors, remove_orphans, save_checkpoint)
from .families import check_token_alignment, family_of
from .losses import sepen_loss_terms, sepen_loss_terms_per_slice
from .maps import released_head_stack
from .models import DEFAULT_MODEL, load_pipeline, model_info, portable_model_name
from .prompts import PRIOR_TEMPLATE, TRAIN_TEMPLATE, PairPrompt, PairSampler, prior_prompt
from .tokens import check_prompt_length, occurrence_at, word_spans, word_token_positions

logger = logging.getLogger(__name__)


@dataclass
class FinetuneConfig:
    """Everything a SepEn finetuning run depends on. Defaults follow the reference code (sepen-facts.md)."""

    # what to learn
    model: str = DEFAULT_MODEL
    pairs: list[tuple[str, str]] | None = None  # single-pair training, e.g. [("cat", "dog")]
    concepts: list[str] | None = None  # multi-concept training: random pairs of these
    template: str = TRAIN_TEMPLATE
    connectors: tuple[str, ...] = ("and",)
    shuffle_order: bool = False  # draw both orders of a pair
    trainable: str = "k"  # "k" (the method), "kv" or "v" (ablations); see sae_utils.delta
    layers: list[str] | None = None  # restrict training to these cross-attention layers
    # the losses
    lambda_sep: float = 1.0
    lambda_en: float = 0.5
    kernel_reading: str = "reference"
    map_resolution: int | None = None  # the side of the maps the losses read; None: the model's (SD v1 16, toy 8)
    # how the maps reach the losses: "head-mean" (every sample, heads averaged) or "released" (the released code's
    # attention store: the second half of the batch as per-head slices, each term a max over them; see
    # maps.released_head_stack: one head only has to attend strongly, and half the batch gets no gradient)
    map_reading: str = "head-mean"
    norm_loss_weight: float = 0.0  # prior preservation; the reference uses 0.5 for multi-concept training
    # "joint": the norm loss is added to the SepEn loss (one update a step); "separate": the released train_large.py,
    # a second AdamW update on norm_loss_weight * MSE after the SepEn one, on "a photo of a {a}" of the batch's own
    # first concepts (Adam normalises each update, so the 0.5 weight then barely matters)
    norm_update: str = "joint"
    prior_template: str = PRIOR_TEMPLATE
    # optimisation
    steps: int = 200
    batch_size: int = 4  # per process
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-6  # per sample of the global batch (scale_lr), as in the reference
    scale_lr: bool = True
    optimizer: str = "adamw"  # "adamw" or "adamw-fused" (one kernel for all tensors; CUDA)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    timestep_range: tuple[int, int] = (0, 1000)
    latent_scale: float | None = None  # std of the random "clean" latents; None: the VAE's scaling factor (reference)
    # where the losses are evaluated: "random" (reference: random clean latents noised to a random timestep) or
    # "trajectory" (a variant: the model's own guided sampling path for the prompt, stopped at a random step)
    latent_source: str = "random"
    image_size: int | None = None  # pixels; None = the model's own (512 for SD v1)
    # machinery
    mixed_precision: str = "auto"  # "no", "fp16", "bf16"; "auto" = bf16 if the GPU has it, else fp16; CPU: "no"
    gradient_checkpointing: bool = False
    early_exit: bool = True  # stop each UNet forward after the last captured layer
    compile: str = "none"  # "cuda-graph": replay the whole step as one CUDA graph (CUDA, bf16/fp32, 1 process)
    seed: int = 0
    device: str = "auto"
    output_dir: str | None = None  # checkpoints, history, validation images, the delta
    checkpoint_every: int = 50
    validate_every: int = 0  # 0: only before and after
    validation_prompts: list[str] | None = None  # default: up to 4 training prompts
    validation_seeds: tuple[int, ...] = (0, 1)
    validation_inference_steps: int | None = None  # None: the model's sampler default
    extra: dict = field(default_factory=dict)  # free-form notes saved with the delta

    def validate(self) -> None:
        """Raise on settings that cannot work, naming the setting and a fix."""
        from .cli import check_field_types
        from .losses import KERNEL_READINGS

        check_field_types(self)  # a config file's "steps": "200" is caught here, not deep in training
        if (self.pairs is None) == (self.concepts is None):
            raise ValueError("Give either `pairs` (e.g. [('cat', 'dog')]) or `concepts` (multi-concept training).")
        positive = {"steps": self.steps, "batch_size": self.batch_size, "learning_rate": self.learning_rate,
                    "gradient_accumulation_steps": self.gradient_accumulation_steps,
                    "checkpoint_every": self.checkpoint_every, "adam_epsilon": self.adam_epsilon}
        for name, value in positive.items():
            if not (math.isfinite(value) and value > 0):  # NaN and inf compare false or pass `> 0`: say so
                raise ValueError(f"{name} must be > 0 and finite, got {value}.")
        for name in ("lambda_sep", "lambda_en", "norm_loss_weight", "adam_weight_decay"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be >= 0 and finite, got {value}.")
        if self.lambda_sep + self.lambda_en == 0:
            raise ValueError(f"lambda_sep={self.lambda_sep}, lambda_en={self.lambda_en}: use weights >= 0, not both 0.")
        # clipping to a norm <= 0 flips the gradient (-1 trains uphill) or zeroes it (0 trains nothing); inf: no clip
        if not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 (inf: no clipping), got {self.max_grad_norm}.")
        if not all(0 <= beta < 1 for beta in self.adam_betas):
            raise ValueError(f"adam_betas={tuple(self.adam_betas)}: each must be in [0, 1), e.g. (0.9, 0.999).")
        if self.latent_scale is not None and not (math.isfinite(self.latent_scale) and self.latent_scale > 0):
            raise ValueError(f"latent_scale must be a finite number > 0 (or None), got {self.latent_scale}.")
        for name in ("image_size", "map_resolution", "validation_inference_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer (or None), got {getattr(self, name)}.")
        if self.seed < 0 or self.validate_every < 0 or any(s < 0 for s in self.validation_seeds):
            raise ValueError(f"seed, validate_every and validation_seeds must be >= 0, got {self.seed}, "
                             f"{self.validate_every}, {list(self.validation_seeds)}.")
        if not self.connectors:
            raise ValueError("Give at least one connector, e.g. ('and',).")
        if self.kernel_reading not in KERNEL_READINGS:
            raise ValueError(f"kernel_reading={self.kernel_reading!r}: use one of {KERNEL_READINGS}.")
        if self.map_reading not in MAP_READINGS:
            raise ValueError(f"map_reading={self.map_reading!r}: use one of {MAP_READINGS}.")
        if self.norm_update not in NORM_UPDATES:
            raise ValueError(f"norm_update={self.norm_update!r}: use one of {NORM_UPDATES}.")
        if self.latent_source not in ("random", "trajectory"):
            raise ValueError(f"latent_source={self.latent_source!r}: use 'random' (the reference) or 'trajectory'.")
        if self.compile not in ("none", "cuda-graph"):
            raise ValueError(f"compile={self.compile!r}: use 'none' or 'cuda-graph'.")
        if self.optimizer not in ("adamw", "adamw-fused"):
            raise ValueError(f"optimizer={self.optimizer!r}: use 'adamw' or 'adamw-fused'.")
        if self.mixed_precision not in ("auto", "no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision={self.mixed_precision!r}: use 'auto', 'no', 'fp16' or 'bf16'.")
        low, high = self.timestep_range
        if not 0 <= low < high <= 1000:
            raise ValueError(f"timestep_range={self.timestep_range}: need 0 <= low < high <= 1000.")
        try:
            json.dumps(self.extra, allow_nan=False)
        except (TypeError, ValueError) as error:
            raise ValueError(f"extra must be JSON-able (it is saved with the delta): {error}.") from error

    def to_json(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))


MAP_READINGS = ("head-mean", "released")
NORM_UPDATES = ("joint", "separate")
RELEASED_SINGLE_TEMPLATE = "a photo of {a} {connector} {b}"  # train_individual.py: no articles

# Memory presets for single GPUs, measured on an H200 capped to the card's memory (benchmarks/results); and the
# released code's readings of the method (see `preset`).
PRESETS = {
    "colab-t4": dict(mixed_precision="fp16", batch_size=4),  # 15 GB, the course's default on Colab
    "low-memory": dict(mixed_precision="fp16", batch_size=2, gradient_accumulation_steps=2,
                       gradient_checkpointing=True),  # 8 GB cards: the same global batch of 4
}


def released_code_settings(multi_concept: bool) -> dict:
    """What the released scripts do (github.com/adobe/SeperateAndEnhance, src/run_individual.sh and run_large.sh):
    fp32, the per-head map reading (bug 1 of our comparison: half the batch, per-head maxima) and, for the
    multi-concept run, the norm loss as a second update (bug 3). Not reproduced: train_large.py's hard-coded token
    positions 6 and 9 (bug 6: mostly "and" and the end token), which would not train on the named words at all."""
    common = dict(map_reading="released", mixed_precision="no", batch_size=4, max_grad_norm=1.0)
    if not multi_concept:  # run_individual.sh: lr 2e-6 x batch, 200 steps, "a photo of {c1} and {c2}"
        return common | dict(template=RELEASED_SINGLE_TEMPLATE, learning_rate=2e-6, steps=200)
    # run_large.sh: lr 5e-7 x batch x 2 (use_norm), 10000 steps, "and"/"with", norm 0.5 as its own update
    return common | dict(template="a photo of a {a} {connector} a {b}", connectors=("and", "with"),
                         learning_rate=1e-6, steps=10000, norm_loss_weight=0.5, norm_update="separate")


def preset(name: str, family: str | None = None, **overrides) -> FinetuneConfig:
    """A FinetuneConfig from a named preset, e.g. preset("colab-t4", pairs=[("cat", "dog")]).

    "t4" (alias "colab-t4") and "24gb": the memory settings of `family` on that card (sae_utils.memory: SDXL on a
    T4 is batch 1 x 4 accumulation with gradient checkpointing); the family is `family`, else the one `model`
    names (e.g. model="sdxl" or "tiny-sdxl"), else SD 1.x. "low-memory": SD 1.x on 8 GB cards.
    "released-code" reproduces the released scripts as closely as a modern diffusers allows: with `pairs`,
    run_individual.sh; with `concepts`, run_large.sh (see `released_code_settings`)."""
    from .families import family_of_name
    from .memory import memory_preset

    if name == "released-code":
        return FinetuneConfig(**{**released_code_settings(overrides.get("concepts") is not None), **overrides})
    card = {"colab-t4": "t4", "t4": "t4", "24gb": "24gb"}.get(name)
    if card is not None:
        family = family or family_of_name(overrides.get("model", DEFAULT_MODEL)) or "sd1"
        return FinetuneConfig(**{**memory_preset(family, card).settings, **overrides})
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}; presets: {list(PRESETS) + ['t4', '24gb', 'released-code']}.")
    return FinetuneConfig(**{**PRESETS[name], **overrides})


class DivergenceError(RuntimeError):
    """A loss term or the gradient norm of a step is NaN or infinite: training stopped before that update."""

    def __init__(self, message: str, step: int, terms: dict[str, float]):
        super().__init__(message)
        self.step, self.terms = step, terms


@dataclass
class FinetuneResult:
    delta: "deltas.Delta"
    history: list[dict]
    output_dir: Path | None


# The settings a resumed run must share with its checkpoint (the rest, e.g. steps, may change).
FIXED_ON_RESUME = ("model", "pairs", "concepts", "template", "connectors", "shuffle_order", "trainable", "layers",
                   "lambda_sep", "lambda_en", "kernel_reading", "map_resolution", "map_reading", "norm_loss_weight",
                   "norm_update",
                   "prior_template", "batch_size", "gradient_accumulation_steps", "learning_rate", "scale_lr",
                   "adam_betas", "adam_weight_decay", "adam_epsilon", "max_grad_norm", "timestep_range", "latent_scale",
                   "latent_source",
                   "image_size", "seed")


class Finetuner:
    """A SepEn finetuning run: set-up, the step, the loop, checkpoints, validation and the delta."""

    def __init__(self, config: FinetuneConfig, pipeline=None, resume: bool = True):
        from accelerate import PartialState

        config.validate()
        self.config = config
        self.output_dir = Path(config.output_dir) if config.output_dir else None
        self.state = PartialState(cpu=config.device == "cpu" or not torch.cuda.is_available())
        device = self.state.device if config.device in ("auto", "cuda") else torch.device(config.device)
        if self.output_dir and self.state.is_main_process:
            check_writable(self.output_dir)  # a folder that cannot take the results fails now, not after the work
        self.precision = _resolve_precision(config.mixed_precision, device, pipeline)
        self.weight_dtype = PRECISION_DTYPES[self.precision]
        self.pipe = pipeline if pipeline is not None else load_pipeline(config.model, device=device,
                                                                         dtype=self.weight_dtype)
        self.pipe.to(device)
        self.device, self.unet = device, self.pipe.unet
        self.sampler = PairSampler(pairs=config.pairs, concepts=config.concepts, template=config.template,
                                   connectors=config.connectors, shuffle_order=config.shuffle_order)
        self._check_words()
        self.noise_scheduler = _training_scheduler(self.pipe)
        factor = self.pipe.vae_scale_factor
        if config.image_size is not None and config.image_size % factor:
            raise ValueError(f"image_size={config.image_size} is not a multiple of the autoencoder's factor {factor}; "
                             f"use e.g. {max(factor, config.image_size // factor * factor)}.")
        self.latent_size = (config.image_size or self.unet.config.sample_size * self.pipe.vae_scale_factor) \
            // self.pipe.vae_scale_factor
        self.map_resolution = config.map_resolution or map_resolution(self.pipe, self.latent_size)

        # Freeze everything; the trainable tensors live in float32 (fp16 master weights cannot be unscaled).
        self.pipe.unet.requires_grad_(False)
        for encoder in (self.pipe.text_encoder, getattr(self.pipe, "text_encoder_2", None)):
            if encoder is not None:
                encoder.requires_grad_(False)
        self.pipe.vae.requires_grad_(False)
        self.trainable_names = deltas.trainable_parameter_names(self.unet, config.trainable, config.layers)
        self.parameters = [self.unet.get_parameter(name) for name in self.trainable_names]
        for p in self.parameters:
            p.data = p.data.float()
            p.requires_grad_(True)
        self.originals = [p.detach().clone() for p in self.parameters]  # for the norm loss and for undo
        if config.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            self.unet.train()  # diffusers checkpoints only in training mode; the UNet has no dropout

        self.global_batch = config.batch_size * self.state.num_processes * config.gradient_accumulation_steps
        self.learning_rate = config.learning_rate * (self.global_batch if config.scale_lr else 1)
        first_step = self.learning_rate / (1 - config.adam_betas[0])  # AdamW's step size at step 1, in float32
        if not torch.isfinite(torch.tensor(first_step, dtype=torch.float32)):
            raise ValueError(f"learning_rate={config.learning_rate} (x{self.global_batch if config.scale_lr else 1} "
                             f"samples) gives AdamW a step size of {first_step:.3g}, beyond float32: use a learning "
                             "rate of the order of 1e-6.")
        self.optimizer = torch.optim.AdamW(self.parameters, lr=self.learning_rate, betas=config.adam_betas,
                                           weight_decay=config.adam_weight_decay, eps=config.adam_epsilon,
                                           fused=config.optimizer == "adamw-fused" or None,
                                           capturable=config.compile == "cuda-graph")
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16")
        self.step, self.seconds, self.history = 0, 0.0, []
        self.saved_step: int | None = None  # the step of the checkpoint on disk (the last good one)
        self._text_cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._positions: dict[PairPrompt, list[list[int]]] = {}
        self._store = None
        self._graph = None
        if config.compile == "cuda-graph":
            self._check_graphable()
        if self.output_dir and self.state.is_main_process:
            # what killed writes left: the checkpoint put back together (or its leftovers removed), temporaries gone
            find_checkpoint(self.output_dir / "checkpoint")
            remove_orphans(self.output_dir, ["history.json", "history.csv", "loss.png", "delta.safetensors"])
        self.state.wait_for_everyone()
        if resume and self.output_dir and (self.output_dir / "checkpoint").exists():
            self._load_checkpoint()

    # -- inputs ----------------------------------------------------------------------------------------------
    def _check_words(self) -> None:
        vocabulary = model_info(self.pipe).get("vocabulary")
        words = self.sampler.words
        if vocabulary:
            unknown = [w for w in words if w not in vocabulary]
            if unknown:
                raise ValueError(f"Unknown concept word(s) {unknown} for this model; it knows: "
                                 f"{', '.join(sorted(vocabulary))}.")
        prompts = self.sampler.all_prompts() if self.sampler.pairs is not None else \
            [self.sampler.sample(self.config.seed, 0, i) for i in range(min(64, len(words) ** 2))]
        for p in prompts + self.validation_samples():  # a validation prompt is checked now, not after set-up
            check_prompt_length(self.pipe.tokenizer, p.prompt)
            check_token_alignment(self.pipe, p.prompt)
            word_token_positions(self.pipe.tokenizer, p.prompt, p.word_specs)

    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """(B, 77, D) from the frozen text encoder(s), cached per prompt (SDXL: both encoders', concatenated)."""
        self._encode_missing(prompts)
        return torch.stack([self._text_cache[p][0] for p in prompts])

    def pooled_embeddings(self, prompts: Sequence[str]) -> torch.Tensor | None:
        """SDXL's pooled text embeddings (B, P) of the prompts, cached; None for the families without."""
        self._encode_missing(prompts)
        pooled = [self._text_cache[p][1] for p in prompts]
        return None if pooled[0] is None else torch.stack(pooled)

    def _encode_missing(self, prompts: Sequence[str]) -> None:
        missing = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if not missing:
            return
        text = conditioning.encode_prompts(self.pipe, missing).to(self.device, self.weight_dtype)
        if len(self._text_cache) + len(missing) > 8192:
            self._text_cache.clear()
        pooled = [None] * len(missing) if text.pooled is None else list(text.pooled)
        self._text_cache.update(zip(missing, zip(text.embeds, pooled)))

    def added_conditions(self, pooled: torch.Tensor | None) -> dict | None:
        """The UNet's `added_cond_kwargs` for a batch (SDXL: pooled text and the training size's time ids)."""
        side = self.latent_size * self.pipe.vae_scale_factor
        return conditioning.added_conditions(self.unet, pooled, side, side)

    def _text_inputs(self, prompts: Sequence[str], prefix: str = "") -> dict:
        """{"text": (B, 77, D)} and for SDXL {"pooled": (B, P)}: what a step's UNet calls read."""
        pooled = self.pooled_embeddings(prompts)
        extra = {} if pooled is None else {f"{prefix}pooled": pooled}
        return {f"{prefix}text": self.text_embeddings(prompts), **extra}

    def random_inputs(self, step: int, start: int, size: int, stream: int = 0):
        """Latents, noise and timesteps of samples start..start+size-1 of the global batch of `step`."""
        shape = (4, self.latent_size, self.latent_size)
        latents, noise, timesteps = [], [], []
        low, high = self.config.timestep_range
        scale = self.config.latent_scale or self.pipe.vae.config.scaling_factor
        for index in range(start, start + size):
            g = torch.Generator().manual_seed(_sample_seed(self.config.seed, step, index, stream))
            latents.append(torch.randn(shape, generator=g) * scale)
            noise.append(torch.randn(shape, generator=g))
            timesteps.append(torch.randint(low, high, (1,), generator=g))
        latents, noise = torch.stack(latents), torch.stack(noise)
        timesteps = torch.cat(timesteps)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        return noisy.to(self.device, self.weight_dtype), timesteps.to(self.device)

    @torch.no_grad()
    def trajectory_inputs(self, samples: Sequence[PairPrompt], step: int, start: int):
        """The model's own sampling path for each prompt (a DDIM sampler with the model's step count and guidance,
        the current weights), stopped at one random step whose timestep lies in timestep_range: (latents,
        timesteps) as there. DDIM whatever the pipeline's scheduler: a deterministic path, cheap to stop anywhere."""
        from diffusers import DDIMScheduler

        from .sampling import sampler_defaults

        settings = sampler_defaults(self.pipe)
        scheduler = DDIMScheduler.from_config(self.pipe.scheduler.config)
        scheduler.set_timesteps(settings["num_inference_steps"])
        low, high = self.config.timestep_range
        candidates = [i for i, t in enumerate(scheduler.timesteps.tolist()) if low <= t < high]
        if not candidates:
            raise ValueError(f"No sampler timestep lies in timestep_range={self.config.timestep_range}.")
        stop = candidates[np.random.default_rng([self.config.seed, step, start, 41]).integers(len(candidates))]
        shape = (4, self.latent_size, self.latent_size)
        latents = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(
            _sample_seed(self.config.seed, step, start + i, 5))) for i in range(len(samples))])
        latents = (latents * scheduler.init_noise_sigma).to(self.device, self.weight_dtype)
        empty = conditioning.unconditional(self.pipe, len(samples)).to(self.device, self.weight_dtype)
        prompts = [s.prompt for s in samples]
        text = empty.cat(conditioning.TextConditions(self.text_embeddings(prompts), self.pooled_embeddings(prompts)))
        added = self.added_conditions(text.pooled)
        for t in scheduler.timesteps[:stop]:
            with self.autocast():
                noise = self.unet(torch.cat([latents] * 2), t, encoder_hidden_states=text.embeds,
                                  added_cond_kwargs=added).sample
            unconditional, conditional = noise.float().chunk(2)
            guided = unconditional + settings["guidance_scale"] * (conditional - unconditional)
            latents = scheduler.step(guided, t, latents.float()).prev_sample.to(self.weight_dtype)
        return latents, scheduler.timesteps[stop].repeat(len(samples)).to(self.device)

    # -- the step --------------------------------------------------------------------------------------------
    def autocast(self):
        if self.precision == "no":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.weight_dtype)

    @contextlib.contextmanager
    def capturing(self):
        """Capture processors on the map layers, kept for forward and backward alike: with gradient
        checkpointing, backward recomputes the layers and must meet the same processors. Re-entrant."""
        if self._store is not None:
            yield self._store
            return
        heads = "all" if self.config.map_reading == "released" else "mean"
        with capture_cross_attention(self.unet, resolution=self.map_resolution, latent_size=self.latent_size,
                                     keep="last", heads=heads, cfg=False) as store:
            self._store = store
            try:
                yield store
            finally:
                self._store = None

    def word_masks(self, samples: Sequence[PairPrompt]) -> torch.Tensor:
        """(B, K, T): 1 at the token positions of each object word (the sum rule for multi-token words).

        Word maps are then one matrix product with the token maps: no Python indexing in the step, so the
        same computation serves every prompt and can be replayed as a CUDA graph.
        """
        T = self.pipe.tokenizer.model_max_length
        masks = torch.zeros(len(samples), len(samples[0].words), T)
        for b, sample in enumerate(samples):
            if sample not in self._positions:
                self._positions[sample] = word_token_positions(self.pipe.tokenizer, sample.prompt, sample.word_specs)
            for k, positions in enumerate(self._positions[sample]):
                masks[b, k, positions] = 1.0
        return masks.to(self.device)

    def sepen_terms(self, samples: Sequence[PairPrompt], noisy: torch.Tensor, timesteps: torch.Tensor):
        """The SepEn loss terms of a batch of prompts on given noisy latents: each (B,)."""
        prompts = [s.prompt for s in samples]
        return self.sepen_terms_from(noisy, timesteps, self.text_embeddings(prompts), self.word_masks(samples),
                                     self.pooled_embeddings(prompts))

    def sepen_terms_from(self, noisy, timesteps, text, masks, pooled=None):
        """noisy (B, 4, h, w), timesteps (B,), text (B, T, D), masks (B, K, T), pooled (B, P) (SDXL only) -> SepEn
        terms, each (B,).

        No host synchronisation. Call backward inside `capturing()` when gradient checkpointing is on.
        """
        c = self.config
        added = self.added_conditions(pooled)
        with self.capturing() as store:
            store.stop_when_complete = c.early_exit
            try:
                with self.autocast():
                    forward_until_captured(self.unet, noisy, timesteps, encoder_hidden_states=text,
                                           added_cond_kwargs=added)
            finally:
                store.stop_when_complete = False
            if c.map_reading == "released":  # per-head slices of the second half of the batch, layers averaged
                probs = torch.stack([store.layer_maps(layer) for layer in store.layers]).mean(0).float()
                maps = torch.einsum("bsthw,bkt->bskhw", released_head_stack(probs), masks)
                return sepen_loss_terms_per_slice(maps, c.lambda_sep, c.lambda_en, c.kernel_reading,
                                                  check_values=False)
            maps = torch.einsum("bthw,bkt->bkhw", store.token_maps().float(), masks)
        return sepen_loss_terms(maps, c.lambda_sep, c.lambda_en, c.kernel_reading, check_values=False)

    def prior_inputs(self, step: int, start: int, size: int, samples: Sequence[PairPrompt] | None = None) -> dict:
        """Single-concept prompts and their own noisy latents, for the norm loss: random concepts, or (given the
        step's samples, as the released code's separate norm update) each sample's first concept."""
        words = self.sampler.words
        rng = np.random.default_rng([self.config.seed, step, start, 29])
        concepts = [s.words[0] for s in samples] if samples is not None else \
            [words[i] for i in rng.integers(len(words), size=size)]
        prompts = [prior_prompt(w, self.config.prior_template).prompt for w in concepts]
        noisy, timesteps = self.random_inputs(step, start, size, stream=1)
        return {"prior_noisy": noisy, "prior_timesteps": timesteps, **self._text_inputs(prompts, prefix="prior_")}

    def norm_loss(self, step: int, start: int, size: int) -> torch.Tensor:
        """Prior preservation on the prompts of `prior_inputs`; see `norm_loss_from`."""
        inputs = self.prior_inputs(step, start, size)
        return self.norm_loss_from(inputs["prior_noisy"], inputs["prior_timesteps"], inputs["prior_text"],
                                   inputs.get("prior_pooled"))

    def norm_loss_from(self, noisy, timesteps, text, pooled=None) -> torch.Tensor:
        """The finetuned UNet's noise prediction should stay what the original weights predict. The target
        comes from the same UNet with the original trainable tensors swapped in: no second UNet in memory."""
        added = self.added_conditions(pooled)
        with torch.no_grad(), self.original_weights(), self.autocast():
            target = self.unet(noisy, timesteps, encoder_hidden_states=text, added_cond_kwargs=added).sample
        with self.autocast():
            prediction = self.unet(noisy, timesteps, encoder_hidden_states=text, added_cond_kwargs=added).sample
        return F.mse_loss(prediction.float(), target.float())

    @contextlib.contextmanager
    def original_weights(self):
        """Temporarily put the pre-training values back into the trainable tensors."""
        current = [p.data for p in self.parameters]
        for p, original in zip(self.parameters, self.originals):
            p.data = original
        try:
            yield
        finally:
            for p, data in zip(self.parameters, current):
                p.data = data

    def step_inputs(self, micro: int = 0) -> dict[str, torch.Tensor]:
        """Everything one micro-batch of this process needs, on the device: the host-side half of a step."""
        c = self.config
        start = self._micro_start(micro)
        samples = self.sampler.batch(c.seed, self.step, start, c.batch_size)
        if c.latent_source == "trajectory":
            noisy, timesteps = self.trajectory_inputs(samples, self.step, start)
        else:
            noisy, timesteps = self.random_inputs(self.step, start, c.batch_size)
        inputs = {"noisy": noisy, "timesteps": timesteps, **self._text_inputs([s.prompt for s in samples]),
                  "masks": self.word_masks(samples)}
        if c.norm_loss_weight > 0 and c.norm_update == "joint":
            inputs |= self.prior_inputs(self.step, start, c.batch_size)
        return inputs

    def _micro_start(self, micro: int) -> int:
        return (micro * self.state.num_processes + self.state.process_index) * self.config.batch_size

    def step_losses(self, inputs: dict) -> dict[str, torch.Tensor]:
        """The losses of one micro-batch (device tensors, no host sync): loss, separate, enhance, norm."""
        c = self.config
        terms = self.sepen_terms_from(inputs["noisy"], inputs["timesteps"], inputs["text"], inputs["masks"],
                                      inputs.get("pooled"))
        norm = self.norm_loss_from(inputs["prior_noisy"], inputs["prior_timesteps"], inputs["prior_text"],
                                   inputs.get("prior_pooled")) \
            if "prior_noisy" in inputs else torch.zeros((), device=self.device)
        return {"loss": terms.total.mean() + c.norm_loss_weight * norm, "separate": terms.separate.mean(),
                "enhance": terms.enhance.mean(), "norm": norm}

    def train_step(self) -> dict:
        """One optimisation step over the global batch; returns the logged values."""
        if self.config.compile == "cuda-graph":
            return self._graphed_train_step()
        c = self.config
        totals = None
        for micro in range(c.gradient_accumulation_steps):
            inputs = self.step_inputs(micro)
            with self.capturing():
                losses = self.step_losses(inputs)
                self.scaler.scale(losses["loss"] / c.gradient_accumulation_steps).backward()
            losses = {k: v.detach() / c.gradient_accumulation_steps for k, v in losses.items()}
            totals = losses if totals is None else {k: totals[k] + losses[k] for k in totals}
        grad_norm = self._update(totals)
        if c.norm_loss_weight > 0 and c.norm_update == "separate":
            totals["norm"] = self._separate_norm_update()
        self.step += 1
        return self._logged(totals, grad_norm)

    def _update(self, losses: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Average the gradients over processes, clip, one optimizer step; returns the gradient norm. A non-finite
        loss term or gradient norm stops training before the step (`DivergenceError`): the weights stay the last
        good ones and nothing of this step is saved."""
        self._average_gradients_across_processes()
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters, self.config.max_grad_norm)
        # fp16: an overflowing gradient is the loss scaler's to handle (it skips the step and lowers the scale)
        self._check_finite({**(losses or {}), **({} if self.precision == "fp16" else {"grad_norm": grad_norm})})
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def _separate_norm_update(self) -> torch.Tensor:
        """The released train_large.py's second update: norm_loss_weight * MSE alone, on "a photo of a {a}" of
        each sample's first concept, with its own clipping and AdamW step. Returns the (unweighted) norm loss."""
        c, total = self.config, torch.zeros((), device=self.device)
        for micro in range(c.gradient_accumulation_steps):
            start = self._micro_start(micro)
            samples = self.sampler.batch(c.seed, self.step, start, c.batch_size)
            inputs = self.prior_inputs(self.step, start, c.batch_size, samples=samples)
            norm = self.norm_loss_from(inputs["prior_noisy"], inputs["prior_timesteps"], inputs["prior_text"],
                                       inputs.get("prior_pooled"))
            self.scaler.scale(c.norm_loss_weight * norm / c.gradient_accumulation_steps).backward()
            total = total + norm.detach() / c.gradient_accumulation_steps
        self._update({"norm": total})
        return total

    def _check_finite(self, values: dict[str, torch.Tensor | float]) -> None:
        """Raise `DivergenceError` naming the step and every non-finite term. One host sync (the step has one
        already, for its log); the values are averaged over processes first, so all processes stop together."""
        host = self._mean_across_processes({k: float(v) for k, v in values.items()})
        bad = {k: v for k, v in host.items() if not math.isfinite(v)}
        if bad:
            self._diverged(self.step + 1, bad)

    def _diverged(self, step: int, bad: dict[str, float], applied: bool = False) -> None:
        where = (f"the last good checkpoint (step {self.saved_step}) is in {self.output_dir / 'checkpoint'}"
                 if self.saved_step is not None else "no checkpoint had been written yet")
        terms = ", ".join(f"{k} = {v}" for k, v in bad.items())
        done = "It was applied in memory (a CUDA graph runs whole) but not saved" if applied else \
            "Nothing of that step was applied or saved"
        raise DivergenceError(
            f"Training diverged at step {step}: {terms}. {done}; {where}. The run is deterministic, so resuming it "
            "with the same settings diverges again: start over (--no-resume or another output_dir) with a lower "
            "learning_rate, or smaller loss weights.", step, bad)

    def _logged(self, losses: dict, grad_norm: torch.Tensor) -> dict:
        values = self._mean_across_processes({k: v.item() for k, v in losses.items()})  # the step's one host sync
        significant = lambda v: float(f"{v:.6g}")  # noqa: E731 - a norm loss of 1e-6 keeps its digits
        return {"step": self.step, **{k: significant(v) for k, v in values.items()},
                "grad_norm": significant(float(grad_norm)), "lr": self.learning_rate}

    # -- the same step as one CUDA graph ---------------------------------------------------------------------
    def _check_graphable(self) -> None:
        c, reasons = self.config, []
        if self.device.type != "cuda":
            reasons.append("a CUDA device")
        if self.precision == "fp16":
            reasons.append("bf16 or fp32 (fp16's loss scaling reads values on the host)")
        if self.state.num_processes > 1 or c.gradient_accumulation_steps > 1:
            reasons.append("one process and no gradient accumulation")
        if c.gradient_checkpointing:
            reasons.append("no gradient checkpointing")
        if c.norm_loss_weight > 0 and c.norm_update == "separate":
            reasons.append("norm_update='joint' (the separate norm update is a second optimizer step)")
        if reasons:
            raise ValueError(f"compile='cuda-graph' needs {', '.join(reasons)}; use compile='none' otherwise.")

    def _graph_body(self, inputs: dict) -> dict:
        with self.capturing():
            losses = self.step_losses(inputs)
            losses["loss"].backward()
        losses = {k: v.detach() for k, v in losses.items()}
        losses["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.parameters, self.config.max_grad_norm, foreach=True)
        self.optimizer.step()
        return losses

    def _capture_graph(self, inputs: dict) -> None:
        """Record forward, losses, backward, clipping and AdamW as one CUDA graph. The warm-up steps that
        graph capture needs are undone (weights and optimizer state restored), so training is unchanged."""
        self._static_inputs = {k: v.clone() for k, v in inputs.items()}
        weights = [p.detach().clone() for p in self.parameters]
        state = {i: {k: v.clone() for k, v in self.optimizer.state[p].items()} for i, p in enumerate(self.parameters)
                 if self.optimizer.state[p]}
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                self.optimizer.zero_grad(set_to_none=True)
                self._graph_body(self._static_inputs)
        torch.cuda.current_stream().wait_stream(stream)
        with torch.no_grad():
            for i, (p, w) in enumerate(zip(self.parameters, weights)):
                p.copy_(w)
                for key, value in self.optimizer.state[p].items():
                    value.copy_(state[i][key]) if i in state else value.zero_()
        self.optimizer.zero_grad(set_to_none=True)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self._static_losses = self._graph_body(self._static_inputs)

    def _graphed_train_step(self) -> dict:
        inputs = self.step_inputs()
        if self._graph is None:
            self._capture_graph(inputs)
        for name, value in inputs.items():
            self._static_inputs[name].copy_(value, non_blocking=True)
        self._graph.replay()
        losses = dict(self._static_losses)
        entry = self._logged({k: v for k, v in losses.items() if k != "grad_norm"}, losses["grad_norm"])
        bad = {k: v for k, v in entry.items() if isinstance(v, float) and not math.isfinite(v)}
        if bad:  # the graph has applied the update already: the weights in memory are lost, the checkpoint is not
            self._diverged(self.step + 1, bad, applied=True)
        self.step += 1
        entry["step"] = self.step
        return entry

    def _average_gradients_across_processes(self) -> None:
        if self.state.num_processes == 1:
            return
        from accelerate.utils import reduce

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.parameters]
        flat = reduce(torch.cat([g.flatten() for g in grads]), reduction="mean")
        offset = 0
        for p in self.parameters:
            p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
            offset += p.numel()

    def _mean_across_processes(self, values: dict) -> dict:
        if self.state.num_processes == 1:
            return values
        from accelerate.utils import reduce

        reduced = reduce(torch.tensor(list(values.values()), device=self.device, dtype=torch.float64), "mean")
        return dict(zip(values, reduced.tolist()))

    # -- the loop --------------------------------------------------------------------------------------------
    def train(self, progress: bool = True) -> FinetuneResult:
        c = self.config
        if self.step == 0 and self.state.is_main_process:
            self.validate()
        bar = tqdm(total=c.steps, initial=self.step, desc="SepEn finetuning",
                   disable=not (progress and self.state.is_main_process))
        with self.capturing():  # installed once for the whole loop, not per step
            self._loop(bar)
        bar.close()
        if self.state.is_main_process and (not self.history or "validation" not in self.history[-1]):
            self.validate()
        self.state.wait_for_everyone()
        result = FinetuneResult(self.delta(), self.history, self.output_dir)
        if self.output_dir and self.state.is_main_process:
            self._save_delta(result.delta)
            self._write_history()
        self.finish()
        return result

    def _save_delta(self, delta: "deltas.Delta") -> None:
        """delta.safetensors, unless it already holds this very delta (a finished run asked again): rewriting it
        would change only its timestamp, hence its sha256, which every generation run made with it records."""
        path = self.output_dir / "delta.safetensors"
        if path.is_file() and deltas.same_delta(delta, path):
            logger.info("%s already holds this run's delta; left as it is.", path)
            return
        deltas.save_delta(delta, path)

    def _loop(self, bar) -> None:
        c = self.config
        while self.step < c.steps:
            start = time.perf_counter()
            entry = self.train_step()
            self.seconds += time.perf_counter() - start
            entry["seconds"] = round(self.seconds, 3)
            self.history.append(entry)
            bar.update(1)
            bar.set_postfix(loss=f"{entry['loss']:.4f}", sep=f"{entry['separate']:.4f}", en=f"{entry['enhance']:.4f}")
            if self.output_dir and (self.step % c.checkpoint_every == 0 or self.step == c.steps):
                self.save_checkpoint()
            if c.validate_every and self.step % c.validate_every == 0 and self.step < c.steps \
                    and self.state.is_main_process:
                self.validate()

    def finish(self) -> None:
        """Leave the pipeline usable for plain sampling: trained tensors back in the pipeline's dtype, frozen."""
        self._graph = None
        for p in self.parameters:
            p.requires_grad_(False)
            p.data = p.data.to(self.weight_dtype)
        if self.config.gradient_checkpointing:
            self.unet.disable_gradient_checkpointing()
        self.unet.eval()

    def restore_base(self) -> None:
        """Put the original (pre-training) values back into the trained tensors of the pipeline, bitwise. After
        `train()` the pipeline holds the trained keys; after this it is the base model again, so that
        `with apply_delta(pipe, result.delta):` applies the delta and undoes it to the base model."""
        with torch.no_grad():
            for p, original in zip(self.parameters, self.originals):
                p.copy_(original.to(p.dtype))

    def delta(self) -> "deltas.Delta":
        """The trained tensors (float32, as trained) and what they were trained on."""
        c = self.config
        metadata = {"base_model": portable_model_name(c.model), "family": family_of(self.pipe),
                    "trainable": c.trainable, "layers": c.layers,
                    "concepts": self.sampler.words, "pairs": c.pairs, "steps": self.step,
                    "map_resolution": self.map_resolution,
                    "config": c.to_json()}
        return deltas.extract_delta(self.unet, self.trainable_names, metadata)

    # -- validation ------------------------------------------------------------------------------------------
    def validation_prompts(self) -> list[str]:
        return [sample.prompt for sample in self.validation_samples()]

    def validation_samples(self) -> list[PairPrompt]:
        """The validation prompts with their object words: the sampler's own prompts (which know where they put
        each word), or the given prompts with the training concepts they name (see `_words_of`)."""
        if self.config.validation_prompts:
            return [self._validation_sample(p) for p in self.config.validation_prompts]
        return [self.sampler.sample(self.config.seed, 0, i) for i in range(4)] if self.sampler.pairs is None \
            else self.sampler.all_prompts()[:4]

    @torch.no_grad()
    def validate(self) -> dict:
        """Images for fixed seeds, and the mean losses on held-out latents (validation stream)."""
        samples = self.validation_samples()
        prompts = [s.prompt for s in samples]
        held_out = heldout_losses(self, samples, seeds=range(4))
        entry = {"step": self.step, "validation": held_out}
        if self.output_dir:
            images = self.sample_images(prompts, self.config.validation_seeds)
            from .viz import image_grid

            figure = image_grid(images, titles=[f"{p} / seed {s}" for p in prompts for s in self.config.validation_seeds],
                                columns=len(self.config.validation_seeds))
            path = self.output_dir / "validation" / f"step-{self.step:05d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            figure.savefig(path, dpi=80)
            import matplotlib.pyplot as plt

            plt.close(figure)
            entry["images"] = str(path)
        self.history.append(entry)
        return entry

    def sample_images(self, prompts: Sequence[str], seeds: Sequence[int]):
        """Generate with the current weights: one image per (prompt, seed), as PIL images."""
        from .sampling import sampler_defaults

        settings = sampler_defaults(self.pipe)
        if self.config.validation_inference_steps:
            settings["num_inference_steps"] = self.config.validation_inference_steps
        images = []
        for prompt in prompts:
            for seed in seeds:
                with self.autocast():
                    images += self.pipe(prompt, generator=torch.Generator().manual_seed(seed),
                                        height=self.latent_size * self.pipe.vae_scale_factor,
                                        width=self.latent_size * self.pipe.vae_scale_factor, **settings).images
        return images

    def _words_of(self, prompt: str) -> list[str]:
        """The two training concepts a validation prompt names, in prompt order."""
        return list(self._validation_sample(prompt).words)

    def _validation_sample(self, prompt: str) -> PairPrompt:
        """The prompt and the two training concepts it names, matched on whole words as the tokens are ('pen' is
        not in 'penguin'); a concept inside a longer one ('bear' in 'teddy bear') is that longer one."""
        mentions = []  # (start, end, concept)
        for concept in self.sampler.words:
            mentions += [(a, b, concept) for a, b in word_spans(prompt, concept)]
        mentions = [m for m in mentions if not any(o[0] <= m[0] and m[1] <= o[1] and o != m for o in mentions)]
        concepts = [c for _, _, c in sorted(mentions)]
        if len(concepts) != 2 or concepts[0] == concepts[1]:
            raise ValueError(f"The validation prompt {prompt!r} must name two different training concepts once each "
                             f"(it names {concepts or 'none'}); the concepts are {self.sampler.words[:8]}"
                             f"{' ...' if len(self.sampler.words) > 8 else ''}.")
        starts = {c: a for a, _, c in sorted(mentions)}
        return PairPrompt(prompt, tuple(concepts), tuple(occurrence_at(prompt, c, starts[c]) for c in concepts))

    # -- checkpoints -----------------------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        if not self.state.is_main_process:
            return
        not_finite = [n for n, p in zip(self.trainable_names, self.parameters) if not torch.isfinite(p).all()]
        if not_finite:  # the step guard stops before this; never overwrite the last good checkpoint with NaN
            self._diverged(self.step, {f"weights of {not_finite[0]}": float("nan")})
        tensors = {f"trainable.{name}": p for name, p in zip(self.trainable_names, self.parameters)}
        opt_tensors, opt_meta = optimizer_to_tensors(self.optimizer)
        state = {"step": self.step, "seconds": self.seconds, "config": self.config.to_json(),
                 "optimizer": opt_meta, "scaler": self.scaler.state_dict(), "history": self.history,
                 "trainable_names": self.trainable_names}
        save_checkpoint(self.output_dir / "checkpoint", tensors | opt_tensors, state)
        self.saved_step = self.step
        self._write_history()

    def _load_checkpoint(self) -> None:
        folder = self.output_dir / "checkpoint"
        tensors, state = load_checkpoint(folder)
        self._check_checkpoint(folder, tensors, state)
        saved, current = state["config"], self.config.to_json()
        changed = {k: (saved.get(k), current[k]) for k in FIXED_ON_RESUME if saved.get(k) != current[k]}
        if changed:
            raise ValueError(f"The checkpoint in {self.output_dir} was made with other settings {changed} (saved, "
                             "asked). Resume with the same settings, or use another output_dir.")
        if state["step"] > self.config.steps:
            raise ValueError(f"The checkpoint in {folder} is at step {state['step']}, past steps={self.config.steps}: "
                             "a run cannot go back. Ask for steps >= that, or start over (--no-resume, resume=False) "
                             "or in another output_dir.")
        try:
            optimizer_from_tensors(self.optimizer, tensors, state["optimizer"])
            self.scaler.load_state_dict(state["scaler"])
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            raise CheckpointError(f"The checkpoint at {folder} holds an optimizer state this run cannot load "
                                  f"({error}). Delete it to start over (--no-resume does the same).") from error
        with torch.no_grad():
            for name, p in zip(self.trainable_names, self.parameters):
                p.copy_(tensors[f"trainable.{name}"])
        self.step, self.seconds, self.history = state["step"], state["seconds"], state["history"]
        self.saved_step = self.step

    def _check_checkpoint(self, folder: Path, tensors: dict, state: dict) -> None:
        """Everything a resume relies on, checked before anything is loaded: a checkpoint of another version, an
        edited one or one saved from a broken run is refused with what is wrong, never resumed from."""
        problems = []
        step, seconds = state.get("step"), state.get("seconds")
        if not (type(step) is int and step >= 1):
            problems.append(f"its step is {step!r}, not a positive integer")
        if not (type(seconds) in (int, float) and math.isfinite(seconds) and seconds >= 0):
            problems.append(f"its seconds are {seconds!r}")
        for key, kind in (("config", dict), ("optimizer", dict), ("scaler", dict), ("history", list)):
            if not isinstance(state.get(key), kind):
                problems.append(f"its {key!r} is missing or not a {kind.__name__}")
        if state.get("trainable_names") != self.trainable_names:
            problems.append("it holds other trainable tensors than this run's")
        expected = {f"trainable.{name}": p.shape for name, p in zip(self.trainable_names, self.parameters)}
        # AdamW keeps state for the tensors that had a gradient (early exit leaves the deeper layers without): all
        # of a tensor's state or none, and some tensor's
        with_state = [i for i in range(len(self.parameters)) if any(f"optimizer.{i}.{k}" in tensors
                                                                    for k in ("step", "exp_avg", "exp_avg_sq"))]
        if not with_state:
            problems.append("it holds no optimizer state")
        for i in with_state:
            p = self.parameters[i]
            expected |= {f"optimizer.{i}.exp_avg": p.shape, f"optimizer.{i}.exp_avg_sq": p.shape,
                         f"optimizer.{i}.step": torch.Size([])}
        for name, shape in expected.items():
            value = tensors.get(name)
            if value is None or value.shape != shape or not value.is_floating_point():
                problems.append(f"{name} is missing, or not a float tensor of shape {tuple(shape)}")
            elif not torch.isfinite(value).all():
                problems.append(f"{name} holds NaN or infinite values")
            if len(problems) >= 3:
                break
        if problems:
            raise CheckpointError(f"The checkpoint at {folder} cannot be resumed from: {'; '.join(problems)}. Delete "
                                  "it to start over (--no-resume does the same), or restore it from a copy.")

    def _write_history(self) -> None:
        """history.json (everything), history.csv (the training steps) and loss.png, each written atomically."""
        rows = [h for h in self.history if "loss" in h]
        atomic_write(self.output_dir / "history.json", json.dumps(self.history, indent=1))
        table = io.StringIO()
        writer = csv.DictWriter(table, fieldnames=list(rows[0]) if rows else ["step"])
        writer.writeheader()
        writer.writerows(rows)
        atomic_write(self.output_dir / "history.csv", table.getvalue())
        if rows:
            from .viz import loss_curve

            figure = loss_curve(rows, keys=[k for k in ("loss", "separate", "enhance", "norm") if rows[0].get(k)])
            image = io.BytesIO()
            figure.savefig(image, format="png", dpi=90)
            atomic_write(self.output_dir / "loss.png", image.getvalue())


@torch.no_grad()
def heldout_losses(finetuner: Finetuner, samples: Sequence[PairPrompt], seeds: Sequence[int]) -> dict:
    """Mean SepEn terms on fixed latents that training never draws (a separate random stream)."""
    totals = {"loss": [], "separate": [], "enhance": []}
    for seed in seeds:
        noisy, timesteps = finetuner.random_inputs(step=seed, start=0, size=len(samples), stream=7)
        terms = finetuner.sepen_terms(samples, noisy, timesteps)
        totals["loss"].append(terms.total)
        totals["separate"].append(terms.separate)
        totals["enhance"].append(terms.enhance)
    return {k: round(torch.cat(v).mean().item(), 6) for k, v in totals.items()}


PRECISION_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _resolve_precision(mixed_precision: str, device: torch.device, pipeline=None) -> str:
    """The precision to train in. With a given pipeline, "auto" follows its dtype, and a precision that
    disagrees with it is refused (the frozen weights stay in the pipeline's dtype; mixing breaks sampling)."""
    if pipeline is not None:
        dtype = pipeline.unet.dtype
        follows = {dtype: name for name, dtype in PRECISION_DTYPES.items()}[dtype]
        if mixed_precision == "auto":
            mixed_precision = follows
        elif PRECISION_DTYPES[mixed_precision] != dtype:
            raise ValueError(
                f"The pipeline is in {dtype} but mixed_precision={mixed_precision!r} trains in "
                f"{PRECISION_DTYPES[mixed_precision]}: load the pipeline with dtype={PRECISION_DTYPES[mixed_precision]}, "
                f"or pass mixed_precision={follows!r} (or 'auto').")
    elif mixed_precision == "auto":
        if device.type != "cuda":
            return "no"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if mixed_precision == "fp16" and device.type == "cpu":
        raise ValueError("fp16 training on the CPU is not supported; use a bfloat16 or float32 pipeline.")
    return mixed_precision


def _training_scheduler(pipe):
    """The noise schedule the model was trained with, as a DDPM scheduler (for `add_noise`)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(pipe.scheduler.config)


def _sample_seed(seed: int, step: int, index: int, stream: int) -> int:
    return int(np.random.default_rng([seed, step, index, stream, 3]).integers(2**62))
