"""Pure functions on attention maps: from token maps to word maps, and the two failure signals.

Stable Diffusion drops an object of a two-object prompt when (1) its word's map peaks much lower than the
other's ("catastrophic neglect") or (2) both words attend to the same pixels ("mask overlap"). These two
numbers are what `attention_stats` reports and what the Separate and Enhance losses push on.
"""
from __future__ import annotations

from typing import Sequence

import torch


def gather_word_maps(token_maps: torch.Tensor, positions: Sequence[Sequence[Sequence[int]]],
                     combine: str = "sum") -> torch.Tensor:
    """Pick each word's map out of the token maps.

    token_maps: (B, T, H, W). positions: for each of the B images, K lists of token positions (a word split
    into several tokens has several). combine: "sum" (a word's share of the attention: the probabilities of
    its tokens add up) or "mean". Returns (B, K, H, W).
    """
    if token_maps.ndim != 4:
        raise ValueError(f"token_maps must be (B, T, H, W), got shape {tuple(token_maps.shape)}.")
    if combine not in ("sum", "mean"):
        raise ValueError(f"combine={combine!r}: use 'sum' or 'mean'.")
    if len(positions) != token_maps.shape[0]:
        raise ValueError(f"positions are given for {len(positions)} images, the maps have {token_maps.shape[0]}.")
    if len({len(p) for p in positions}) != 1:
        raise ValueError("Every image needs the same number K of words; got " + str([len(p) for p in positions]))
    images = []
    for maps, words in zip(token_maps, positions):
        stacked = [maps[list(pos)].sum(0) if combine == "sum" else maps[list(pos)].mean(0) for pos in words]
        images.append(torch.stack(stacked))
    return torch.stack(images)


def released_head_stack(probs: torch.Tensor) -> torch.Tensor:
    """The released SepEn code's reading of one training step's attention: (B, heads, T, h, w) -> (B, S, T, h, w).

    Its attention store keeps `attn[n // 2:]` of every cross-attention call, a rule written for classifier-free
    guidance batches [unconditional, conditional]; diffusers lays heads out batch-major (row b * heads + head), and
    a training batch has no unconditional half, so this keeps samples B/2 .. B-1 with all their heads. Its
    `aggregate_attention` then reshapes those rows to (B, -1, h, w, T): "image" i of the loss is rows
    i * S .. i * S + S - 1, S = heads / 2 of them, i.e. half the heads of sample B/2 + i // 2. For B = 4 and 8 heads:
    (sample 2, heads 0-3), (sample 2, heads 4-7), (sample 3, heads 0-3), (sample 3, heads 4-7). The first half of
    the batch is never read: it gets no gradient.
    """
    if probs.ndim != 5:
        raise ValueError(f"probs must be (B, heads, T, h, w), got shape {tuple(probs.shape)}.")
    batch, heads = probs.shape[:2]
    kept = probs.flatten(0, 1)[batch * heads // 2:]  # batch-major rows, the "conditional half"
    if kept.shape[0] % batch:
        raise ValueError(f"The released reading needs (B * heads / 2) divisible by B (B={batch}, heads={heads}): "
                         "use an even number of heads and an even batch, or map_reading='head-mean'.")
    return kept.reshape(batch, -1, *probs.shape[2:])


def peak_activation(maps: torch.Tensor) -> torch.Tensor:
    """The highest value of each object's map: (B, K, H, W) -> (B, K). Low peak = neglected object."""
    return maps.flatten(2).amax(dim=-1)


def overlap(maps: torch.Tensor) -> torch.Tensor:
    """How much the objects' maps cover the same pixels: (B, K, H, W) -> (B,), in [0, 1].

    Each map is divided by its own peak (so a weak map counts by its shape, not its scale), then for every
    pair the soft intersection-over-union sum(min) / sum(max) is taken, averaged over the K(K-1)/2 pairs.
    0: disjoint supports; 1: identical normalised maps.
    """
    if maps.ndim != 4 or maps.shape[1] < 2:
        raise ValueError(f"overlap needs (B, K>=2, H, W) maps, got {tuple(maps.shape)}.")
    normalised = maps.float() / peak_activation(maps.float()).clamp_min(1e-12)[..., None, None]
    k = maps.shape[1]
    pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
    values = []
    for i, j in pairs:
        a, b = normalised[:, i].flatten(1), normalised[:, j].flatten(1)
        values.append(torch.minimum(a, b).sum(-1) / torch.maximum(a, b).sum(-1).clamp_min(1e-12))
    return torch.stack(values, dim=-1).mean(-1)


def attention_stats(maps: torch.Tensor, words: Sequence[str] | None = None) -> dict:
    """The failure signals of each image as plain numbers: peak per object, peak ratio, overlap.

    maps: (B, K, H, W). Returns {"peak": [[...K] * B], "peak_ratio": [...B] (weakest / strongest peak),
    "overlap": [...B], "words": words}.
    """
    peaks = peak_activation(maps.float())
    ratio = peaks.amin(-1) / peaks.amax(-1).clamp_min(1e-12)
    return {"words": list(words) if words is not None else None, "peak": peaks.tolist(),
            "peak_ratio": ratio.tolist(), "overlap": overlap(maps).tolist()}
