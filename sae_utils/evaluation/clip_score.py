"""CLIP similarities, as Attend-and-Excite measures them: image vs full prompt, image vs each object's sub-prompt.

    scores = clip_scores(images, "a cat and a dog", ["cat", "dog"], clip, clip_processor)
    scores["full"], scores["min_object"]              # (N,) each: cosine similarities in [-1, 1]

Similarities are cosines of L2-normalised CLIP embeddings, in [-1, 1], not CLIPScore's 100 * max(cos, 0)
(typical values for ViT-B/16 and a matching image are around 0.3). Attend-and-Excite reports the mean over
images of the full-prompt similarity and of the minimum over the two object halves; a prompt's text side is the
normalised mean of its embeddings through OpenAI's 80 ImageNet templates (`templates=IMAGENET_TEMPLATES`, the
default here; `templates=None` embeds the bare text).
"""
from __future__ import annotations

from typing import Sequence

import torch

from sae_utils.evaluation.images import ImageInput, batches, to_pil_images
from sae_utils.evaluation.subprompts import IMAGENET_TEMPLATES, ensemble_texts, object_subprompts


@torch.no_grad()
def image_embeddings(images: ImageInput, model, processor, batch_size: int = 32) -> torch.Tensor:
    """L2-normalised CLIP image embeddings: (N, D) float32 on the CPU."""
    out = []
    for batch in batches(to_pil_images(images), batch_size):
        pixels = processor.image_processor(images=list(batch), return_tensors="pt")["pixel_values"]
        features = model.get_image_features(pixel_values=pixels.to(model.device, model.dtype))
        out.append(_normalise(_embedding(features)))
    return torch.cat(out)


@torch.no_grad()
def text_embeddings(texts: Sequence[str], model, processor, batch_size: int = 256,
                    templates: Sequence[str] | None = None) -> torch.Tensor:
    """L2-normalised CLIP text embeddings: (T, D) float32 on the CPU.

    templates: None embeds each text as is; a list of templates embeds each text through every template
    (`ensemble_texts`) and returns the normalised mean of the normalised embeddings (Attend-and-Excite).
    """
    if isinstance(texts, str):
        raise TypeError(f"texts must be a list of strings, e.g. [{texts!r}].")
    if templates is not None:
        return torch.stack([_normalise(text_embeddings(ensemble_texts(t, templates), model, processor,
                                                       batch_size).mean(0)) for t in texts])
    out = []
    for batch in batches(list(texts), batch_size):
        tokens = processor.tokenizer(list(batch), padding=True, truncation=True, return_tensors="pt")
        features = model.get_text_features(input_ids=tokens["input_ids"].to(model.device),
                                           attention_mask=tokens["attention_mask"].to(model.device))
        out.append(_normalise(_embedding(features)))
    return torch.cat(out)


def clip_image_text_similarity(images: ImageInput, texts: str | Sequence[str], model, processor,
                               batch_size: int = 32, templates: Sequence[str] | None = None) -> torch.Tensor:
    """Cosine similarity of image i with text i (or with the one text given): (N,) in [-1, 1]."""
    image = image_embeddings(images, model, processor, batch_size)
    texts = [texts] if isinstance(texts, str) else list(texts)
    if len(texts) not in (1, len(image)):
        raise ValueError(f"Give one text, or one text per image; got {len(texts)} texts for {len(image)} images.")
    return (image * text_embeddings(texts, model, processor, templates=templates)).sum(-1)


def clip_scores(images: ImageInput, prompt: str, words: Sequence[str] | None, model, processor, *,
                subprompts: Sequence[str] | None = None, templates: Sequence[str] | None = IMAGENET_TEMPLATES,
                batch_size: int = 32) -> dict[str, torch.Tensor]:
    """Attend-and-Excite's CLIP image-text metrics for the images of one prompt.

    Returns {"full": (N,), "objects": (N, K), "min_object": (N,)}: similarity with the whole prompt, with each
    object's sub-prompt (`object_subprompts(prompt, words)` unless `subprompts` are given), and the minimum over
    objects, which is low when any one object is missing.
    """
    if subprompts is None:
        if words is None:
            raise ValueError("Give the object words (e.g. ['cat', 'dog']) or the sub-prompts.")
        subprompts = object_subprompts(prompt, words)
    image = image_embeddings(images, model, processor, batch_size)
    text = text_embeddings([prompt, *subprompts], model, processor, templates=templates)
    similarity = image @ text.T  # (N, 1 + K)
    objects = similarity[:, 1:]
    return {"full": similarity[:, 0], "objects": objects, "min_object": objects.min(dim=1).values}


def text_text_similarity(texts_a: Sequence[str], texts_b: Sequence[str], model, processor,
                         templates_b: Sequence[str] | None = None) -> torch.Tensor:
    """Cosine similarity of the CLIP text embeddings of texts_a[i] and texts_b[i]: (N,) in [-1, 1].

    texts_b may be a single text, compared with every text of texts_a. templates_b: embed texts_b through
    these templates (Attend-and-Excite does so for the prompt, not for the BLIP caption); None keeps it
    symmetric.
    """
    texts_b = [texts_b] if isinstance(texts_b, str) else list(texts_b)
    if isinstance(texts_a, str) or len(texts_b) not in (1, len(texts_a)):
        raise ValueError(f"Give a list of texts and one text per item of it (or a single text); got "
                         f"{texts_a!r} and {len(texts_b)} texts.")
    a = text_embeddings(texts_a, model, processor)
    return (a * text_embeddings(texts_b, model, processor, templates=templates_b)).sum(-1)


def _embedding(features) -> torch.Tensor:
    """transformers < 5 returns the projected embedding; 5 returns an output whose pooler_output it is."""
    return features if isinstance(features, torch.Tensor) else features.pooler_output


def _normalise(x: torch.Tensor) -> torch.Tensor:
    x = x.float().cpu()
    return x / x.norm(dim=-1, keepdim=True)
