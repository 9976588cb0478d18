"""Tests for sae_utils.losses: hand-computed values, properties (hypothesis), errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from sae_utils.losses import (
    attend_and_excite_loss,
    attend_and_excite_token_maps,
    enhance_loss,
    gaussian_kernel_3x3,
    object_peaks,
    separate_loss,
    sepen_loss,
    sepen_loss_terms,
    smooth,
    stack_object_maps,
)

FAST = settings(max_examples=25, deadline=None)
E = math.e
# 1-D weights of the two readings, sigma 0.5, offsets -1, 0, 1:
#   reference: exp(-(x/1)^2)   -> (e^-1, 1, e^-1) / (1 + 2 e^-1) = 0.21194, 0.57612, 0.21194
#   textbook:  exp(-x^2/0.5)   -> (e^-2, 1, e^-2) / (1 + 2 e^-2) = 0.10651, 0.78699, 0.10651
REF_CENTRE = 1 / (1 + 2 / E)
TEXTBOOK_CENTRE = 1 / (1 + 2 / E**2)



def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


# ---------- the kernel ----------

@pytest.mark.parametrize("reading, side, centre", [("reference", 0.2119, 0.5761), ("textbook", 0.1065, 0.7870)])
def test_kernel_weights_of_both_readings(reading, side, centre):
    kernel = gaussian_kernel_3x3(0.5, reading)
    weights = kernel.sum(dim=0)  # the 1-D weights, since the 1-D weights sum to 1
    assert kernel.shape == (3, 3) and kernel.dtype == torch.float32
    assert weights.tolist() == pytest.approx([side, centre, side], abs=1e-4)
    assert torch.allclose(kernel, torch.outer(weights, weights), atol=1e-7)
    assert kernel.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert kernel[0, 0].item() == pytest.approx(side * side, abs=1e-4)


def test_kernel_unknown_reading_lists_both():
    with pytest.raises(ValueError, match="reference.*textbook"):
        gaussian_kernel_3x3(0.5, "scipy")


def test_smooth_uses_reflect_padding():
    # Each row is [1, 0, 0]; reflect pads column -1 with column 1 (= 0) and rows with the
    # other (identical) row, so pixel (r, 0) = w_side*0 + w_centre*1 + w_side*0 = 0.57612,
    # pixel (r, 1) = w_side*1 = 0.21194, pixel (r, 2) = 0. (Zero padding would give 0.788*0.576
    # at (r, 0), replicate padding 0.788.)
    maps = t([[1, 0, 0], [1, 0, 0]])[None, None]
    expected = t([[REF_CENTRE, 1 - REF_CENTRE - (1 - REF_CENTRE) / 2, 0]] * 2)  # (1-c)/2 = w_side
    assert torch.allclose(smooth(maps)[0, 0], expected, atol=1e-6)


# ---------- hand-computed values ----------

def test_separate_loss_two_maps_by_hand():
    # pixel:        (0,0)      (0,1)           (1,0)        (1,1)
    # M1 M2:        1*0=0      .5*.5=.25       0*.25=0      0
    # M1 + M2:      1          1               .25          0  (0/0 -> 0)
    # ratio:        0          .25             0            0      -> max = 0.25
    maps = t([[[1.0, 0.5], [0.0, 0.0]], [[0.0, 0.5], [0.25, 0.0]]])[None]
    assert separate_loss(maps).item() == pytest.approx(0.25, abs=1e-6)


def test_separate_loss_three_maps_averages_pairs_by_hand():
    # M1 = [.6, .2], M2 = [.2, .6], M3 = [0, .3]
    # (1,2): [.12/.8, .12/.8] = [.15, .15] -> .15
    # (1,3): [0/.6, .06/.5]   = [0, .12]   -> .12
    # (2,3): [0/.2, .18/.9]   = [0, .2]    -> .2        mean = .47 / 3 = 0.156667
    maps = t([[[0.6, 0.2]], [[0.2, 0.6]], [[0.0, 0.3]]])[None]
    assert separate_loss(maps).item() == pytest.approx(0.47 / 3, abs=1e-6)


def test_separate_loss_identical_maps_is_half_the_peak():
    # M*M/(M+M) = M/2, so the loss is max(M)/2 = 0.45
    one = t([[0.1, 0.9], [0.3, 0.0]])
    assert separate_loss(torch.stack([one, one])[None]).item() == pytest.approx(0.45, abs=1e-6)


@pytest.mark.parametrize("reading, expected", [("reference", 1 - REF_CENTRE**2), ("textbook", 0.5)])
def test_enhance_loss_by_hand(reading, expected):
    # M1: a 1 at the centre of a 3x3 map -> smoothed peak = w_centre^2
    #     reference 0.57612^2 = 0.33191; textbook 0.78699^2 = 0.61935
    # M2: 0.5 everywhere -> stays 0.5 (normalised kernel, reflect padding)
    # loss = 1 - min(peaks): reference 1 - 0.33191 = 0.66809; textbook 1 - 0.5 = 0.5
    centre = torch.zeros(3, 3)
    centre[1, 1] = 1
    maps = torch.stack([centre, torch.full((3, 3), 0.5)])[None]
    assert enhance_loss(maps, reading=reading).item() == pytest.approx(expected, abs=1e-6)
    assert object_peaks(maps, reading=reading)[0, 1].item() == pytest.approx(0.5, abs=1e-6)


def test_sepen_loss_weights_its_terms():
    # the hand case above: separate = 0.25; enhance of those 2x2 maps, total = 1.0*sep + 0.5*en
    maps = t([[[1.0, 0.5], [0.0, 0.0]], [[0.0, 0.5], [0.25, 0.0]]])[None]
    terms = sepen_loss_terms(maps)
    assert terms.separate.item() == pytest.approx(0.25, abs=1e-6)
    assert terms.enhance.item() == pytest.approx(enhance_loss(maps).item(), abs=1e-7)
    assert terms.total.item() == pytest.approx(0.25 + 0.5 * terms.enhance.item(), abs=1e-6)
    assert torch.equal(sepen_loss(maps), terms.total)
    assert sepen_loss(maps, 2.0, 3.0).item() == pytest.approx(0.5 + 3 * terms.enhance.item(), abs=1e-6)


# ---------- Attend-and-Excite ----------

def test_attend_and_excite_softmax_over_prompt_tokens_only():
    # image 0, n=2: tokens 1, 2 -> logits 100*[.01, .02] = [1, 2] -> [1, e] / (1 + e)
    # image 1, n=3: tokens 1..3 -> logits [1, 2, 3] -> [1, e, e^2] / (1 + e + e^2)
    # start (0), end (n+1) and padding tokens are 0.
    probs = t([[0.5, 0.01, 0.02, 0.3, 0.17], [0.4, 0.01, 0.02, 0.03, 0.54]])[:, :, None, None]
    out = attend_and_excite_token_maps(probs, torch.tensor([2, 3]))[:, :, 0, 0]
    s = 1 + E + E**2
    expected = t([[0, 1 / (1 + E), E / (1 + E), 0, 0], [0, 1 / s, E / s, E**2 / s, 0]])
    assert out.shape == (2, 5)
    assert torch.allclose(out, expected, atol=1e-6)


def test_attend_and_excite_loss_is_one_minus_weakest_peak():
    # constant maps stay constant when smoothed: peaks 0.3 and 0.8 -> max(1 - .3, 1 - .8) = 0.7
    maps = torch.stack([torch.full((2, 2), 0.3), torch.full((2, 2), 0.8)])[None]
    assert attend_and_excite_loss(maps).item() == pytest.approx(0.7, abs=1e-6)


def test_attend_and_excite_rejects_token_counts_out_of_range():
    probs = torch.full((1, 5, 2, 2), 0.2)
    with pytest.raises(ValueError, match="1..3"):
        attend_and_excite_token_maps(probs, [4])
    with pytest.raises(ValueError, match="one per image"):
        attend_and_excite_token_maps(probs, [2, 2])


# ---------- properties ----------

@st.composite
def object_maps(draw, min_objects: int = 2, max_objects: int = 4) -> torch.Tensor:
    """(B, K, H, W) float32 maps with values in [0, 1], zeros included."""
    shape = (draw(st.integers(1, 2)), draw(st.integers(min_objects, max_objects)),
             draw(st.integers(2, 5)), draw(st.integers(2, 5)))
    values = st.one_of(st.just(0.0), st.floats(0, 1, width=32))
    return torch.from_numpy(draw(hnp.arrays(np.float32, shape, elements=values)))


@FAST
@given(object_maps(), st.data())
def test_losses_ignore_object_order(maps, data):
    order = data.draw(st.permutations(range(maps.shape[1])))
    permuted = maps[:, list(order)]
    assert torch.allclose(separate_loss(permuted), separate_loss(maps), atol=1e-6)
    assert torch.equal(enhance_loss(permuted), enhance_loss(maps))


@FAST
@given(object_maps())
def test_separate_loss_is_zero_for_disjoint_maps(maps):
    owner = maps.argmax(dim=1, keepdim=True)  # each pixel keeps at most one object
    disjoint = maps * (torch.arange(maps.shape[1])[None, :, None, None] == owner)
    assert torch.equal(separate_loss(disjoint), torch.zeros(maps.shape[0]))


@FAST
@given(object_maps(min_objects=1))
def test_bounds_for_maps_in_unit_interval(maps):
    enhance = enhance_loss(maps)
    assert ((enhance >= -1e-6) & (enhance <= 1 + 1e-6)).all()
    if maps.shape[1] >= 2:
        separate = separate_loss(maps)
        assert ((separate >= 0) & (separate <= maps.amax(dim=(1, 2, 3)) / 2 + 1e-7)).all()


@FAST
@given(width=st.integers(6, 12), spread=st.floats(0.5, 3.0), strengths=st.tuples(st.floats(0.05, 1), st.floats(0.05, 1)),
       start=st.integers(0, 5), row_shift=st.integers(0, 2))
def test_separate_loss_grows_as_blobs_overlap(width, spread, strengths, start, row_shift):
    # blob 1 stays at column `start`; blob 2 slides from the far edge onto it
    offsets = torch.arange(-width, width + 1, dtype=torch.float32)
    profile = torch.exp(-(offsets**2) / (2 * spread**2))  # a lookup table: equal offsets, equal values

    def blob(strength: float, column: int, shift: int) -> torch.Tensor:
        columns = profile[width + torch.arange(width) - column]  # (W,)
        return strength * profile[width + torch.arange(4) - shift][:, None] * columns

    start = min(start, width - 1)
    losses = [separate_loss(torch.stack([blob(strengths[0], start, 0), blob(strengths[1], column, row_shift)])[None]).item()
              for column in range(width - 1, start - 1, -1)]
    assert all(later >= earlier - 1e-7 for earlier, later in zip(losses, losses[1:])), losses
    assert losses[-1] > losses[0] or width - 1 == start


@FAST
@given(object_maps(max_objects=2), st.lists(st.floats(0, 1), min_size=2, max_size=6))
def test_enhance_loss_falls_as_the_weaker_peak_grows(maps, strengths):
    strong, shape = maps[:, :1], maps[:, 1:2]
    losses = [enhance_loss(torch.cat([strong, s * shape], dim=1)) for s in sorted(strengths)]
    for earlier, later in zip(losses, losses[1:]):
        assert (later <= earlier + 1e-6).all()
    # while the second map is the weaker one, the loss is exactly 1 - its peak
    s = min(strengths)
    weak_peak = object_peaks(s * shape)[:, 0]
    weaker = weak_peak <= object_peaks(strong)[:, 0]
    assert torch.allclose(losses[0][weaker], 1 - weak_peak[weaker], atol=1e-6)


@FAST
@given(object_maps())
def test_gradients_flow_and_are_finite(maps):
    for candidate in (maps, torch.zeros_like(maps), 1e-40 * maps):
        leaf = candidate.clone().requires_grad_(True)
        loss = sepen_loss(leaf).sum() + attend_and_excite_loss(leaf).sum()
        loss.backward()
        assert leaf.grad is not None and torch.isfinite(leaf.grad).all()


def test_gradient_of_separate_loss_points_at_the_overlap():
    # the only overlapping pixel is (0, 1); d/dM1 of M1 M2/(M1+M2) = (M2/(M1+M2))^2 = 0.25 there
    maps = t([[[1.0, 0.5], [0.0, 0.0]], [[0.0, 0.5], [0.25, 0.0]]])[None].requires_grad_(True)
    separate_loss(maps).sum().backward()
    expected = torch.zeros(2, 2, 2)
    expected[:, 0, 1] = 0.25
    assert torch.allclose(maps.grad[0], expected, atol=1e-6)


@FAST
@given(object_maps(), st.sampled_from([torch.float16, torch.bfloat16]))
def test_half_precision_input_is_computed_in_float32(maps, dtype):
    low = maps.to(dtype)
    for loss in (separate_loss, enhance_loss, sepen_loss, attend_and_excite_loss):
        out = loss(low)
        assert out.dtype == torch.float32
        assert torch.equal(out, loss(low.float()))


# ---------- errors that teach ----------

def test_rejects_wrong_number_of_dimensions():
    with pytest.raises(ValueError, match=r"4-D \(B, K, H, W\).*maps\[None\]"):
        separate_loss(torch.rand(2, 4, 4))
    with pytest.raises(ValueError, match="4-D"):
        enhance_loss(torch.rand(1, 2, 3, 4, 4))


@pytest.mark.parametrize("loss", [separate_loss, sepen_loss])
def test_rejects_a_single_object(loss):
    with pytest.raises(ValueError, match="K >= 2"):
        loss(torch.rand(1, 1, 4, 4))


def test_rejects_integer_and_nan_and_negative_maps():
    with pytest.raises(TypeError, match="floating"):
        enhance_loss(torch.ones(1, 2, 4, 4, dtype=torch.int64))
    nan_maps = torch.rand(1, 2, 4, 4)
    nan_maps[0, 1, 2, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        separate_loss(nan_maps)
    with pytest.raises(ValueError, match="negative"):
        sepen_loss(-torch.rand(1, 2, 4, 4))


def test_smooth_rejects_maps_too_small_to_reflect():
    with pytest.raises(ValueError, match="H, W >= 2"):
        enhance_loss(torch.rand(1, 2, 1, 4))


def test_stack_object_maps():
    first, second = torch.rand(3, 16, 16), torch.rand(3, 16, 16)
    stacked = stack_object_maps([first, second])
    assert stacked.shape == (3, 2, 16, 16)
    assert torch.equal(stacked[:, 1], second)
    with pytest.raises(ValueError, match=r"differ in shape.*\(3, 16, 16\).*\(3, 8, 8\)"):
        stack_object_maps([first, torch.rand(3, 8, 8)])
    with pytest.raises(ValueError, match="differ in shape"):
        stack_object_maps([first, torch.rand(2, 16, 16)])
    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        stack_object_maps([first[None], second[None]])
    with pytest.raises(ValueError, match="non-empty"):
        stack_object_maps([])
