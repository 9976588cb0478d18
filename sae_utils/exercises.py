"""Checks for the notebook exercises: run a learner's loss on small cases and explain mistakes.

    check_separate_loss(my_separate_loss)   # prints a congratulation and returns True,
    check_enhance_loss(my_enhance_loss)     # or raises ExerciseError naming the case,
    check_sepen_loss(my_sepen_loss)         # the expected and obtained values, and a hint

Each function under test takes `maps: (B, K, H, W)` and returns `(B,)` float32. The answers
come from `sae_utils.losses`; a hint is given when the obtained value equals what a typical
mistake would give.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from sae_utils import losses

LossFn = Callable[[Tensor], Tensor]
TOLERANCE = 1e-5


class ExerciseError(AssertionError):
    """A learner's function gave a wrong answer; the message says where and why."""


@dataclass(frozen=True)
class Case:
    name: str
    words: str
    maps: Tensor  # (B, K, H, W)


def _cases() -> list[Case]:
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=g)

    ramp = torch.tensor([1.0, 0.8, 0.5, 0.2])
    disjoint = torch.zeros(1, 2, 4, 4)
    disjoint[0, 0, :, :2], disjoint[0, 1, :, 2:] = rand(4, 2), rand(4, 2)
    same = rand(1, 1, 4, 4)
    return [
        Case("strong and weak", "a strong map (values up to 0.6) and a weak one (up to 0.2), 5x5, overlapping",
             torch.cat([0.6 * rand(1, 1, 5, 5), 0.2 * rand(1, 1, 5, 5)], dim=1)),
        Case("all zero", "two 4x4 maps that are 0 everywhere (the 0/0 case)", torch.zeros(1, 2, 4, 4)),
        Case("disjoint", "two 4x4 maps that never overlap (left half, right half)", disjoint),
        Case("identical", "twice the same 4x4 map", same.repeat(1, 2, 1, 1)),
        Case("one map zero", "a 4x4 map and a map that is 0 everywhere", torch.cat([rand(1, 1, 4, 4), torch.zeros(1, 1, 4, 4)], 1)),
        Case("three objects", "K=3 maps of 5x5, so 3 pairs", rand(1, 3, 5, 5) * torch.tensor([0.3, 0.5, 0.9])[:, None, None]),
        Case("batch of three", "B=3 images with 2 maps each, scaled by 1, 1/2, 1/4 per image",
             rand(3, 2, 4, 4) * torch.tensor([1.0, 0.5, 0.25])[:, None, None, None]),
        Case("bright edges", "4x4 maps brightest along an edge (top row; left column), where padding matters",
             torch.stack([0.7 * ramp[:, None].expand(4, 4), ramp[None, :].expand(4, 4)])[None]),
        Case("tiny values", "two 4x4 maps with values about 1e-12", 1e-12 * rand(1, 2, 4, 4)),
        Case("float16", "two 4x4 maps given in float16 (compute in float32, return float32)", rand(1, 2, 4, 4).half()),
    ]


def _peaks(maps: Tensor, kernel: Tensor | None, padding: str | None) -> Tensor:
    """Peak of each map after a 3x3 blur, with a chosen padding; (B, K, H, W) -> (B, K). For the mistakes."""
    maps = maps.float()
    if kernel is not None:
        B, K, H, W = maps.shape
        flat = maps.reshape(B * K, 1, H, W)
        if padding is not None:
            flat = F.pad(flat, (1, 1, 1, 1), mode=padding)
        maps = F.conv2d(flat, kernel[None, None]).reshape(B, K, flat.shape[-2] - 2, flat.shape[-1] - 2)
    return maps.flatten(2).amax(dim=-1)


def _pair_ratios(maps: Tensor, divide: bool = True) -> Tensor:
    """M_i M_j / (M_i + M_j) for pairs i < j, 0 where both are 0: (B, K, H, W) -> (B, pairs, H*W)."""
    maps = maps.float()
    i, j = torch.triu_indices(maps.shape[1], maps.shape[1], offset=1)
    product, total = maps[:, i] * maps[:, j], maps[:, i] + maps[:, j]
    if divide:
        product = torch.where(total > 0, product / total.clamp_min(1e-30), 0.0)
    return product.flatten(2)


def _separate_mistakes() -> dict[str, LossFn]:
    return {
        "your value equals the mean over pixels: the loss takes the max over pixels (the most overlapping pixel)":
            lambda m: _pair_ratios(m).mean(-1).mean(-1),
        "your value equals the sum over pixels: the loss takes the max over pixels":
            lambda m: _pair_ratios(m).sum(-1).mean(-1),
        "you forgot to divide by (M_i + M_j): the ratio is M_i * M_j / (M_i + M_j)":
            lambda m: _pair_ratios(m, divide=False).amax(-1).mean(-1),
        "you summed over the pairs: average them (divide by K(K-1)/2)":
            lambda m: _pair_ratios(m).amax(-1).sum(-1),
        "you took the max over the pairs: average them":
            lambda m: _pair_ratios(m).amax(-1).amax(-1),
        "you used only the first pair: with K objects, average over all pairs i < j, e.g. (0,1), (0,2), (1,2)":
            lambda m: _pair_ratios(m[:, :2]).amax(-1).mean(-1),
    }


def _enhance_mistakes(reading: str) -> dict[str, LossFn]:
    other = "textbook" if reading == "reference" else "reference"
    formula = {"reference": "exp(-(x/(2 sigma))^2), 1-D weights 0.212, 0.576, 0.212",
               "textbook": "exp(-x^2/(2 sigma^2)), 1-D weights 0.107, 0.787, 0.107"}
    kernel = losses.gaussian_kernel_3x3(0.5, reading)
    unnormalised = kernel / kernel[1, 1]  # the raw exp(...) weights, centre 1
    return {
        f"you smoothed with the {other} kernel {formula[other]}; this course uses the {reading} reading: {formula[reading]}":
            lambda m: 1 - _peaks(m, losses.gaussian_kernel_3x3(0.5, other), "reflect").amin(-1),
        "your value equals the loss without smoothing: blur each map with the 3x3 Gaussian before taking its peak":
            lambda m: 1 - _peaks(m, None, None).amin(-1),
        "min and max swapped? the loss looks at the weakest object: 1 - min over objects of (max over pixels)":
            lambda m: 1 - _peaks(m, kernel, "reflect").amax(-1),
        "you returned the weakest peak itself: the loss is 1 - that peak, so that a stronger peak lowers the loss":
            lambda m: _peaks(m, kernel, "reflect").amin(-1),
        "your value equals the mean over pixels: the loss takes the max over pixels (the peak)":
            lambda m: 1 - losses.smooth(m, 0.5, reading).flatten(2).mean(-1).amin(-1),
        "you averaged the objects' peaks: take the min (the weakest object)":
            lambda m: 1 - _peaks(m, kernel, "reflect").mean(-1),
        "you padded with zeros: pad by 1 pixel with mode='reflect' (F.pad(x, (1, 1, 1, 1), mode='reflect'))":
            lambda m: 1 - _peaks(m, kernel, "constant").amin(-1),
        "you padded with mode='replicate', which repeats the edge pixel, so an edge peak counts twice in its own blur; "
        "pad with mode='reflect' (F.pad(x, (1, 1, 1, 1), mode='reflect')), which mirrors the pixels next to the edge":
            lambda m: 1 - _peaks(m, kernel, "replicate").amin(-1),
        "you did not pad: pad by 1 pixel with mode='reflect' so the blurred map keeps its size":
            lambda m: 1 - _peaks(m, kernel, None).amin(-1),
        "your kernel does not sum to 1: divide the weights by their sum":
            lambda m: 1 - _peaks(m, unnormalised, "reflect").amin(-1),
    }


def _sepen_mistakes(lambda_sep: float, lambda_en: float, reading: str) -> dict[str, LossFn]:
    def terms(m: Tensor) -> losses.SepEnLoss:
        return losses.sepen_loss_terms(m, 1.0, 1.0, reading)

    return {
        f"lambda_sep and lambda_en swapped? the total is {lambda_sep} * separate + {lambda_en} * enhance":
            lambda m: lambda_en * terms(m).separate + lambda_sep * terms(m).enhance,
        "you left out the enhance term": lambda m: lambda_sep * terms(m).separate,
        "you left out the separate term": lambda m: lambda_en * terms(m).enhance,
        f"you added the terms without their weights: {lambda_sep} * separate + {lambda_en} * enhance":
            lambda m: terms(m).separate + terms(m).enhance,
    }


def _fail(loss_name: str, case: Case, message: str, hint: str) -> ExerciseError:
    return ExerciseError(f"{loss_name} fails case '{case.name}': {case.words}.\n{message}\nhint: {hint}")


def _describe(t: Tensor) -> str:
    return f"{t.detach().flatten().tolist()} (shape {tuple(t.shape)}, {t.dtype})"


def _call(loss_name: str, fn: LossFn, case: Case, maps: Tensor) -> Tensor:
    try:
        return fn(maps)
    except Exception as error:  # a learner's bug: report it with the case that triggered it
        raise _fail(loss_name, case, f"your function raised {type(error).__name__}: {error}",
                    f"try your function on maps of shape {tuple(case.maps.shape)} and dtype {case.maps.dtype}") from error


def _check_form(loss_name: str, case: Case, expected: Tensor, obtained: object, nan_hint: str) -> None:
    """Type, shape, dtype and finiteness of the output, each with its own hint."""
    if not isinstance(obtained, Tensor):
        raise _fail(loss_name, case, f"expected a torch.Tensor of shape {tuple(expected.shape)}, got {type(obtained).__name__}",
                    "return a tensor, one value per image (no .item(), no float())")
    if obtained.shape != expected.shape:
        B, K = case.maps.shape[:2]
        got = tuple(obtained.shape)
        if got == (B, K):
            hint = f"expected shape (B,) = ({B},), got {got} = (B, K): one loss per image; reduce over the objects too"
        elif got == ():
            hint = "you returned a scalar: keep one value per image, shape (B,); the training loop averages the batch"
        else:
            hint = f"expected shape (B,) = ({B},), got {got}: reduce over pixels and objects, keep the batch axis"
        raise _fail(loss_name, case, f"expected {_describe(expected)}\nobtained {_describe(obtained)}", hint)
    if obtained.dtype != torch.float32:
        raise _fail(loss_name, case, f"expected dtype torch.float32, got {obtained.dtype}",
                    "cast the maps first, maps = maps.float(): float16 products of small probabilities underflow")
    if not torch.isfinite(obtained).all():
        raise _fail(loss_name, case, f"expected {_describe(expected)}\nobtained {_describe(obtained)}", nan_hint)


def _check_value(loss_name: str, case: Case, expected: Tensor, obtained: Tensor, mistakes: dict[str, LossFn]) -> None:
    obtained = obtained.detach()
    if torch.allclose(obtained, expected, rtol=TOLERANCE, atol=TOLERANCE):
        return
    hints = [hint for hint, mistake in mistakes.items()
             if torch.allclose(obtained, mistake(case.maps).float(), rtol=TOLERANCE, atol=TOLERANCE)]
    if not hints and case.maps.dtype != torch.float32 and torch.allclose(obtained, expected, atol=3e-3):
        hints = ["off by about float16 precision: cast the maps to float32 before computing, not only the result"]
    hint = hints[0] if hints else "compare your function with the formula step by step on this case"
    raise _fail(loss_name, case, f"expected {_describe(expected)}\nobtained {_describe(obtained)}", hint)


def _check_gradient(loss_name: str, fn: LossFn, case: Case, grad_hint: str) -> None:
    maps = case.maps.clone().requires_grad_(True)
    obtained = _call(loss_name, fn, case, maps)
    if not obtained.requires_grad:
        raise _fail(loss_name, case, "the output does not require grad",
                    "the output is not connected to the maps: avoid .item(), .detach(), numpy and torch.no_grad() inside the loss")
    obtained.sum().backward()
    if maps.grad is None or not torch.isfinite(maps.grad).all():
        got = None if maps.grad is None else maps.grad.flatten()[:6].tolist()
        raise _fail(loss_name, case, f"the gradient with respect to the maps is not finite: first entries {got}", grad_hint)


def _check(loss_name: str, fn: LossFn, reference: LossFn, mistakes: dict[str, LossFn],
           cases: list[Case], nan_hint: str, grad_hint: str) -> bool:
    try:
        fn(cases[0].maps.clone())
    except NotImplementedError:  # the exercise is still a stub: the notebook runs on
        print(f"Not done yet: write your {loss_name} above, then run this cell again.")
        return False
    except Exception:  # noqa: BLE001 - any other error is reported with its case below
        pass
    for case in cases:
        expected = reference(case.maps)
        obtained = _call(loss_name, fn, case, case.maps.clone())
        _check_form(loss_name, case, expected, obtained, nan_hint)
        _check_value(loss_name, case, expected, obtained, mistakes)
    for case in cases:
        if case.maps.dtype == torch.float32:
            _check_gradient(loss_name, fn, case, grad_hint)
    print(f"Well done: {loss_name} passes all {len(cases)} cases (values, shape (B,), float32, finite gradients).")
    return True


_GENERIC_NAN = "NaN or inf in the output: look for a division by 0 or a log of 0"


def check_separate_loss(fn: LossFn) -> bool:
    """Check `fn(maps: (B, K, H, W)) -> (B,)` against `losses.separate_loss`."""
    return _check(
        "separate_loss", fn, losses.separate_loss, _separate_mistakes(), _cases(),
        nan_hint="NaN: guard the 0/0 where both maps are 0 (M_i + M_j = 0): compute the ratio only where "
                 "the denominator is > 0 and put 0 elsewhere",
        grad_hint="NaN gradient although the value is right: torch.where computes both branches, and the "
                  "gradient of the 0/0 branch is NaN. Divide by a safe denominator: torch.where(total > 0, total, 1)",
    )


def check_enhance_loss(fn: LossFn, reading: str = "reference") -> bool:
    """Check `fn(maps: (B, K, H, W)) -> (B,)` against `losses.enhance_loss` (sigma 0.5, this kernel reading)."""
    reference = lambda m: losses.enhance_loss(m, 0.5, reading)  # noqa: E731
    return _check("enhance_loss", fn, reference, _enhance_mistakes(reading), _cases(), _GENERIC_NAN, _GENERIC_NAN)


def check_sepen_loss(fn: LossFn, lambda_sep: float = 1.0, lambda_en: float = 0.5, reading: str = "reference") -> bool:
    """Check `fn(maps: (B, K, H, W)) -> (B,)` against `losses.sepen_loss` with these weights."""
    reference = lambda m: losses.sepen_loss(m, lambda_sep, lambda_en, reading)  # noqa: E731
    return _check("sepen_loss", fn, reference, _sepen_mistakes(lambda_sep, lambda_en, reading), _cases(),
                  "NaN: guard the 0/0 of the separate term where both maps are 0", "NaN gradient: guard the 0/0 "
                  "of the separate term with a safe denominator, torch.where(total > 0, total, 1)")


def check_peaks(fn: Callable[[Tensor], Tensor], word_maps: Tensor) -> bool:
    """Notebook 01's exercise: `fn(word_maps: (B, K, h, w)) -> (B, K)`, the peak of each object's map.

    Prints "Not done yet" while `fn` raises NotImplementedError (so the notebook still runs).
    """
    from sae_utils.maps import peak_activation

    try:
        got = fn(word_maps)
    except NotImplementedError:
        print("Not done yet: write the function above, then run this cell again.")
        return False
    expected = peak_activation(word_maps)
    if not isinstance(got, Tensor) or got.shape != expected.shape:
        shape = tuple(got.shape) if isinstance(got, Tensor) else type(got).__name__
        raise ExerciseError(f"Expected one peak per image and object, shape {tuple(expected.shape)}; got {shape}. "
                            "Take the maximum over the two pixel dimensions only, e.g. amax(dim=(-2, -1)).")
    if not torch.allclose(got.float(), expected.float(), atol=1e-6):
        hint = ("that is the mean of each map; the peak is its maximum"
                if torch.allclose(got.float(), word_maps.float().mean(dim=(-2, -1)), atol=1e-6)
                else "compare with word_maps[b, k].max()")
        values = lambda t: [round(v, 4) for v in t[0].tolist()]  # noqa: E731
        raise ExerciseError(f"Wrong values: got {values(got)} for image 0, expected {values(expected)}: {hint}.")
    print(f"Correct: the peaks of image 0 are {[round(v, 4) for v in expected[0].tolist()]}. Well done!")
    return True
