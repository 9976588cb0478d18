"""The toy model: a real `StableDiffusionPipeline`, small enough to train and run on a laptop CPU.

- autoencoder: 32x32 RGB <-> 16x16x4 latents (`AutoencoderKL`, 2 levels);
- UNet: `UNet2DConditionModel` with SD v1's block types over 3 levels, cross-attention at 16x16 and 8x8
  (and the 4x4 mid block), so the same default capture (16x16 maps) serves SD and the toy;
- text encoder: a `CLIPTextModel` of width 64 over the full CLIP vocabulary, read by the real CLIP tokenizer.
  By default it has no transformer layers (token + position embeddings, layer norm): each token's vector
  depends only on the token and its place, so what the UNet learns about a shape must come through that
  shape's token. That makes the toy a clean instance of SepEn's premise (an object appears where its token
  is attended to). Real CLIP also spreads meaning into later tokens; `text_layers` > 0 models that;
- scheduler: cosine noise schedule for training, DDIM (25 steps, SD's "leading" spacing) for sampling.
"""
from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from ..models import CLIP_VOCAB_SIZE, MAX_TOKENS, clip_tokenizer

IMAGE_SIZE = 32
LATENT_SIZE = 16
TEXT_WIDTH = 64
NOISE_SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon")
# Where the toy's object-level maps live: its second-deepest cross-attention level (levels 16, 8 and the 4x4 mid
# block), the counterpart of SD v1's 16x16 at 512 px. There a shape covers a few map pixels; the 16x16 maps are
# the counterpart of SD's 64x64 ones. Measured on toy v1: the weaker 8x8 peak predicts a missing shape (AUC 0.68),
# the 16x16 one does not (0.53). Shipped in toy_model.json as "map_resolution".
MAP_RESOLUTION = 8
# Sampler defaults shipped with the model (the pipeline's own defaults are SD's 50 steps / 7.5).
SAMPLING_DEFAULTS = dict(num_inference_steps=25, guidance_scale=5.0)


def build_autoencoder() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=16, sample_size=IMAGE_SIZE)


def build_unet(channels: tuple[int, ...] = (64, 128, 128), layers_per_block: int = 2, heads: int = 4,
               ) -> UNet2DConditionModel:
    levels = len(channels)
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=4, out_channels=4, block_out_channels=channels,
        layers_per_block=layers_per_block, cross_attention_dim=TEXT_WIDTH, attention_head_dim=heads,
        down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
        norm_num_groups=16)


def build_text_encoder(layers: int = 0) -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE, hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH,
        num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=MAX_TOKENS,
        projection_dim=TEXT_WIDTH, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))


def training_scheduler() -> DDPMScheduler:
    return DDPMScheduler(**NOISE_SCHEDULE)


def sampling_scheduler() -> DDIMScheduler:
    """DDIM with SD's "leading" spacing: the first step is t=961 (alpha_bar 0.0035, SD's terminal level).

    Not "trailing": the cosine schedule's alpha_bar at t=999 is 2.4e-9, and an epsilon-predicting model's
    first DDIM step from there multiplies its error by sqrt(alpha_bar_959 / alpha_bar_999), about 1300:
    the samples come out as coloured noise though the model draws clean shapes from t=961.
    """
    return DDIMScheduler(**NOISE_SCHEDULE, timestep_spacing="leading", steps_offset=1, set_alpha_to_one=True,
                         clip_sample=False)


def assemble_pipeline(vae, unet, text_encoder) -> StableDiffusionPipeline:
    """The three trained parts, the CLIP tokenizer and the DDIM sampler as one standard pipeline."""
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), unet=unet, scheduler=sampling_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
