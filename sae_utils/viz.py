"""Pictures of cross-attention: image grids, token and word heat maps, a step/layer browser, loss curves.

    image_grid(images, titles)                          # the generated images
    token_heatmaps(image, token_maps[i], prompt_tokens(tokenizer, prompt))
    word_heatmaps(image, word_maps[i], ["cat", "dog"])  # plus both maps as colour channels
    print(attention_report(word_maps, ["cat", "dog"]))  # peaks, peak ratio, overlap, in words
    browse_maps(store, image, tokens)                   # sliders for step and layer, or a static grid

Every function returns a matplotlib Figure (browse_maps may return a widget) and never calls plt.show:
a notebook displays the returned figure once, a test inspects its axes.
"""
from __future__ import annotations

import importlib.util
import re
from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from PIL import Image

from .maps import attention_stats
from .tokens import check_prompt_length

NEGLECT_RATIO = 0.5  # weakest/strongest peak below this: the weak object is likely dropped (rule of thumb)
HIGH_OVERLAP = 0.5  # overlap (soft IoU of peak-normalised maps) above this: the objects may blend (rule of thumb)
HEAT_CMAP = "jet"


# ----------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------
def _figure(panels: int, columns: int | None, size: float, max_columns: int = 8) -> tuple[Figure, list]:
    """A figure with exactly `panels` axes on a grid; pyplot forgets it so that a notebook shows it once."""
    columns = max(1, min(columns or min(panels, max_columns), panels))
    rows = -(-panels // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(columns * size, rows * size + 0.4), squeeze=False,
                             layout="constrained")
    plt.close(fig)
    axes = list(axes.flat)
    for ax in axes[panels:]:
        ax.remove()
    for ax in axes[:panels]:
        ax.set_axis_off()
    return fig, axes[:panels]


def _as_image(image) -> np.ndarray:
    """A PIL image, or an (H, W), (H, W, 3|4) uint8 / float-in-[0, 1] array or tensor -> a numpy array."""
    if isinstance(image, Image.Image):
        return np.asarray(image)
    array = image.detach().float().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.ndim == 3 and array.shape[-1] not in (3, 4) and array.shape[0] in (1, 3):
        raise ValueError(f"The image has shape {array.shape}, channels first; matplotlib needs (H, W, 3): "
                         "use image.permute(1, 2, 0) (torch) or image.transpose(1, 2, 0) (numpy).")
    if array.ndim not in (2, 3):
        raise ValueError(f"An image must be (H, W) or (H, W, 3), got shape {array.shape}.")
    if array.dtype != np.uint8 and (array.min() < 0 or array.max() > 1):
        raise ValueError(f"A float image must lie in [0, 1], got [{array.min():.3g}, {array.max():.3g}]. "
                         "Rescale it ((x + 1) / 2 for [-1, 1] outputs) or convert it to uint8.")
    return array


def _show(ax, image: np.ndarray) -> None:
    # nearest-neighbour when the panel is larger than the image, so 32 px toy images stay crisp
    ax.imshow(image, cmap="gray" if image.ndim == 2 else None, interpolation="nearest")


def _as_maps(maps, ndim: int, shape: str, hint: str) -> torch.Tensor:
    maps = torch.as_tensor(maps).detach().float().cpu()
    if maps.ndim != ndim:
        raise ValueError(f"Expected maps of shape {shape}, got {tuple(maps.shape)}. {hint}")
    return maps


def _upsample(amap: torch.Tensor, hw: tuple[int, int]) -> np.ndarray:
    """(h, w) -> (H, W), bilinear."""
    return F.interpolate(amap[None, None], size=hw, mode="bilinear", align_corners=False)[0, 0].numpy()


def _overlay(ax, image: np.ndarray, amap: torch.Tensor, vmax: float, alpha: float) -> None:
    _show(ax, image)
    ax.imshow(_upsample(amap, image.shape[:2]), cmap=HEAT_CMAP, alpha=alpha, vmin=0.0, vmax=max(vmax, 1e-12),
              interpolation="nearest")


def short_layer_name(layer: str) -> str:
    """'down_blocks.2.attentions.1.transformer_blocks.0.attn2' -> 'down2.1' (block, then attention index)."""
    match = re.match(r"(down|up)_blocks\.(\d+)\.attentions\.(\d+)", layer)
    if match:
        return f"{match[1]}{match[2]}.{match[3]}"
    return "mid" if layer.startswith("mid_block") else layer


# ----------------------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------------------
def image_grid(images, titles: Sequence[str] | None = None, columns: int | None = None,
               size: float = 2.0) -> Figure:
    """A grid of images, one panel each.

    images: a list of PIL images / (H, W, 3) arrays, or an (N, H, W, 3) array, uint8 or float in [0, 1].
    titles: N strings or None. columns: default min(N, 8). size: inches per panel.
    """
    if isinstance(images, (np.ndarray, torch.Tensor)):
        if images.ndim != 4:
            raise ValueError(f"An array of images must be (N, H, W, 3), got shape {tuple(images.shape)}; "
                             "wrap a single image in a list: image_grid([image]).")
        images = list(images)
    images = [_as_image(im) for im in images]
    if not images:
        raise ValueError("image_grid got no images.")
    if titles is not None and len(titles) != len(images):
        raise ValueError(f"{len(titles)} titles for {len(images)} images: give one title per image.")
    fig, axes = _figure(len(images), columns, size)
    for i, (ax, image) in enumerate(zip(axes, images)):
        _show(ax, image)
        if titles is not None:
            ax.set_title(titles[i], fontsize=9)
    return fig


# ----------------------------------------------------------------------------------------------------------
# Heat maps
# ----------------------------------------------------------------------------------------------------------
def prompt_tokens(tokenizer, prompt: str, start: bool = False, end: bool = False) -> list[tuple[int, str]]:
    """The prompt's tokens as (position, text), position in the 77-token sequence (0 = start token).

    Padding is never listed; the start and end tokens only on request, as '<start>' and '<end>'. The
    word-end marker '</w>' is stripped: 'hippopotamus' gives (5, 'hippo'), (6, 'potam'), (7, 'us').
    """
    check_prompt_length(tokenizer, prompt)
    ids = tokenizer(prompt).input_ids  # unpadded: start, the prompt's tokens, end
    tokens = []
    for position, (token_id, piece) in enumerate(zip(ids, tokenizer.convert_ids_to_tokens(ids))):
        if token_id == tokenizer.bos_token_id:
            tokens += [(position, "<start>")] if start else []
        elif token_id == tokenizer.eos_token_id:
            tokens += [(position, "<end>")] if end else []
        else:
            tokens.append((position, piece.removesuffix("</w>")))
    return tokens


def token_heatmaps(image, token_maps, tokens: Sequence[tuple[int, str]], normalize: str = "each",
                   alpha: float = 0.6, columns: int | None = None, size: float = 2.0) -> Figure:
    """The image, then one panel per token: its map upsampled (bilinear) and overlaid, titled text and peak.

    token_maps: (T, h, w), one image's maps, e.g. `store.token_maps()[i]`. tokens: (position, text) pairs,
    e.g. from `prompt_tokens`. normalize: "each" (each map's colours span 0..its own peak: shapes) or
    "shared" (one scale for all: which token gets more attention).
    """
    image = _as_image(image)
    token_maps = _as_maps(token_maps, 3, "(T, h, w)", "Pass one image's maps: store.token_maps()[i].")
    if normalize not in ("each", "shared"):
        raise ValueError(f"normalize={normalize!r}: use 'each' (a scale per map) or 'shared' (one scale).")
    bad = [p for p, _ in tokens if not 0 <= p < token_maps.shape[0]]
    if bad:
        raise ValueError(f"Token positions {bad} are outside the {token_maps.shape[0]} maps.")
    chosen = [token_maps[p] for p, _ in tokens]
    shared_max = max((float(m.max()) for m in chosen), default=1.0)
    fig, axes = _figure(1 + len(tokens), columns, size)
    _show(axes[0], image)
    axes[0].set_title("image", fontsize=9)
    for ax, (position, text), amap in zip(axes[1:], tokens, chosen):
        peak = float(amap.max())
        _overlay(ax, image, amap, peak if normalize == "each" else shared_max, alpha)
        ax.set_title(f"{text} [{position}]\npeak {peak:.3f}", fontsize=9)
    return fig


def word_heatmaps(image, word_maps, words: Sequence[str], alpha: float = 0.6, size: float = 2.0) -> Figure:
    """The image, one overlay per word (titled word and peak), and, for 2+ words, their maps as colours.

    word_maps: (K, h, w), one image's maps, e.g. `store.word_maps(prompt, words)[i]`. The last panel puts
    the first three words' maps, each divided by its peak, in the red, blue and green channels: where two
    objects attend to the same pixels the colours mix (red + blue = magenta).
    """
    image = _as_image(image)
    word_maps = _as_maps(word_maps, 3, "(K, h, w)", "Pass one image's maps: store.word_maps(prompt, words)[i].")
    if len(words) != word_maps.shape[0]:
        raise ValueError(f"{len(words)} words for {word_maps.shape[0]} maps: give one word per map.")
    together = len(words) >= 2
    fig, axes = _figure(1 + len(words) + together, None, size)
    _show(axes[0], image)
    axes[0].set_title("image", fontsize=9)
    peaks = word_maps.flatten(1).amax(-1)
    for ax, word, amap, peak in zip(axes[1:], words, word_maps, peaks.tolist()):
        _overlay(ax, image, amap, peak, alpha)
        ax.set_title(f"{word}\npeak {peak:.3f}", fontsize=9)
    if together:
        shown = min(3, len(words))
        normalised = word_maps[:shown] / peaks[:shown, None, None].clamp_min(1e-12)
        rgb = np.zeros((*image.shape[:2], 3))
        for channel, amap in zip((0, 2, 1), normalised):  # red, blue, green
            rgb[..., channel] = _upsample(amap, image.shape[:2])
        axes[-1].imshow(rgb.clip(0, 1), interpolation="nearest")
        overlap = attention_stats(word_maps[None])["overlap"][0]
        names = ", ".join(f"{w} {c}" for w, c in zip(words, ("red", "blue", "green")))
        axes[-1].set_title(f"{names}\noverlap {overlap:.2f}", fontsize=9)
    return fig


def attention_report(word_maps, words: Sequence[str], labels: Sequence[str] | None = None) -> str:
    """A small table of the two failure signals per image, with one line of interpretation each.

    word_maps: (K, h, w) for one image or (B, K, h, w). Columns: each word's peak (low = neglected), the
    peak ratio weakest/strongest, the overlap (0 disjoint .. 1 same pixels; see `maps.overlap`).
    labels: B row names (default 0..B-1). The thresholds NEGLECT_RATIO and HIGH_OVERLAP are rules of thumb.
    """
    word_maps = torch.as_tensor(word_maps).detach().float().cpu()
    word_maps = word_maps[None] if word_maps.ndim == 3 else word_maps
    if word_maps.ndim != 4 or word_maps.shape[1] < 2 or word_maps.shape[1] != len(words):
        raise ValueError(f"attention_report needs (B, K, h, w) or (K, h, w) maps with K = len(words) >= 2; got "
                         f"shape {tuple(word_maps.shape)} for words {list(words)}.")
    labels = [str(i) for i in range(len(word_maps))] if labels is None else [str(x) for x in labels]
    if len(labels) != len(word_maps):
        raise ValueError(f"{len(labels)} labels for {len(word_maps)} images.")
    stats = attention_stats(word_maps, words)
    width = max(len(w) for w in words) + 7  # "peak " + word + a gap
    label_width = max(5, *(len(x) for x in labels))
    header = f"{'image':<{label_width}}" + "".join(f"{'peak ' + w:>{width}}" for w in words)
    lines = [header + f"{'ratio':>7}{'overlap':>9}  reading"]
    for label, peaks, ratio, overlap in zip(labels, stats["peak"], stats["peak_ratio"], stats["overlap"]):
        row = f"{label:<{label_width}}" + "".join(f"{p:>{width}.3f}" for p in peaks)
        lines.append(row + f"{ratio:>7.2f}{overlap:>9.2f}  {_reading(words, peaks, ratio, overlap)}")
    return "\n".join(lines)


def _reading(words: Sequence[str], peaks: Sequence[float], ratio: float, overlap: float) -> str:
    weak, strong = words[int(np.argmin(peaks))], words[int(np.argmax(peaks))]
    notes = []
    if ratio < NEGLECT_RATIO:
        notes.append(f"{weak} is neglected: its peak is {1 / max(ratio, 1e-12):.1f}x lower than {strong}'s")
    if overlap > HIGH_OVERLAP:
        notes.append(f"the maps overlap ({overlap:.2f}): the objects may blend")
    return "; ".join(notes) or "balanced: comparable peaks, mostly separate maps"


# ----------------------------------------------------------------------------------------------------------
# Browsing steps and layers
# ----------------------------------------------------------------------------------------------------------
def browse_maps(store, image, tokens: Sequence[tuple[int, str]], interactive: bool = True, index: int = 0,
                num_steps_shown: int = 4):
    """Token maps per denoising step and per layer.

    store: an `AttentionStore` captured with keep="steps" (one entry per UNet call). image: the image of
    batch element `index`. tokens: (position, text) pairs. interactive: sliders (ipywidgets, in a running
    notebook kernel) for the step ("mean" = all steps) and the layer ("all layers" = their mean), returning
    the widget. Otherwise, or without ipywidgets or a kernel, a static Figure: rows = `num_steps_shown` evenly
    spaced steps x tokens, columns = the layers (at most 7, evenly spaced: SDXL has 60) and the mean of all of them,
    one colour scale per token.
    """
    if store.keep != "steps":
        raise ValueError(f"browse_maps needs every step, but this store keeps {store.keep!r}: capture with "
                         "capture_cross_attention(pipe, keep='steps').")
    if store.num_steps == 0:
        raise RuntimeError("Nothing recorded yet: run the pipeline inside the capture context.")
    if interactive and _in_kernel():
        # The widget draws only in a running kernel: show the static grid as well, so that the executed notebook
        # (nbviewer, GitHub, a closed JupyterLab) still holds the maps.
        from IPython.display import display

        display(_browse_static(store, image, tokens, index, num_steps_shown))
        return _browse_widget(store, image, tokens, index)
    return _browse_static(store, image, tokens, index, num_steps_shown)


def layer_localisation(store, prompts, words, step: int | None = None) -> list[dict]:
    """How localised each captured layer's object maps are, and the maps averaged over the layers.

    One row per layer, then "mean of the layers": the mean over images and object words of the map's peak and
    of its peak / mean ratio (1 for a flat map; h*w when all of it is on one pixel), and the share of the map's
    mass on its top 10 % pixels (0.1 when flat). `prompts`, `words`: as `store.word_maps`.
    """
    rows = [(short_layer_name(name), [name]) for name in store.layers] + [("mean of the layers", None)]
    table = []
    for label, layers in rows:
        maps = store.word_maps(prompts, words, step=step, layers=layers).detach().float().flatten(2)  # (B, K, h*w)
        top = max(1, round(0.1 * maps.shape[-1]))
        table.append({"layer": label, "peak": maps.amax(-1).mean().item(),
                      "peak / mean": (maps.amax(-1) / maps.mean(-1).clamp_min(1e-12)).mean().item(),
                      "top 10 % share": (maps.topk(top, dim=-1).values.sum(-1) / maps.sum(-1).clamp_min(1e-12))
                      .mean().item()})
    return table


def _in_kernel() -> bool:
    if importlib.util.find_spec("ipywidgets") is None or importlib.util.find_spec("IPython") is None:
        return False
    from IPython import get_ipython

    return getattr(get_ipython(), "kernel", None) is not None


def _browse_widget(store, image, tokens, index):
    import ipywidgets as widgets
    from IPython.display import display

    step = widgets.SelectionSlider(options=[("mean", "mean")] + [(str(s), s) for s in range(store.num_steps)],
                                   description="step")
    layer = widgets.SelectionSlider(options=[("all layers", "all")] + [(short_layer_name(n), n) for n in store.layers],
                                    description="layer")
    out = widgets.Output()

    def draw(_=None):
        steps = None if step.value == "mean" else step.value
        layers = None if layer.value == "all" else [layer.value]
        maps = store.token_maps(step=steps, layers=layers)[index]
        with out:
            out.clear_output(wait=True)
            display(token_heatmaps(image, maps, tokens))

    step.observe(draw, "value")
    layer.observe(draw, "value")
    draw()
    return widgets.VBox([widgets.HBox([step, layer]), out])


MAX_LAYER_COLUMNS = 8  # the static grid's layer columns, "all layers" included


def _browse_static(store, image, tokens, index, num_steps_shown) -> Figure:
    image = _as_image(image)
    steps = sorted(set(np.linspace(0, store.num_steps - 1, min(num_steps_shown, store.num_steps)).round().astype(int)))
    layers = list(store.layers)
    if len(layers) > MAX_LAYER_COLUMNS:  # SDXL reads 60 layers: show a few, evenly spaced, and the mean of all
        layers = [layers[i] for i in np.linspace(0, len(layers) - 1, MAX_LAYER_COLUMNS - 1).round().astype(int)]
    columns = [(short_layer_name(n), [n]) for n in layers] + [("all layers", None)]
    # maps[s][c]: (T, h, w) of image `index` at step s, layer column c
    maps = [[store.token_maps(step=int(s), layers=layers)[index].detach().float().cpu() for _, layers in columns]
            for s in steps]
    fig, axes = _figure(len(steps) * len(tokens) * len(columns), len(columns), 1.6)
    for t, (position, text) in enumerate(tokens):
        vmax = max(float(m[position].max()) for row in maps for m in row)
        for s, row in enumerate(maps):
            for c, m in enumerate(row):
                ax = axes[(s * len(tokens) + t) * len(columns) + c]
                _overlay(ax, image, m[position], vmax, 0.6)
                ax.set_title(f"{columns[c][0]}\nstep {steps[s]} · {text}", fontsize=7)
    shown = "" if len(layers) == len(store.layers) else f" ({len(layers)} of the {len(store.layers)} layers)"
    fig.suptitle(f"token maps per step (rows) and layer (columns{shown}); one colour scale per token", fontsize=9)
    return fig


# ----------------------------------------------------------------------------------------------------------
# Training curves
# ----------------------------------------------------------------------------------------------------------
def loss_curve(history: Sequence[dict], keys: Sequence[str] = ("loss",), logy: bool = False,
               size: tuple[float, float] = (5.0, 3.0)) -> Figure:
    """Curves of `keys` against "step"; history: a list of dicts such as {"step": 3, "loss": 0.41, ...}.

    An entry without a key (e.g. a value logged every 10 steps) is skipped for that key.
    """
    if not history or any("step" not in h for h in history):
        raise ValueError("history must be a non-empty list of dicts, each with a 'step'.")
    available = sorted({k for h in history for k in h} - {"step"})
    missing = [k for k in keys if k not in available]
    if missing:
        raise KeyError(f"No entry of the history has {missing}; logged keys: {available}.")
    fig, ax = plt.subplots(figsize=size, layout="constrained")
    plt.close(fig)
    for key in keys:
        points = [(h["step"], float(h[key])) for h in history if key in h]
        ax.plot(*zip(*points), label=key)
    ax.set_xlabel("step")
    ax.set_yscale("log" if logy else "linear")
    ax.legend()
    ax.grid(alpha=0.3)
    return fig
