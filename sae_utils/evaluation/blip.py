"""BLIP text-text similarity (Attend-and-Excite): caption each image with BLIP, compare caption and prompt in CLIP.

    captions = blip_captions(images, blip, blip_processor)
    scores = blip_text_similarity(images, "a cat and a dog", blip, blip_processor, clip, clip_processor)

Attend-and-Excite captions with LAVIS's `blip_caption` / `base_coco` (BLIP base finetuned on COCO; on the hub:
Salesforce/blip-image-captioning-base) and its defaults, which are the defaults here: the decoder starts from
the prompt "a picture of " (stripped from the caption), beam search with 3 beams, max_length 30 and
min_length 10 tokens, both counted with the 4 prompt tokens ([DEC] a picture of). The caption is embedded as
is; the prompt through the 80 ImageNet templates; the score is the cosine of the two.
"""
from __future__ import annotations

from typing import Sequence

import torch

from sae_utils.evaluation.clip_score import text_text_similarity
from sae_utils.evaluation.images import ImageInput, batches, to_pil_images
from sae_utils.evaluation.subprompts import IMAGENET_TEMPLATES

CAPTION_PROMPT = "a picture of "  # what BLIP's captioner was finetuned with (LAVIS base_coco config)


@torch.no_grad()
def blip_captions(images: ImageInput, model, processor, batch_size: int = 16, prompt: str | None = CAPTION_PROMPT,
                  num_beams: int = 3, max_length: int = 30, min_length: int = 10) -> list[str]:
    """One caption per image, without the prompt; deterministic (beam search, no sampling).

    prompt: None captions unconditionally (the decoder starts from [DEC] alone). max_length/min_length count
    the prompt's tokens, as transformers' and LAVIS's `generate` do.
    """
    captions = []
    for batch in batches(to_pil_images(images), batch_size):
        inputs = processor(images=list(batch), text=None if prompt is None else [prompt] * len(batch),
                           return_tensors="pt")
        pixels = inputs["pixel_values"].to(model.device, model.dtype)
        if prompt is None:
            out, prompt_length = model.generate(pixel_values=pixels, num_beams=num_beams, max_length=max_length,
                                                min_length=min_length), 1  # [DEC]
        else:
            input_ids = inputs["input_ids"].to(model.device)
            # generate swaps [CLS] for [DEC] and drops the closing [SEP]: the decoder starts from len - 1 tokens
            out = model.generate(pixel_values=pixels, input_ids=input_ids,
                                 attention_mask=inputs["attention_mask"].to(model.device),
                                 num_beams=num_beams, max_length=max_length, min_length=min_length)
            prompt_length = input_ids.shape[1] - 1
        captions += [c.strip() for c in processor.batch_decode(out[:, prompt_length:], skip_special_tokens=True)]
    return captions


def blip_text_similarity(images: ImageInput, prompt: str, blip, blip_processor, clip, clip_processor,
                         templates: Sequence[str] | None = IMAGENET_TEMPLATES, batch_size: int = 16,
                         **caption_kwargs) -> dict[str, object]:
    """Attend-and-Excite's BLIP score of the images of one prompt: {"similarity": (N,), "captions": [N str]}."""
    captions = blip_captions(images, blip, blip_processor, batch_size=batch_size, **caption_kwargs)
    similarity = text_text_similarity(captions, prompt, clip, clip_processor, templates_b=templates)
    return {"similarity": similarity, "captions": captions}
