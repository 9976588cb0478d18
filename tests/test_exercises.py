"""Tests for sae_utils.exercises: right answers pass, each typical wrong answer gets its hint."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sae_utils import exercises, losses
from sae_utils.exercises import ExerciseError, check_enhance_loss, check_separate_loss, check_sepen_loss
from sae_utils.solutions import enhance_loss_solution, separate_loss_solution, sepen_loss_solution



# ---------- wrong answers a learner might write ----------

def pairs(maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps of the pairs i < j: two (B, pairs, H, W) tensors, in the input dtype."""
    i, j = torch.triu_indices(maps.shape[1], maps.shape[1], offset=1)
    return maps[:, i], maps[:, j]


def pair_ratio(maps: torch.Tensor) -> torch.Tensor:
    """A correct guarded ratio: (B, K, H, W) -> (B, pairs, H, W); the building block of some mistakes."""
    a, b = pairs(maps.float())
    total = a + b
    return torch.where(total > 0, a * b / torch.where(total > 0, total, 1.0), 0.0)


def separate_without_guard(maps):
    a, b = pairs(maps.float())
    return (a * b / (a + b)).flatten(2).amax(2).mean(1)


def separate_guard_with_nan_gradient(maps):
    a, b = pairs(maps.float())
    return torch.where(a + b > 0, a * b / (a + b), 0.0).flatten(2).amax(2).mean(1)


def separate_mean_over_pixels(maps):
    return pair_ratio(maps).flatten(2).mean(2).mean(1)


def separate_first_pair_only(maps):
    return pair_ratio(maps[:, :2]).flatten(2).amax(2).mean(1)


def separate_per_pixel_shape(maps):
    return pair_ratio(maps).amax(2).mean(1)  # (B, W): forgot one spatial axis


def separate_in_float16(maps):
    a, b = pairs(maps)  # no .float(): float16 stays float16
    total = a + b
    return torch.where(total > 0, a * b / torch.where(total > 0, total, 1.0), 0.0).flatten(2).amax(2).mean(1)


def separate_cast_only_at_the_end(maps):
    return separate_in_float16(maps).float()


def separate_detached(maps):
    return losses.separate_loss(maps).detach()


def separate_that_crashes(maps):
    return maps[:, 0] @ maps[:, 2]


def blur(maps, reading="reference", padding="reflect"):
    maps = maps.float()
    B, K, H, W = maps.shape
    flat = F.pad(maps.reshape(B * K, 1, H, W), (1, 1, 1, 1), mode=padding)
    kernel = losses.gaussian_kernel_3x3(0.5, reading)[None, None]
    return F.conv2d(flat, kernel).reshape(B, K, H, W)


def enhance_without_smoothing(maps):
    return 1 - maps.float().flatten(2).amax(2).amin(1)


def enhance_textbook_kernel(maps):
    return 1 - blur(maps, "textbook").flatten(2).amax(2).amin(1)


def enhance_min_max_swapped(maps):
    return 1 - blur(maps).flatten(2).amax(2).amax(1)


def enhance_without_one_minus(maps):
    return blur(maps).flatten(2).amax(2).amin(1)


def enhance_mean_over_pixels(maps):
    return 1 - blur(maps).flatten(2).mean(2).amin(1)


def enhance_zero_padding(maps):
    return 1 - blur(maps, padding="constant").flatten(2).amax(2).amin(1)


def enhance_replicate_padding(maps):
    return 1 - blur(maps, padding="replicate").flatten(2).amax(2).amin(1)


def enhance_per_object(maps):
    return 1 - blur(maps).flatten(2).amax(2)  # (B, K)


def enhance_batch_mean(maps):
    return (1 - blur(maps).flatten(2).amax(2).amin(1)).mean()  # a scalar


# ---------- the checks ----------

@pytest.mark.parametrize("check, answer", [
    (check_separate_loss, losses.separate_loss),
    (check_separate_loss, separate_loss_solution),
    (check_enhance_loss, losses.enhance_loss),
    (check_enhance_loss, enhance_loss_solution),
    (check_sepen_loss, losses.sepen_loss),
    (check_sepen_loss, sepen_loss_solution),
])
def test_right_answers_pass(check, answer, capsys):
    assert check(answer) is True
    assert "Well done" in capsys.readouterr().out


def test_textbook_course_accepts_textbook_kernel_and_explains_the_reference_one():
    assert check_enhance_loss(enhance_textbook_kernel, reading="textbook") is True
    with pytest.raises(ExerciseError, match="you smoothed with the reference kernel.*uses the textbook reading"):
        check_enhance_loss(losses.enhance_loss, reading="textbook")


@pytest.mark.parametrize("check, wrong, case, hint", [
    (check_separate_loss, separate_without_guard, "all zero", "NaN: guard the 0/0 where both maps are 0"),
    (check_separate_loss, separate_guard_with_nan_gradient, "all zero", "torch.where computes both branches"),
    (check_separate_loss, separate_mean_over_pixels, "strong and weak", "equals the mean over pixels: the loss takes the max"),
    (check_separate_loss, separate_first_pair_only, "three objects", "only the first pair"),
    (check_separate_loss, separate_per_pixel_shape, "strong and weak", r"expected shape \(B,\) = \(1,\), got \(1, 5\)"),
    (check_separate_loss, separate_in_float16, "float16", "expected dtype torch.float32, got torch.float16"),
    (check_separate_loss, separate_cast_only_at_the_end, "float16", "off by about float16 precision"),
    (check_separate_loss, separate_detached, "strong and weak", "not connected to the maps"),
    (check_separate_loss, separate_that_crashes, "strong and weak", "your function raised IndexError"),
    (check_enhance_loss, enhance_without_smoothing, "strong and weak", "without smoothing"),
    (check_enhance_loss, enhance_textbook_kernel, "strong and weak",
     "you smoothed with the textbook kernel.*this course uses the reference reading"),
    (check_enhance_loss, enhance_min_max_swapped, "strong and weak", "min and max swapped"),
    (check_enhance_loss, enhance_without_one_minus, "strong and weak", "the loss is 1 - that peak"),
    (check_enhance_loss, enhance_mean_over_pixels, "strong and weak", "equals the mean over pixels: the loss takes the max"),
    (check_enhance_loss, enhance_zero_padding, "disjoint", "padded with zeros"),
    (check_enhance_loss, enhance_replicate_padding, "disjoint", "mode='replicate'"),
    (check_enhance_loss, enhance_per_object, "strong and weak", r"expected shape \(B,\) = \(1,\), got \(1, 2\) = \(B, K\)"),
    (check_enhance_loss, enhance_batch_mean, "strong and weak", "you returned a scalar"),
    (check_sepen_loss, lambda m: 0.5 * losses.separate_loss(m) + losses.enhance_loss(m), "strong and weak", "swapped"),
    (check_sepen_loss, losses.separate_loss, "strong and weak", "left out the enhance term"),
])
def test_wrong_answers_get_their_hint(check, wrong, case, hint):
    with pytest.raises(ExerciseError, match=f"fails case '{case}'") as failure:
        check(wrong)
    assert failure.match(hint)


def test_failure_message_shows_expected_and_obtained_values():
    with pytest.raises(ExerciseError) as failure:
        check_enhance_loss(enhance_without_one_minus)
    message = str(failure.value)
    first_case = exercises._cases()[0].maps
    expected, obtained = losses.enhance_loss(first_case).item(), enhance_without_one_minus(first_case).item()
    assert f"expected [{expected}] (shape (1,), torch.float32)" in message
    assert f"obtained [{obtained}] (shape (1,), torch.float32)" in message
    assert "a strong map (values up to 0.6) and a weak one" in message
    assert isinstance(failure.value, AssertionError)


@pytest.mark.parametrize("mistakes, check", [
    (exercises._separate_mistakes(), check_separate_loss),
    (exercises._enhance_mistakes("reference"), check_enhance_loss),
    (exercises._sepen_mistakes(1.0, 0.5, "reference"), check_sepen_loss),
])
def test_every_catalogued_mistake_is_caught_with_its_own_hint(mistakes, check):
    for hint, mistake in mistakes.items():
        with pytest.raises(ExerciseError) as failure:
            check(mistake)
        assert str(failure.value).endswith("hint: " + hint), (hint, str(failure.value))


def test_check_peaks_accepts_the_peak_and_explains_the_mean():
    import torch

    from sae_utils.exercises import check_peaks

    maps = torch.rand(2, 2, 4, 4)
    assert check_peaks(lambda m: m.amax(dim=(-2, -1)), maps) is True
    with pytest.raises(ExerciseError, match="mean of each map"):
        check_peaks(lambda m: m.mean(dim=(-2, -1)), maps)
    with pytest.raises(ExerciseError, match=r"shape \(2, 2\)"):
        check_peaks(lambda m: m.amax(), maps)

    def not_done(m):
        raise NotImplementedError

    assert check_peaks(not_done, maps) is False


def test_an_unfinished_exercise_says_so_instead_of_failing(capsys):
    def stub(maps):
        raise NotImplementedError("your code here")

    assert check_separate_loss(stub) is False and check_enhance_loss(stub) is False
    assert "Not done yet" in capsys.readouterr().out
