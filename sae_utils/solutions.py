"""Solutions to the loss exercises, written as a learner might: one step per line.

Reveal one in a notebook with `print(inspect.getsource(separate_loss_solution))`.
The package's own versions, with input checks, live in `sae_utils.losses`.
"""

from __future__ import annotations

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
