"""Synthetic attention maps, to see what the Separate and Enhance losses measure before touching a model.

    maps = two_blobs(distance=4, strength_a=0.5, strength_b=0.2)   # (1, 2, 16, 16): two Gaussian blobs
    separate_loss(maps), enhance_loss(maps)                        # from sae_utils.losses
    explore(interactive=True)                                      # sliders; a static grid without widgets

Each map plays the part of one object word's cross-attention probabilities: values in [0, 1], and at every
pixel the two maps together hold at most 1 (the other tokens, the start token first, take the rest).
"""
from __future__ import annotations

import importlib.util
import math
from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor

from .losses import enhance_loss, separate_loss
from .maps import overlap
from .viz import image_grid

BLOB_SIGMA = 2.0  # pixels; on a 16x16 map a blob then covers about a quarter of the width, like an object


def gaussian_blob(size: int, center: tuple[float, float], sigma: float = BLOB_SIGMA, strength: float = 0.5) -> Tensor:
    """One blob: strength * exp(-d^2 / (2 sigma^2)), d the distance to `center` = (row, column): (size, size).

    The peak equals `strength` when the centre sits on a pixel (integer coordinates).
    """
    if size < 2:
        raise ValueError(f"size must be >= 2 (the maps are size x size), got {size}")
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0 pixels, got {sigma}")
    if not 0 <= strength <= 1:
        raise ValueError(f"strength is the blob's peak probability: it must lie in [0, 1], got {strength}")
    row, column = center
    if not (0 <= row <= size - 1 and 0 <= column <= size - 1):
        raise ValueError(f"center {center} lies outside the {size}x{size} map: use coordinates in [0, {size - 1}]")
    rows = torch.arange(size, dtype=torch.float32)[:, None]
    columns = torch.arange(size, dtype=torch.float32)[None, :]
    squared = (rows - row) ** 2 + (columns - column) ** 2
    return strength * torch.exp(-squared / (2 * sigma**2))


def two_blobs(distance: float, strength_a: float = 0.5, strength_b: float = 0.5, size: int = 16,
              sigma: float = BLOB_SIGMA) -> Tensor:
    """Two objects' maps: blobs on the middle row, `distance` pixels apart: (1, 2, size, size).

    The pair stays centred, so sliding them together moves both. With an integer distance both centres sit
    on pixels, so each map peaks exactly at its strength. Like attention probabilities, the two maps may not
    hold more than 1 together at any pixel: strengths that would do so raise an error.
    """
    if not 0 <= distance <= size - 1:
        raise ValueError(f"distance must lie in [0, {size - 1}] pixels for {size}x{size} maps, got {distance}")
    row = size // 2
    column_a = math.floor((size - 1 - distance) / 2)
    blob_a = gaussian_blob(size, (row, column_a), sigma, strength_a)
    blob_b = gaussian_blob(size, (row, column_a + distance), sigma, strength_b)
    total = float((blob_a + blob_b).max())
    if total > 1 + 1e-6:
        raise ValueError(
            f"strengths {strength_a} and {strength_b} at distance {distance} give the two maps {total:.3f} together at "
            "one pixel, but two words' attention probabilities at one pixel add up to at most 1. Lower the "
            "strengths (e.g. strength_a + strength_b <= 1) or move the blobs apart.")
    return torch.stack([blob_a, blob_b])[None]


def pair_colours(maps: Tensor, vmax: float | None = None) -> np.ndarray:
    """Two maps per image as one colour picture: first map red, second blue, overlap magenta.

    maps: (N, 2, H, W). Both maps share one scale, 0..vmax (default: the largest value of all the maps), so a
    fading map looks darker, unlike a per-map normalisation. Returns (N, H, W, 3) floats in [0, 1].
    """
    if maps.ndim != 4 or maps.shape[1] != 2:
        raise ValueError(f"pair_colours needs maps of shape (N, 2, H, W), got {tuple(maps.shape)}; "
                         "for one pair add the batch axis with maps[None]")
    maps = maps.detach().float().cpu()
    scale = float(maps.max()) if vmax is None else vmax
    scaled = (maps / max(scale, 1e-12)).clamp(0, 1)
    rgb = torch.stack([scaled[:, 0], torch.zeros_like(scaled[:, 0]), scaled[:, 1]], dim=-1)
    return rgb.numpy()


def loss_title(maps: Tensor) -> str:
    """'sep 0.123 · en 0.456' for one pair, maps: (1, 2, H, W) (the losses' default kernel)."""
    return f"sep {float(separate_loss(maps)[0]):.3f} · en {float(enhance_loss(maps)[0]):.3f}"


def sweep_figure(x: Sequence[float], curves: dict[str, Sequence[float]], xlabel: str,
                 right: dict[str, Sequence[float]] | None = None, right_label: str = "", title: str = "",
                 size: tuple[float, float] = (5.5, 3.2)) -> Figure:
    """Curves against one swept quantity; `right` curves (another scale, e.g. overlap) on a second y axis."""
    fig, ax = plt.subplots(figsize=size, layout="constrained")
    plt.close(fig)  # the notebook shows the returned figure once
    for label, values in curves.items():
        ax.plot(x, values, marker="o", markersize=3, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if right:
        twin = ax.twinx()
        for label, values in right.items():
            twin.plot(x, values, color="gray", linestyle="--", label=label)
        twin.set_ylabel(right_label)
        more = twin.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    ax.legend(handles, labels, fontsize=8)
    ax.set_title(title, fontsize=10)
    return fig


def pair_panel(maps: Tensor) -> Figure:
    """One pair in three panels: map A, map B (one shared scale), and M_A M_B / (M_A + M_B), whose largest
    value (marked x) is the separate loss. maps: (1, 2, H, W)."""
    maps = maps.detach().float().cpu()
    a, b = maps[0, 0], maps[0, 1]
    total = a + b
    ratio = torch.where(total > 0, a * b / torch.where(total > 0, total, 1.0), 0.0)
    fig, axes = plt.subplots(1, 3, figsize=(7.5, 2.8), layout="constrained")
    plt.close(fig)
    vmax = max(float(maps.max()), 1e-12)
    for ax, amap, name in zip(axes, (a, b, ratio), ("map A", "map B", "A·B / (A+B)")):
        shown = ax.imshow(amap.numpy(), cmap="viridis", vmin=0, vmax=vmax if name != "A·B / (A+B)" else None)
        ax.set_title(f"{name}\npeak {float(amap.max()):.3f}", fontsize=9)
        ax.set_axis_off()
        fig.colorbar(shown, ax=ax, shrink=0.75)
    row, column = divmod(int(ratio.argmax()), ratio.shape[1])
    axes[2].plot(column, row, "rx", markersize=10, markeredgewidth=2)
    overlap_value = float(overlap(maps)[0])
    fig.suptitle(f"{loss_title(maps)} · overlap {overlap_value:.2f}", fontsize=10)
    return fig


def explore(interactive: bool = True, distances: Sequence[float] = (12, 8, 4, 0),
            weak_strengths: Sequence[float] = (0.5, 0.2, 0.05, 0.0), fade_distance: float = 8):
    """Move and fade two blobs and watch both losses.

    interactive (with ipywidgets in a running kernel): sliders for the distance and the two strengths,
    returning the widget. Otherwise a static Figure: the pair sliding together (first row, both strengths
    0.5) and blob B fading at `fade_distance` (second row), each titled with its losses.
    """
    if interactive and _in_kernel():
        # the sliders draw only in a running kernel: the static grid too, so the executed notebook keeps a figure
        from IPython.display import display

        display(explore(interactive=False, distances=distances, weak_strengths=weak_strengths,
                        fade_distance=fade_distance))
        return _explore_widget()
    sliding = [two_blobs(d) for d in distances]
    fading = [two_blobs(fade_distance, 0.5, s) for s in weak_strengths]
    titles = [f"distance {d:g}\n{loss_title(m)}" for d, m in zip(distances, sliding)]
    titles += [f"B at {s:g}\n{loss_title(m)}" for s, m in zip(weak_strengths, fading)]
    pictures = pair_colours(torch.cat(sliding + fading), vmax=0.5)
    fig = image_grid(pictures, titles=titles, columns=max(len(distances), len(weak_strengths)), size=2.0)
    fig.suptitle("A red, B blue (overlap: magenta). Row 1: sliding together; row 2: B fading", fontsize=9)
    return fig


def _in_kernel() -> bool:
    if importlib.util.find_spec("ipywidgets") is None or importlib.util.find_spec("IPython") is None:
        return False
    from IPython import get_ipython

    return getattr(get_ipython(), "kernel", None) is not None


def _explore_widget():
    import ipywidgets as widgets
    from IPython.display import display

    distance = widgets.IntSlider(value=6, min=0, max=15, description="distance")
    strength_a = widgets.FloatSlider(value=0.5, min=0.0, max=1.0, step=0.05, description="strength A")
    strength_b = widgets.FloatSlider(value=0.5, min=0.0, max=1.0, step=0.05, description="strength B")
    out = widgets.Output()

    def draw(_=None):
        with out:
            out.clear_output(wait=True)
            try:
                maps = two_blobs(distance.value, strength_a.value, strength_b.value)
            except ValueError as error:  # strengths too large for attention probabilities: say why
                print(error)
                return
            display(pair_panel(maps))

    for slider in (distance, strength_a, strength_b):
        slider.observe(draw, "value")
    draw()
    return widgets.VBox([widgets.HBox([distance, strength_a, strength_b]), out])
