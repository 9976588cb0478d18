"""The model families the course runs on: Stable Diffusion 1.x, 2.x and XL, and a random-weight twin of each.

    family_of(pipe)                 # "sd1", "sd2" or "sdxl": what a method's settings and a delta depend on
    FAMILIES["sdxl"].default_id     # "stabilityai/stable-diffusion-xl-base-1.0"
    tiny_twin("sdxl")               # SDXL's layout (block types, 70 transformer blocks, two text encoders and
                                    # tokenizers, added time ids) at a tiny width, random weights, built offline

What differs between the families, as their checkpoints' config files say (unet/config.json, tokenizer*/
special_tokens_map.json, text_encoder*/config.json, scheduler/scheduler_config.json):

| | SD 1.x | SD 2.x | SDXL base 1.0 |
|---|---|---|---|
| pipeline | StableDiffusionPipeline | StableDiffusionPipeline | StableDiffusionXLPipeline |
| text encoder | CLIP ViT-L/14, 768 | OpenCLIP ViT-H/14, 1024 | CLIP ViT-L (768) + OpenCLIP bigG (1280), penultimate layers concatenated: 2048; pooled bigG output as `text_embeds` |
| padding token | the end token (49407) | "!" (id 0) | tokenizer: the end token; tokenizer_2: "!" (id 0) |
| native size | 512 px, 64x64 latents | 768 px (2.0, 2.1: v-prediction) or 512 px (-base: epsilon) | 1024 px, 128x128 latents, added time ids (size, crop) |
| cross-attention | 64, 32, 16, 8 (1 block each) | the same levels (96 latents: 96, 48, 24, 12), linear projections | 64x64 (2 blocks a layer) and 32x32 (10 blocks a layer): 70 transformer blocks |
| map level (`attention.map_resolution`) | 16x16 | 24x24 at 768 px (16x16 at 512) | 32x32 |

The same BPE vocabulary (CLIP's 49,408 tokens) serves all of them, so a prompt's tokens, and a word's positions,
are the same in every family and in both SDXL tokenizers; only what follows the end token differs.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

FAMILY_NAMES = ("sd1", "sd2", "sdxl")


@dataclass(frozen=True)
class Family:
    """What the toolkit needs to know about a family of checkpoints."""
    name: str
    title: str
    pipeline_class: str  # diffusers' class name, as in model_index.json
    default_id: str  # the official repository a bare family name loads
    official_ids: tuple[str, ...]
    tiny: str  # the name of its random-weight twin for `load_pipeline`
    native: str  # its native image size and prediction type, in words
    map_side: int  # where its object-level maps live: their side at the default checkpoint's native size


FAMILIES = {
    "sd1": Family("sd1", "Stable Diffusion 1.x", "StableDiffusionPipeline", "CompVis/stable-diffusion-v1-4",
                  ("CompVis/stable-diffusion-v1-4", "CompVis/stable-diffusion-v1-1", "CompVis/stable-diffusion-v1-2",
                   "CompVis/stable-diffusion-v1-3", "stable-diffusion-v1-5/stable-diffusion-v1-5",
                   "runwayml/stable-diffusion-v1-5"), "tiny", "512 px, epsilon", 16),
    "sd2": Family("sd2", "Stable Diffusion 2.x", "StableDiffusionPipeline", "stabilityai/stable-diffusion-2-1",
                  ("stabilityai/stable-diffusion-2-1", "stabilityai/stable-diffusion-2",
                   "stabilityai/stable-diffusion-2-1-base", "stabilityai/stable-diffusion-2-base"), "tiny-sd2",
                  "768 px, v-prediction (2.0, 2.1); 512 px, epsilon (the -base models)", 24),
    "sdxl": Family("sdxl", "Stable Diffusion XL", "StableDiffusionXLPipeline",
                   "stabilityai/stable-diffusion-xl-base-1.0", ("stabilityai/stable-diffusion-xl-base-1.0",),
                   "tiny-sdxl", "1024 px, epsilon", 32),
}
# Names `load_pipeline` understands besides ids and folders: a family's name loads its official checkpoint.
ALIASES = {"sd1": FAMILIES["sd1"].default_id, "sd2": FAMILIES["sd2"].default_id,
           "sd2-base": "stabilityai/stable-diffusion-2-1-base", "sdxl": FAMILIES["sdxl"].default_id}
TINY_MODELS = {"tiny": "sd1", "tiny-sd1": "sd1", "tiny-sd2": "sd2", "tiny-sdxl": "sdxl"}


class WrongFamilyError(ValueError):
    """Something made for one model family (a delta, a setting) was given a model of another."""


def family_of(model) -> str:
    """"sd1", "sd2" or "sdxl" for a pipeline (or a bare UNet: then "sdxl" or "sd1"/"sd2" by its text width).

    SDXL: a second text encoder / a UNet conditioned on added time ids. SD 2.x: OpenCLIP-H's 1024-wide tokens, or
    a tokenizer that pads with "!" (OpenCLIP's), not with the end token as SD 1.x's CLIP tokenizer does (either
    tells; `tiny-sd2` is told by its tokenizer); the toy and `tiny` models are SD 1.x.
    """
    unet = getattr(model, "unet", model)
    if getattr(model, "text_encoder_2", None) is not None or unet.config.get("addition_embed_type") == "text_time":
        return "sdxl"
    if unet.config.cross_attention_dim == 1024:
        return "sd2"
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:  # a bare UNet of narrower tokens: SD 1.x's layout
        return "sd1"
    return "sd1" if tokenizer.pad_token_id == tokenizer.eos_token_id else "sd2"


def family_of_name(model: str) -> str | None:
    """The family a model name stands for without loading it: a family name, a twin, an official id, or a local
    folder whose model_index.json says; None when the name alone does not tell."""
    name = str(model)
    if name in FAMILIES:
        return name
    if name in TINY_MODELS:
        return TINY_MODELS[name]
    if name in ALIASES:
        return family_of_name(ALIASES[name])
    for family in FAMILIES.values():
        if name in family.official_ids:
            return family.name
    index = Path(name).expanduser() / "model_index.json"
    if index.is_file():
        return "sdxl" if json.loads(index.read_text()).get("_class_name") == "StableDiffusionXLPipeline" else None
    return None


def tokenizers(pipe) -> list:
    """The pipeline's tokenizers, in the order of its text encoders (SDXL: two)."""
    return [t for t in (pipe.tokenizer, getattr(pipe, "tokenizer_2", None)) if t is not None]


def check_family(expected: str, pipe, what: str = "This delta") -> None:
    """Raise `WrongFamilyError` naming both families when `pipe` is not of the `expected` one."""
    actual = family_of(pipe)
    if actual != expected:
        raise WrongFamilyError(
            f"{what} was made for {FAMILIES[expected].title} ({expected!r}) but the pipeline is "
            f"{FAMILIES[actual].title} ({actual!r}). Load a {expected} model (e.g. "
            f"{FAMILIES[expected].default_id!r}, or {FAMILIES[expected].tiny!r} offline), or train one for {actual}.")


# ----------------------------------------------------------------------------------------------------------
# The twins: each family's layout at a tiny width, random weights, offline
# ----------------------------------------------------------------------------------------------------------
def tiny_twin(family: str, seed: int = 0):
    """The random-weight twin of a family (`tiny` for SD 1.x; see `tiny_sd2_pipeline`, `tiny_sdxl_pipeline`)."""
    from .models import tiny_pipeline

    builders = {"sd1": tiny_pipeline, "sd2": tiny_sd2_pipeline, "sdxl": tiny_sdxl_pipeline}
    if family not in builders:
        raise ValueError(f"Unknown family {family!r}; the families are {list(FAMILY_NAMES)}.")
    return builders[family](seed=seed)


def _text_config(hidden: int, act: str, pad: int, **extra):
    from transformers import CLIPTextConfig

    from .models import CLIP_VOCAB_SIZE, MAX_TOKENS

    return CLIPTextConfig(vocab_size=CLIP_VOCAB_SIZE, hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=MAX_TOKENS,
                          hidden_act=act, bos_token_id=49406, eos_token_id=49407, pad_token_id=pad, **extra)


def _tiny_vae(scaling_factor: float):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                         layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, sample_size=64,
                         scaling_factor=scaling_factor, force_upcast=False)


def tiny_sd2_pipeline(seed: int = 0):
    """Stable Diffusion 2.1's layout with random weights: SD's four UNet levels with per-level head counts and
    linear projections, an OpenCLIP-style text encoder (gelu) whose tokenizer pads with "!" (id 0), a DDIM sampler
    with v-prediction, and a 24x24 latent, SD 2.1's 96x96 at a quarter: its maps are read at 6x6, where SD 2.1's
    are 24x24 (latents / 4). Deterministic in `seed`; the caller's random state is left alone."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from .models import SD_V1_SCHEDULER_CONFIG, SD_V1_UNET_CONFIG, clip_tokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**{
            **SD_V1_UNET_CONFIG, "sample_size": 24, "layers_per_block": 1, "block_out_channels": (32, 32, 64, 64),
            "cross_attention_dim": 32, "attention_head_dim": (2, 2, 4, 4), "use_linear_projection": True,
            "norm_num_groups": 8})
        vae = _tiny_vae(0.18215)
        text_encoder = CLIPTextModel(_text_config(32, "gelu", pad=0, projection_dim=32))
    scheduler = DDIMScheduler(**{k: v for k, v in SD_V1_SCHEDULER_CONFIG.items() if k != "skip_prk_steps"},
                              clip_sample=False, prediction_type="v_prediction")
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer("!"), unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


# SDXL base 1.0's UNet (stabilityai/stable-diffusion-xl-base-1.0, unet/config.json): the fields that shape it.
SDXL_UNET_CONFIG = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32, act_fn="silu", flip_sin_to_cos=True,
    freq_shift=0, downsample_padding=1,
)
# SD 2.1's UNet (stabilityai/stable-diffusion-2-1, unet/config.json): SD v1's with OpenCLIP-H's 1024-wide tokens,
# per-level head counts, linear projections and 96x96 latents (768 px).
SD2_UNET_CONFIG = dict(
    sample_size=96, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True, norm_num_groups=32,
    act_fn="silu", flip_sin_to_cos=True, freq_shift=0, downsample_padding=1,
)
# Its sampler (scheduler/scheduler_config.json): Euler, scaled-linear betas, "leading" spacing.
SDXL_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                             beta_schedule="scaled_linear", prediction_type="epsilon", steps_offset=1,
                             timestep_spacing="leading", interpolation_type="linear", use_karras_sigmas=False)


def tiny_sdxl_pipeline(seed: int = 0):
    """SDXL base's layout with random weights: its block types (no attention at the top level), 2 and 10
    transformer blocks per attention layer (70 cross-attention layers, as SDXL), two text encoders (a CLIP one and
    a projected OpenCLIP-style one whose pooled output conditions the UNet) with their two tokenizers (the second
    pads with "!"), added time ids, an Euler sampler, and a 32x32 latent (SDXL's 128 at a quarter): cross-attention
    at 16x16 and 8x8, maps read at 8x8 where SDXL's are 32x32. Deterministic in `seed`."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from .models import clip_tokenizer

    width, projection, time_dim = 32, 32, 8
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**{
            **SDXL_UNET_CONFIG, "sample_size": 32, "block_out_channels": (32, 32, 64), "attention_head_dim": (2, 2, 4),
            "cross_attention_dim": 2 * width, "addition_time_embed_dim": time_dim,
            "projection_class_embeddings_input_dim": 6 * time_dim + projection, "norm_num_groups": 8})
        vae = _tiny_vae(0.13025)
        text_encoder = CLIPTextModel(_text_config(width, "quick_gelu", pad=49407, projection_dim=width))
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(width, "gelu", pad=0, projection_dim=projection))
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer("!"), unet=unet, scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG),
        add_watermarker=False)


def check_token_alignment(pipe, prompt: str) -> None:
    """SDXL reads position i of both tokenizers' sequences as one token (their encoders' features side by side): the
    two must split the prompt alike. They do for SDXL's own tokenizers (one BPE; only the padding differs: the end
    token for `tokenizer`, "!" for `tokenizer_2`, which therefore also reads a "!" of the prompt as its padding id 0
    where `tokenizer` reads "!</w>", 256: the same position either way); a replaced tokenizer that does not is
    refused here."""
    sequences = [t(prompt, truncation=True).input_ids for t in tokenizers(pipe)]
    pads = [t.pad_token_id if t.pad_token_id != t.eos_token_id else None for t in tokenizers(pipe)]

    def same(a: list[int], b: list[int], pad_b: int | None) -> bool:  # "!" in a prompt is tokenizer_2's pad id, 0
        return len(a) == len(b) and all(x == y or y == pad_b for x, y in zip(a, b))

    if any(not same(sequences[0], ids, pad) for ids, pad in zip(sequences[1:], pads[1:])):
        raise ValueError(
            f"The pipeline's tokenizers split {prompt!r} differently ({sequences[0][:8]}... vs {sequences[1][:8]}...): "
            "a word's token positions would name different tokens in the two text encoders' features. Use the "
            "checkpoint's own tokenizers.")


# ----------------------------------------------------------------------------------------------------------
# Where the maps live
# ----------------------------------------------------------------------------------------------------------
def real_unet_layout(family: str):
    """The family's real UNet (SD v1.4, SD 2.1, SDXL base) on the meta device: its layout without its 3-10 GB of
    weights (no memory, built in a second), for `attention_layout`."""
    from diffusers import UNet2DConditionModel

    from .models import SD_V1_UNET_CONFIG

    configs = {"sd1": SD_V1_UNET_CONFIG, "sd2": SD2_UNET_CONFIG, "sdxl": SDXL_UNET_CONFIG}
    with torch.device("meta"):
        return UNet2DConditionModel(**configs[family])


def attention_layout(model, latent_size: int | None = None) -> list[dict]:
    """One row per cross-attention resolution of a UNet (or a pipeline's), at its native size unless `latent_size`:
    the map side, how many cross-attention layers run there, in which blocks, transformer blocks per attention
    module, the image pixels one map pixel covers, and whether it is the map level (`attention.map_resolution`)."""
    from .attention import cross_attention_layers, map_resolution

    unet = getattr(model, "unet", model)
    latent_size = latent_size or unet.config.sample_size
    level = map_resolution(model, latent_size)
    pixels = getattr(model, "vae_scale_factor", 8)  # image pixels per latent pixel (a bare UNet: SD's 8)
    rows: dict[int, dict] = {}
    for name, factor in cross_attention_layers(unet).items():
        side = latent_size // factor
        row = rows.setdefault(side, {"maps": f"{side}x{side}", "layers": 0, "blocks": [], "per module": 0,
                                     "image px per map px": pixels * factor, "map level": side == level})
        row["layers"] += 1
        block = name.split(".attentions")[0]
        if block not in row["blocks"]:
            row["blocks"].append(block)
        if ".transformer_blocks." in name:
            row["per module"] = max(row["per module"], int(name.split(".transformer_blocks.")[1].split(".")[0]) + 1)
    for row in rows.values():
        row["blocks"] = ", ".join(row["blocks"])
    return [rows[side] for side in sorted(rows, reverse=True)]


# ----------------------------------------------------------------------------------------------------------
# The real architectures with random weights: speed and memory without the checkpoints
# ----------------------------------------------------------------------------------------------------------
def full_size_pipeline(family: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                       seed: int = 0):
    """The family's full architecture (SD 1.x's via `models.sd_v1_pipeline`; SD 2.1's; SDXL base's: its UNet, both
    text encoders, its autoencoder) with random weights, built directly on `device` (`"meta"`: shapes only, no
    memory): for measuring memory and speed where the checkpoints cannot be downloaded. Its images are noise; its
    shapes, speed and memory are the family's."""
    from diffusers import (AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from .models import SD_V1_SCHEDULER_CONFIG, clip_tokenizer, sd_v1_pipeline

    if family == "sd1":
        return sd_v1_pipeline(device, dtype, seed)
    if family not in FAMILIES:
        raise ValueError(f"Unknown family {family!r}; the families are {list(FAMILY_NAMES)}.")
    device = torch.device(device)
    side = 768 if family == "sd2" else 1024

    def text(hidden: int, layers: int, heads: int, act: str, projection: int, pad: int, with_projection=False):
        config = _text_config(hidden, act, pad, projection_dim=projection)
        config.intermediate_size, config.num_hidden_layers, config.num_attention_heads = 4 * hidden, layers, heads
        return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)

    with torch.random.fork_rng(devices=[]), device:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**(SD2_UNET_CONFIG if family == "sd2" else SDXL_UNET_CONFIG))
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                            layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, sample_size=side,
                            scaling_factor=0.18215 if family == "sd2" else 0.13025,
                            force_upcast=family == "sdxl")
        if family == "sd2":  # OpenCLIP ViT-H/14's text tower: 23 layers as SD 2 uses it (the penultimate of 24)
            encoders = [text(1024, 23, 16, "gelu", 512, pad=0)]
        else:  # CLIP ViT-L/14 and OpenCLIP ViT-bigG/14's text towers
            encoders = [text(768, 12, 12, "quick_gelu", 768, pad=49407),
                        text(1280, 32, 20, "gelu", 1280, pad=0, with_projection=True)]
    if family == "sd2":
        scheduler = DDIMScheduler(**{k: v for k, v in SD_V1_SCHEDULER_CONFIG.items() if k != "skip_prk_steps"},
                                  clip_sample=False, prediction_type="v_prediction")
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=encoders[0], tokenizer=clip_tokenizer("!"), unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    else:
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=encoders[0], text_encoder_2=encoders[1],
                                         tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer("!"), unet=unet,
                                         scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG),
                                         add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)
