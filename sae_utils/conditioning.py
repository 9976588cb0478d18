"""What a UNet is conditioned on, per model family: the prompt's token embeddings, and for SDXL two more inputs.

    conditions = unet_conditions(pipe, ["a cat and a dog"])    # keyword arguments for pipe.unet(...)
    noise = pipe.unet(latents, t, **conditions).sample

SD 1.x and 2.x: `encoder_hidden_states`, the text encoder's last hidden states (B, 77, D). SDXL (as diffusers'
`StableDiffusionXLPipeline.encode_prompt`): the penultimate hidden states of both text encoders, each reading the
prompt through its own tokenizer, concatenated along the features (B, 77, 768 + 1280); and `added_cond_kwargs`:
`text_embeds`, the pooled, projected output of the second encoder (B, 1280), and `time_ids`, the image's original
size, crop corner and target size (B, 6), here (H, W, 0, 0, H, W). Position i of the 77 is token i of both
tokenizers (they split a prompt alike and differ only in padding), so a word's token positions index the
cross-attention maps of every family alike.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass
class TextConditions:
    """A batch of encoded prompts. embeds: (B, 77, D). pooled: (B, P) for SDXL, else None."""
    embeds: torch.Tensor
    pooled: torch.Tensor | None = None

    def to(self, device=None, dtype=None) -> "TextConditions":
        move = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
        return TextConditions(move(self.embeds), move(self.pooled))

    def cat(self, other: "TextConditions") -> "TextConditions":
        """[self, other] along the batch (classifier-free guidance: [unconditional, conditional])."""
        pooled = None if self.pooled is None else torch.cat([self.pooled, other.pooled])
        return TextConditions(torch.cat([self.embeds, other.embeds]), pooled)

    def __len__(self) -> int:
        return len(self.embeds)


def needs_added_conditions(model) -> bool:
    """True for a UNet (or a pipeline's) conditioned on pooled text and time ids: SDXL's."""
    unet = getattr(model, "unet", model)
    return unet.config.get("addition_embed_type") == "text_time"


@torch.no_grad()
def encode_prompts(pipe, prompts: Sequence[str]) -> TextConditions:
    """The frozen text encoder(s) on a batch of prompts, padded to 77 tokens, as the family's pipeline encodes them."""
    prompts = list(prompts)
    if getattr(pipe, "text_encoder_2", None) is None:
        ids = _ids(pipe.tokenizer, prompts).to(pipe.text_encoder.device)
        return TextConditions(pipe.text_encoder(ids)[0])
    hidden, pooled = [], None
    for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        if encoder is None:  # an SDXL refiner has the second encoder only
            continue
        output = encoder(_ids(tokenizer, prompts).to(encoder.device), output_hidden_states=True)
        hidden.append(output.hidden_states[-2])  # SDXL reads the penultimate layer of both
        if encoder is pipe.text_encoder_2:
            pooled = output.text_embeds  # the projected pooled output (at the end token)
    return TextConditions(torch.cat(hidden, dim=-1), pooled)


@torch.no_grad()
def unconditional(pipe, batch: int) -> TextConditions:
    """The unconditional branch of classifier-free guidance, as the pipeline makes it without a negative prompt:
    the empty prompt, or for SDXL (`force_zeros_for_empty_prompt`, its default) zeros."""
    empty = encode_prompts(pipe, [""])
    if getattr(pipe, "text_encoder_2", None) is not None and pipe.config.get("force_zeros_for_empty_prompt", True):
        empty = TextConditions(torch.zeros_like(empty.embeds), torch.zeros_like(empty.pooled))
    pooled = None if empty.pooled is None else empty.pooled.expand(batch, -1)
    return TextConditions(empty.embeds.expand(batch, -1, -1), pooled)


def time_ids(height: int, width: int, batch: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """SDXL's size conditioning for an uncropped image generated at its own size: (B, 6) = (H, W, 0, 0, H, W)."""
    return torch.tensor([[height, width, 0, 0, height, width]], device=device, dtype=dtype).expand(batch, -1)


def added_conditions(model, pooled: torch.Tensor | None, height: int, width: int) -> dict | None:
    """`added_cond_kwargs` for the UNet: None for SD 1.x/2.x; for SDXL {"text_embeds": pooled, "time_ids": (B, 6)}.

    height, width: the image's pixels (the latent's side times the autoencoder's factor)."""
    if not needs_added_conditions(model):
        return None
    if pooled is None:
        raise ValueError("This UNet (SDXL's) also reads the pooled text embedding (`text_embeds`): encode the prompts "
                         "with sae_utils.conditioning.encode_prompts(pipe, prompts), which returns it.")
    unet = getattr(model, "unet", model)
    expected = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    if pooled.shape[-1] != expected:
        raise ValueError(f"The pooled text embedding has {pooled.shape[-1]} features, this UNet reads {expected}.")
    return {"text_embeds": pooled, "time_ids": time_ids(height, width, len(pooled), pooled.device, pooled.dtype)}


def unet_conditions(pipe, prompts: Sequence[str] | TextConditions, height: int | None = None,
                    width: int | None = None, dtype: torch.dtype | None = None) -> dict:
    """Keyword arguments for `pipe.unet(sample, t, **conditions)`: `encoder_hidden_states`, and for SDXL
    `added_cond_kwargs`. prompts: strings (encoded here) or `TextConditions`. height/width: pixels (default the
    model's native size). dtype: default the UNet's."""
    text = prompts if isinstance(prompts, TextConditions) else encode_prompts(pipe, prompts)
    text = text.to(pipe.unet.device, dtype or pipe.unet.dtype)
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    return {"encoder_hidden_states": text.embeds,
            "added_cond_kwargs": added_conditions(pipe, text.pooled, height or side, width or side)}


def zero_conditions(unet, batch: int, side: int, device=None, dtype=None) -> dict:
    """Zero text conditions of the right shapes for a bare UNet (a probe that only needs the layers to run)."""
    param = next(unet.parameters())
    device, dtype = device or param.device, dtype or param.dtype
    text = torch.zeros(batch, 77, unet.config.cross_attention_dim, device=device, dtype=dtype)
    added = None
    if needs_added_conditions(unet):
        width = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        added = {"text_embeds": torch.zeros(batch, width, device=device, dtype=dtype),
                 "time_ids": time_ids(side, side, batch, device, dtype)}
    return {"encoder_hidden_states": text, "added_cond_kwargs": added}


def _ids(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids
