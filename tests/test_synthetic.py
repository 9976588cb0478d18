"""Tests for sae_utils.synthetic: the blobs are what they claim, and the losses move on them as the notebook says."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from sae_utils.losses import enhance_loss, separate_loss
from sae_utils.maps import overlap
from sae_utils.synthetic import explore, gaussian_blob, loss_title, pair_colours, pair_panel, sweep_figure, two_blobs



# ---------- the maps ----------

def test_blob_peaks_at_its_centre_with_its_strength_and_falls_off_as_a_gaussian():
    blob = gaussian_blob(16, (5, 9), sigma=2.0, strength=0.3)
    assert blob.shape == (16, 16) and blob.dtype == torch.float32
    assert divmod(int(blob.argmax()), 16) == (5, 9)
    assert blob.max().item() == pytest.approx(0.3)
    assert blob[5, 11].item() == pytest.approx(0.3 * math.exp(-4 / 8))  # 2 pixels away: exp(-d^2 / (2 sigma^2))
    assert blob[3, 9].item() == pytest.approx(blob[5, 11].item())  # round, not elongated


@pytest.mark.parametrize("kwargs, message", [
    (dict(size=1, center=(0, 0)), "size must be >= 2"),
    (dict(size=16, center=(8, 8), sigma=0.0), "sigma must be > 0"),
    (dict(size=16, center=(8, 8), strength=1.5), r"strength .* \[0, 1\]"),
    (dict(size=16, center=(8, 16)), "outside the 16x16 map"),
])
def test_blob_rejects_bad_input_with_the_reason(kwargs, message):
    with pytest.raises(ValueError, match=message):
        gaussian_blob(**kwargs)


@pytest.mark.parametrize("distance", [0, 3, 8, 15])
def test_two_blobs_are_distance_apart_with_their_strengths(distance):
    maps = two_blobs(distance, 0.4, 0.2)
    assert maps.shape == (1, 2, 16, 16)
    column_a, column_b = (int(maps[0, k].max(dim=0).values.argmax()) for k in range(2))
    assert column_b - column_a == distance
    assert maps[0, 0].max().item() == pytest.approx(0.4)
    assert maps[0, 1].max().item() == pytest.approx(0.2)


def test_two_blobs_hold_like_attention_probabilities():
    for distance in range(16):
        maps = two_blobs(distance, 0.5, 0.5)
        assert maps.min() >= 0 and maps.sum(dim=1).max() <= 1 + 1e-6


def test_two_blobs_at_distance_zero_are_one_map_twice():
    maps = two_blobs(0)
    torch.testing.assert_close(maps[0, 0], maps[0, 1])


def test_two_blobs_refuse_more_than_one_unit_of_attention_at_a_pixel():
    with pytest.raises(ValueError, match="add up to at most 1"):
        two_blobs(0, 0.6, 0.6)
    assert two_blobs(15, 0.6, 0.6).sum(dim=1).max() <= 1  # far apart the same strengths are fine


def test_two_blobs_reject_a_distance_that_does_not_fit():
    with pytest.raises(ValueError, match=r"distance must lie in \[0, 15\]"):
        two_blobs(16)


# ---------- the losses on them: what the notebook's sweeps show ----------

def test_separate_loss_falls_as_the_blobs_move_apart_and_enhance_does_not_move():
    sweep = torch.cat([two_blobs(d) for d in range(16)])
    separate = separate_loss(sweep)
    assert separate[0].item() == pytest.approx(0.25)  # identical maps of peak 0.5: 0.5 * 0.5 / (0.5 + 0.5)
    assert (separate[1:] < separate[:-1]).all()
    assert (overlap(sweep)[1:] < overlap(sweep)[:-1]).all()
    enhance = enhance_loss(sweep)
    torch.testing.assert_close(enhance, enhance[:1].expand(16))  # each map's own peak: position does not matter


def test_enhance_loss_falls_as_the_weak_blob_strengthens_and_is_one_without_it():
    strengths = torch.linspace(0, 0.5, 11).tolist()
    enhance = enhance_loss(torch.cat([two_blobs(8, 0.5, s) for s in strengths]))
    assert enhance[0].item() == pytest.approx(1.0)
    assert (enhance[1:] < enhance[:-1]).all()
    # a faded blob also lowers the separate loss: it alone cannot tell "apart" from "gone"
    assert separate_loss(two_blobs(8, 0.5, 0.0)).item() == 0.0


# ---------- pictures ----------

def test_pair_colours_put_a_in_red_b_in_blue_on_one_scale():
    maps = two_blobs(8, 0.5, 0.25)
    rgb = pair_colours(maps)
    assert rgb.shape == (1, 16, 16, 3)
    np.testing.assert_allclose(rgb[0, ..., 0], maps[0, 0].numpy() / 0.5, atol=1e-6)
    np.testing.assert_allclose(rgb[0, ..., 2], maps[0, 1].numpy() / 0.5, atol=1e-6)
    assert rgb[..., 1].max() == 0 and rgb[0, ..., 2].max() == pytest.approx(0.5)  # the weak blob looks weaker
    with pytest.raises(ValueError, match=r"\(N, 2, H, W\)"):
        pair_colours(maps[0])


def test_loss_title_reports_both_losses():
    maps = two_blobs(0)
    assert loss_title(maps) == f"sep 0.250 · en {enhance_loss(maps).item():.3f}"


def test_sweep_figure_draws_every_curve_and_a_second_axis_for_the_right_ones():
    fig = sweep_figure([0, 1, 2], {"separate": [0.3, 0.2, 0.1], "enhance": [0.5] * 3}, "distance",
                       right={"overlap": [1.0, 0.5, 0.1]}, right_label="overlap")
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    assert [line.get_label() for line in fig.axes[0].lines] == ["separate", "enhance"]
    assert [line.get_label() for line in fig.axes[1].lines] == ["overlap"]
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["separate", "enhance", "overlap"]


def test_pair_panel_marks_the_pixel_that_sets_the_separate_loss():
    maps = two_blobs(4, 0.5, 0.3)
    fig = pair_panel(maps)
    ratio_axis = fig.axes[2]
    column, row = (float(v[0]) for v in ratio_axis.lines[0].get_data())
    a, b = maps[0]
    ratio = a * b / (a + b)
    assert ratio[int(row), int(column)].item() == pytest.approx(separate_loss(maps).item())
    assert "sep" in fig.get_suptitle() and "overlap" in fig.get_suptitle()


def test_explore_without_a_kernel_is_a_static_grid_of_both_sweeps():
    fig = explore(interactive=True)  # pytest runs no notebook kernel: the static figure
    titles = [ax.get_title() for ax in fig.axes]
    assert len(titles) == 8
    assert titles[3].startswith("distance 0") and "sep 0.250" in titles[3]
    assert titles[7].startswith("B at 0") and "en 1.000" in titles[7]


def test_explore_in_a_kernel_gives_sliders_that_redraw_and_explain_impossible_strengths(monkeypatch, capsys):
    import sae_utils.synthetic as synthetic

    monkeypatch.setattr(synthetic, "_in_kernel", lambda: True)
    import IPython.display

    displayed = []
    real_display = IPython.display.display
    monkeypatch.setattr(IPython.display, "display", lambda obj: displayed.append(obj) or real_display(obj))
    widget = synthetic.explore(interactive=True)
    # the static grid of both sweeps is shown beside the sliders: the executed notebook keeps a figure
    assert len(displayed[0].axes) == 8 and "sliding together" in displayed[0]._suptitle.get_text()
    distance, strength_a, strength_b = widget.children[0].children
    assert [s.description for s in (distance, strength_a, strength_b)] == ["distance", "strength A", "strength B"]
    capsys.readouterr()
    distance.value, strength_a.value, strength_b.value = 0, 0.8, 0.8  # 1.6 at one pixel: not probabilities
    assert "add up to at most 1" in capsys.readouterr().out
    strength_a.value = 0.2  # back to valid maps: a figure again, no error text
    redrawn = capsys.readouterr().out
    assert "Figure" in redrawn and "add up to at most 1" not in redrawn
