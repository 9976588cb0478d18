"""Solutions to the course's exercises, written as a learner might: one step per line. They are kept here, off
the learner's page; an instructor (or a stuck learner) reveals one with `show_solution("my_peaks")` or
`print(inspect.getsource(separate_loss_solution))`. The automatic tests run the notebooks with
`use_reference_solution=True`, which hands these to the checks.

    00  both_present_rate               both_present_rate_solution
    01  my_peaks, MyCaptureProcessor    peaks_solution, CaptureProcessorSolution
    02  my_separate_loss, my_enhance_loss    separate_loss_solution, enhance_loss_solution
    03  my_training_step, my_kv_names   training_step_solution, kv_names_solution
    04  my_success_rate                 success_rate_solution
    05  my_prompt_count                 prompt_count_solution

The package's own versions, with input checks, live in `sae_utils.losses`, `.attention` and `.finetune`.
"""

from __future__ import annotations

import inspect
import math
from itertools import combinations

import torch
import torch.nn.functional as F
from torch import Tensor


def separate_loss_solution(maps: Tensor) -> Tensor:
    """maps: (B, K, H, W) -> (B,): mean over pairs of max over pixels of M_i M_j / (M_i + M_j)."""
    maps = maps.float()  # float16 products of small probabilities would underflow
    pair_losses = []
    for i, j in combinations(range(maps.shape[1]), 2):
        a, b = maps[:, i], maps[:, j]  # (B, H, W)
        total = a + b
        both_zero = total == 0
        # torch.where computes both branches: divide by 1 where total is 0, or the gradient is NaN
        ratio = torch.where(both_zero, 0.0, a * b / torch.where(both_zero, 1.0, total))
        pair_losses.append(ratio.flatten(1).max(dim=1).values)  # (B,)
    return torch.stack(pair_losses, dim=1).mean(dim=1)


def enhance_loss_solution(maps: Tensor, sigma: float = 0.5) -> Tensor:
    """maps: (B, K, H, W) -> (B,): 1 - min over objects of the peak of the smoothed map."""
    maps = maps.float()
    B, K, H, W = maps.shape
    x = torch.tensor([-1.0, 0.0, 1.0])
    weights = torch.exp(-((x / (2 * sigma)) ** 2))  # the reference reading of the Gaussian
    weights = weights / weights.sum()
    kernel = torch.outer(weights, weights).to(maps.device)  # (3, 3)
    padded = F.pad(maps.reshape(B * K, 1, H, W), (1, 1, 1, 1), mode="reflect")
    smoothed = F.conv2d(padded, kernel[None, None]).reshape(B, K, H, W)
    peaks = smoothed.flatten(2).max(dim=2).values  # (B, K)
    return 1 - peaks.min(dim=1).values


def sepen_loss_solution(maps: Tensor, lambda_sep: float = 1.0, lambda_en: float = 0.5) -> Tensor:
    """maps: (B, K, H, W) -> (B,): lambda_sep * separate + lambda_en * enhance."""
    return lambda_sep * separate_loss_solution(maps) + lambda_en * enhance_loss_solution(maps)


# ---------- notebook 00 ----------

def both_present_rate_solution(present):
    """present: (N, 2) booleans -> the share of rows (images) where both objects are present."""
    return present.all(axis=1).mean()


# ---------- notebook 01 ----------

def peaks_solution(word_maps: Tensor) -> Tensor:
    """word_maps: (B, K, h, w) -> (B, K): the highest value of each object's map."""
    return word_maps.flatten(2).amax(dim=-1)  # or word_maps.amax(dim=(-2, -1))


class CaptureProcessorSolution:
    """A diffusers attention processor for a cross-attention layer that also records its maps.

    At each call it appends to `self.maps` the conditional half's maps, heads averaged: (B/2, 77, h, w).
    """

    def __init__(self):
        self.maps = []

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        B, L, _ = hidden_states.shape
        query = attn.to_q(hidden_states)  # (B, L, width): one query per pixel
        key = attn.to_k(encoder_hidden_states)  # (B, 77, width): one key per token
        value = attn.to_v(encoder_hidden_states)
        d = key.shape[-1] // attn.heads  # one head's width
        query, key, value = (x.view(B, -1, attn.heads, d).transpose(1, 2) for x in (query, key, value))
        scores = query.float() @ key.float().transpose(-1, -2) * attn.scale  # (B, heads, L, 77); scale 1/sqrt(d)
        probs = scores.softmax(dim=-1)  # over the 77 tokens: each pixel's attention sums to 1
        conditional = probs[B // 2:].mean(dim=1)  # [unconditional, conditional]: the second half; heads averaged
        side = math.isqrt(L)
        self.maps.append(conditional.transpose(1, 2).reshape(B // 2, -1, side, side).detach())  # (B/2, 77, h, w)
        out = (probs.to(value.dtype) @ value).transpose(1, 2).reshape(B, L, attn.heads * d)  # heads merged back
        return attn.to_out[1](attn.to_out[0](out))  # the output projection, then dropout


# ---------- notebook 03 ----------

def kv_names_solution(unet) -> list[str]:
    """The parameters trainable="kv" trains: to_k and to_v of every cross-attention layer (attn2)."""
    return [name for name, _ in unet.named_parameters() if ".attn2.to_k." in name or ".attn2.to_v." in name]


def training_step_solution(pipe, noise_scheduler, prompt, words, generator, batch_size=4):
    """One data-free SepEn step up to backward; returns the loss, the keys' gradients in their .grad."""
    from sae_utils.attention import capture_cross_attention
    from sae_utils.conditioning import unet_conditions
    from sae_utils.losses import sepen_loss

    unet = pipe.unet
    unet.requires_grad_(False)  # freeze everything ...
    keys = [p for name, p in unet.named_parameters() if ".attn2.to_k." in name]  # ... but the cross-attention keys
    for p in keys:
        p.requires_grad_(True)
        p.grad = None  # backward adds to .grad: start from nothing

    side = unet.config.sample_size  # the latent's side
    z0 = torch.randn(batch_size, 4, side, side, generator=generator) * pipe.vae.config.scaling_factor
    noise = torch.randn(batch_size, 4, side, side, generator=generator)
    t = torch.randint(0, 1000, (batch_size,), generator=generator)  # 0..999: the upper bound is exclusive
    noisy = noise_scheduler.add_noise(z0, noise, t).to(unet.device, unet.dtype)

    # the frozen text encoder on the prompt padded to 77 tokens: pipe.text_encoder(pipe.tokenizer(...).input_ids)[0]
    # as encoder_hidden_states; unet_conditions does it for every family (SDXL: two encoders, + pooled text, size ids)
    text = unet_conditions(pipe, [prompt] * batch_size)

    with capture_cross_attention(pipe, keep="last") as store:  # the model's map level
        unet(noisy, t.to(unet.device), **text)
    maps = store.word_maps(prompt, words)  # (B, 2, h, w), with their autograd graph
    loss = sepen_loss(maps).mean()  # 1 x separate + 0.5 x enhance, averaged over the batch
    loss.backward()
    return loss


# ---------- notebook 04 ----------

def success_rate_solution(present):
    """present: (N, K) bool tensor -> (rate, low, high): the share of images with every object, 95 % Wilson interval."""
    n = len(present)
    p = present.all(dim=1).float().mean().item()  # an image succeeds when every object is found
    z = 1.96  # 95 %
    centre = (p + z**2 / (2 * n)) / (1 + z**2 / n)
    half = z / (1 + z**2 / n) * (p * (1 - p) / n + z**2 / (4 * n**2)) ** 0.5
    return p, max(0.0, centre - half), min(1.0, centre + half)


# ---------- notebook 05 ----------

def prompt_count_solution(num_concepts, num_connectors):
    """An ordered pair of two different concepts: N choices for the first, N - 1 for the second, each with any
    connector: N (N - 1) C. With 200 concepts and 2 connectors, 79,600 prompts; the paper's 10,000 steps of 4
    samples draw 40,000: each prompt about half a time, each unordered pair about twice. What the delta learns has to
    be general, a rule for object words, not a fix for each pair."""
    return num_concepts * (num_concepts - 1) * num_connectors


SOLUTIONS = {"both_present_rate": both_present_rate_solution, "my_success_rate": success_rate_solution,
             "my_prompt_count": prompt_count_solution,
             "my_peaks": peaks_solution, "MyCaptureProcessor": CaptureProcessorSolution,
             "my_separate_loss": separate_loss_solution, "my_enhance_loss": enhance_loss_solution,
             "my_kv_names": kv_names_solution, "my_training_step": training_step_solution}


def show_solution(name: str) -> None:
    """Print the course's solution to the exercise `name` (e.g. "my_training_step")."""
    if name not in SOLUTIONS:
        raise KeyError(f"No solution named {name!r}; the exercises are {sorted(SOLUTIONS)}.")
    print(inspect.getsource(SOLUTIONS[name]))
