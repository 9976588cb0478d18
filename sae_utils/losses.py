"""The Separate and Enhance losses on cross-attention maps, and Attend-and-Excite's loss.

Every loss takes `maps: (B, K, H, W)`, one attention map per object word, values >= 0
(cross-attention probabilities), and returns one value per image, `(B,)`, in float32:
the maps are cast to float32 first, because products of small float16 probabilities
underflow. All functions are differentiable and stay finite, gradients included, on
all-zero or tiny maps.

    separate = mean over pairs i < j of  max_pixels  M_i M_j / (M_i + M_j)
    enhance  = 1 - min_objects max_pixels  G * M_k        (G: 3x3 Gaussian, reflect padding)
    sepen    = lambda_sep * separate + lambda_en * enhance
"""

from __future__ import annotations

import math
from functools import lru_cache
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

KERNEL_READINGS = ("reference", "textbook")


def gaussian_kernel_3x3(sigma: float = 0.5, reading: str = "reference") -> Tensor:
    """The 3x3 Gaussian kernel of the enhance loss, (3, 3) float32, summing to 1.

    "A 3x3 Gaussian with sigma 0.5" has two readings; with offsets x in {-1, 0, 1}:
      "reference": w(x) = exp(-(x / (2 sigma))^2), a Gaussian of std sigma*sqrt(2),
                   1-D weights 0.212, 0.576, 0.212 for sigma 0.5. This is how the public
                   SepEn and Attend-and-Excite code build it, so it is the default: it is
                   the kernel behind the papers' numbers.
      "textbook":  w(x) = exp(-x^2 / (2 sigma^2)), 1-D weights 0.107, 0.787, 0.107.
    The 2-D kernel is the outer product of the normalised 1-D weights.
    """
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    offsets = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)
    if reading == "reference":
        weights = torch.exp(-((offsets / (2 * sigma)) ** 2))
    elif reading == "textbook":
        weights = torch.exp(-(offsets**2) / (2 * sigma**2))
    else:
        raise ValueError(f"unknown kernel reading {reading!r}: expected one of {KERNEL_READINGS}")
    weights = weights / weights.sum()
    return torch.outer(weights, weights).float()


@lru_cache(maxsize=32)
def _kernel_on(sigma: float, reading: str, device: torch.device) -> Tensor:
    """The kernel, made once per device: a host-to-device copy in every step would stall the GPU (and is
    not allowed inside a CUDA graph)."""
    return gaussian_kernel_3x3(sigma, reading).to(device)[None, None]


def _as_float32_maps(maps: Tensor, name: str = "maps", min_objects: int = 1, check_values: bool = True) -> Tensor:
    """Check `maps: (B, K, H, W)` (floating, finite, >= 0, K >= min_objects); return it in float32.

    check_values=False skips the finite/non-negative test, the one check that reads the values: on a GPU it
    waits for them (a host sync), which a training step or a CUDA graph cannot afford.
    """
    if not isinstance(maps, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, K, H, W), got {type(maps).__name__}")
    if maps.ndim != 4:
        raise ValueError(
            f"{name} must be 4-D (B, K, H, W): batch, objects, height, width; got shape {tuple(maps.shape)}. "
            "For a single image add the batch axis with maps[None]; for per-word maps use stack_object_maps."
        )
    if not maps.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor (attention probabilities), got {maps.dtype}")
    if maps.shape[1] < min_objects:
        raise ValueError(
            f"{name} has K={maps.shape[1]} object maps (shape {tuple(maps.shape)}); this loss needs "
            f"K >= {min_objects}: it compares the maps of different objects"
        )
    bad = ~(torch.isfinite(maps) & (maps >= 0)) if check_values else None
    if bad is not None and bad.any():
        kind = "NaN" if maps.isnan().any() else "inf" if maps.isinf().any() else "negative values"
        raise ValueError(f"{name} contains {kind}; attention maps are probabilities, finite and >= 0")
    return maps.float()


def stack_object_maps(word_maps: Sequence[Tensor]) -> Tensor:
    """Stack K per-word maps, each (B, H, W), into `maps: (B, K, H, W)`."""
    if isinstance(word_maps, Tensor) or len(word_maps) == 0:
        raise ValueError("word_maps must be a non-empty list of (B, H, W) tensors, one per object word")
    shapes = [tuple(m.shape) for m in word_maps]
    if any(len(s) != 3 for s in shapes):
        raise ValueError(f"each word map must be (B, H, W); got shapes {shapes}")
    if len(set(shapes)) > 1:
        raise ValueError(
            f"word maps differ in shape: {shapes}. All maps must share the batch size B and the "
            "resolution H, W (take them from the same layers, e.g. the 16x16 ones)"
        )
    return torch.stack(list(word_maps), dim=1)


def smooth(maps: Tensor, sigma: float = 0.5, reading: str = "reference", check_values: bool = True) -> Tensor:
    """Blur each map with the 3x3 Gaussian, reflect padding of 1 pixel: (B, K, H, W) -> (B, K, H, W)."""
    maps = _as_float32_maps(maps, check_values=check_values)
    B, K, H, W = maps.shape
    if H < 2 or W < 2:
        raise ValueError(f"reflect padding needs H, W >= 2; got maps of shape {tuple(maps.shape)}")
    kernel = _kernel_on(sigma, reading, maps.device)  # (1, 1, 3, 3)
    padded = F.pad(maps.reshape(B * K, 1, H, W), (1, 1, 1, 1), mode="reflect")
    return F.conv2d(padded, kernel).reshape(B, K, H, W)


def object_peaks(maps: Tensor, sigma: float = 0.5, reading: str = "reference", check_values: bool = True) -> Tensor:
    """The peak of each smoothed map: (B, K, H, W) -> (B, K)."""
    return smooth(maps, sigma, reading, check_values).flatten(2).amax(dim=-1)


def separate_loss(maps: Tensor, check_values: bool = True) -> Tensor:
    """Overlap of the object maps: (B, K, H, W) -> (B,), K >= 2.

    For each pair i < j, max over pixels of M_i M_j / (M_i + M_j); averaged over the
    K(K-1)/2 pairs. Where M_i + M_j is below float32's smallest normal number (1.2e-38),
    including the 0/0 case, the ratio is 0 (its true value is below that anyway): a
    safe denominator there keeps the gradient finite too.
    """
    return pair_overlaps(maps, check_values).mean(dim=1)


def pair_overlaps(maps: Tensor, check_values: bool = True) -> Tensor:
    """(B, K, H, W) -> (B, K(K-1)/2): for each pair i < j, max over pixels of M_i M_j / (M_i + M_j)."""
    maps = _as_float32_maps(maps, min_objects=2, check_values=check_values)
    i, j = torch.triu_indices(maps.shape[1], maps.shape[1], offset=1, device=maps.device)
    product, total = maps[:, i] * maps[:, j], maps[:, i] + maps[:, j]  # (B, pairs, H, W)
    defined = total > torch.finfo(torch.float32).tiny
    ratio = torch.where(defined, product / torch.where(defined, total, 1.0), 0.0)
    return ratio.flatten(2).amax(dim=-1)


def enhance_loss(maps: Tensor, sigma: float = 0.5, reading: str = "reference", check_values: bool = True) -> Tensor:
    """Weakness of the weakest object: (B, K, H, W) -> (B,) = 1 - min_k max_pixels (G * M_k).

    G is the 3x3 Gaussian of `gaussian_kernel_3x3(sigma, reading)`, default the reference reading.
    """
    return 1 - object_peaks(maps, sigma, reading, check_values).amin(dim=1)


class SepEnLoss(NamedTuple):
    """The SepEn loss and its two terms, each (B,)."""

    total: Tensor
    separate: Tensor
    enhance: Tensor


def sepen_loss_terms(
    maps: Tensor, lambda_sep: float = 1.0, lambda_en: float = 0.5, reading: str = "reference", *, sigma: float = 0.5,
    check_values: bool = True,
) -> SepEnLoss:
    """Both terms and their weighted sum, for logging; see `sepen_loss`. The maps are checked once;
    check_values=False skips the value check (a host sync) in training steps."""
    maps = _as_float32_maps(maps, min_objects=2, check_values=check_values)
    separate, enhance = separate_loss(maps, check_values=False), enhance_loss(maps, sigma, reading, check_values=False)
    return SepEnLoss(lambda_sep * separate + lambda_en * enhance, separate, enhance)


def sepen_loss_terms_per_slice(
    maps: Tensor, lambda_sep: float = 1.0, lambda_en: float = 0.5, reading: str = "reference", *, sigma: float = 0.5,
    check_values: bool = True,
) -> SepEnLoss:
    """The losses when each image brings a stack of S maps per word: `maps: (B, S, K, H, W)` -> each term (B,).

    Each term takes its max over the stack as over the pixels (the released code's per-head reading, see
    `maps.released_head_stack`): separate = mean over pairs of max_s max_pixels M_i M_j / (M_i + M_j), enhance =
    1 - min_k max_s max_pixels G * M_k, smoothing each slice on its own. With S = 1 these are `sepen_loss_terms`.
    """
    if not isinstance(maps, Tensor) or maps.ndim != 5:
        raise ValueError("maps must be (B, S, K, H, W): batch, slices, objects, height, width; got "
                         f"{tuple(maps.shape) if isinstance(maps, Tensor) else type(maps).__name__}.")
    B, S = maps.shape[:2]
    flat = _as_float32_maps(maps.flatten(0, 1), min_objects=2, check_values=check_values)
    separate = pair_overlaps(flat, check_values=False).view(B, S, -1).amax(dim=1).mean(dim=1)
    peaks = object_peaks(flat, sigma, reading, check_values=False).view(B, S, -1).amax(dim=1)  # (B, K)
    enhance = 1 - peaks.amin(dim=1)
    return SepEnLoss(lambda_sep * separate + lambda_en * enhance, separate, enhance)


def sepen_loss(
    maps: Tensor, lambda_sep: float = 1.0, lambda_en: float = 0.5, reading: str = "reference", *, sigma: float = 0.5
) -> Tensor:
    """lambda_sep * separate_loss + lambda_en * enhance_loss: (B, K, H, W) -> (B,), K >= 2."""
    return sepen_loss_terms(maps, lambda_sep, lambda_en, reading, sigma=sigma).total


AAE_TOKEN_RANGES = ("all-but-last", "prompt")


def attend_and_excite_token_maps(token_maps: Tensor, n_text_tokens: Tensor | Sequence[int],
                                 token_range: str = "prompt") -> Tensor:
    """Attend-and-Excite's re-normalised maps: (B, T, H, W) -> (B, T, H, W).

    `token_maps` are cross-attention probabilities over all T text tokens (start token at 0);
    `n_text_tokens: (B,)` counts the prompt tokens, so the end token sits at n + 1. The kept tokens
    are scaled by 100 and softmaxed over at each pixel; all other tokens are 0, so token positions
    index the output as they index the prompt. Which tokens, as the official code
    (`_compute_max_attention_per_index`, `attention_maps[:, :, 1:last_idx]`):
      "prompt":       1..n, the prompt's own tokens (its SD 2.1 path, `normalize_eot=True`);
      "all-but-last": 1..T-2, the end token and the padding included (its SD 1.4 path, `last_idx=-1`):
                      a word's share is then taken against ~70 end/padding tokens, so its peak is lower.
    """
    if token_range not in AAE_TOKEN_RANGES:
        raise ValueError(f"token_range={token_range!r}: use one of {AAE_TOKEN_RANGES}.")
    token_maps = _as_float32_maps(token_maps, name="token_maps")
    B, T = token_maps.shape[:2]
    n = torch.as_tensor(n_text_tokens, device=token_maps.device)
    if n.shape != (B,) or n.is_floating_point():
        raise ValueError(f"n_text_tokens must be {B} integers, one per image; got {n.dtype} of shape {tuple(n.shape)}")
    if ((n < 1) | (n > T - 2)).any():
        raise ValueError(f"n_text_tokens must lie in 1..{T - 2} (start and end tokens take 2 of T={T}); got {n.tolist()}")
    position = torch.arange(T, device=token_maps.device)
    last = n[:, None] if token_range == "prompt" else torch.full_like(n[:, None], T - 2)
    kept = ((position >= 1) & (position <= last))[:, :, None, None]  # (B, T, 1, 1)
    return torch.softmax((100 * token_maps).masked_fill(~kept, -math.inf), dim=1)


def attend_and_excite_loss(maps: Tensor, sigma: float = 0.5, reading: str = "reference") -> Tensor:
    """Attend-and-Excite's loss: (B, K, H, W) -> (B,) = max_k (1 - peak of G * M_k).

    `maps` are the objects' maps from `attend_and_excite_token_maps`. The formula is the
    enhance loss's (1 - min of the peaks), on maps re-normalised over the prompt's tokens.
    """
    return (1 - object_peaks(maps, sigma, reading)).amax(dim=1)
