import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from sae_utils import viz  # noqa: E402
from sae_utils.attention import AttentionStore, capture_cross_attention  # noqa: E402
from sae_utils.models import clip_tokenizer  # noqa: E402

PROMPT = "a photo of a cat and a dog"


@pytest.fixture(scope="module")
def capture(tiny):
    """Two images of PROMPT, 2 scheduler steps (3 UNet calls with PNDM), every step kept."""
    with capture_cross_attention(tiny, keep="steps") as store:
        images = tiny(PROMPT, num_inference_steps=2, num_images_per_prompt=2,
                      generator=torch.Generator().manual_seed(0)).images
    return store, images


def titles(fig: Figure) -> list[str]:
    return [ax.get_title() for ax in fig.axes]


def test_image_grid_accepts_pil_uint8_and_float(capture):
    _, images = capture
    assert len(viz.image_grid(images, titles=["a", "b"]).axes) == 2
    uint8 = np.stack([np.asarray(im) for im in images])
    fig = viz.image_grid(uint8, columns=1)
    assert len(fig.axes) == 2 and fig.axes[0].get_subplotspec().get_gridspec().ncols == 1
    fig = viz.image_grid(list(uint8 / 255.0) * 3, titles=[str(i) for i in range(6)], columns=4)
    assert len(fig.axes) == 6 and titles(fig) == [str(i) for i in range(6)]  # unused 7th/8th cells removed
    assert fig.axes[0].images[0].get_interpolation() == "nearest"


def test_image_grid_errors_teach():
    with pytest.raises(ValueError, match="permute"):
        viz.image_grid([np.zeros((3, 8, 8))])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        viz.image_grid([np.full((8, 8, 3), 2.0)])
    with pytest.raises(ValueError, match="one title per image"):
        viz.image_grid([np.zeros((8, 8, 3))], titles=["a", "b"])


def test_prompt_tokens_strips_word_ends_and_splits_hippopotamus(tokenizer):
    tokens = viz.prompt_tokens(tokenizer, "a photo of a hippopotamus and a cat")
    assert tokens == [(1, "a"), (2, "photo"), (3, "of"), (4, "a"), (5, "hippo"), (6, "potam"), (7, "us"),
                      (8, "and"), (9, "a"), (10, "cat")]
    with_ends = viz.prompt_tokens(tokenizer, "a cat", start=True, end=True)
    assert with_ends == [(0, "<start>"), (1, "a"), (2, "cat"), (3, "<end>")]


def test_token_heatmaps_one_panel_per_token_titled_with_peak(capture, tokenizer):
    store, images = capture
    maps = store.token_maps()[1]
    tokens = viz.prompt_tokens(tokenizer, PROMPT, start=True)
    fig = viz.token_heatmaps(images[1], maps, tokens)
    assert len(fig.axes) == 1 + len(tokens)
    assert titles(fig)[0] == "image"
    cat = titles(fig)[tokens.index((5, "cat")) + 1]
    assert cat == f"cat [5]\npeak {maps[5].max():.3f}"
    # the heat layer is the map upsampled to the image size, scaled to its own peak ("each")
    heat = fig.axes[1].images[1]
    assert heat.get_array().shape == np.asarray(images[1]).shape[:2] and heat.get_clim()[1] == pytest.approx(
        float(maps[0].max()))
    shared = viz.token_heatmaps(images[1], maps, tokens, normalize="shared")
    top = max(float(maps[p].max()) for p, _ in tokens)
    assert all(ax.images[1].get_clim()[1] == pytest.approx(top) for ax in shared.axes[1:])


def test_token_heatmaps_errors_teach(capture):
    store, images = capture
    with pytest.raises(ValueError, match=r"store.token_maps\(\)\[i\]"):
        viz.token_heatmaps(images[0], store.token_maps(), [(5, "cat")])
    with pytest.raises(ValueError, match="outside the 77 maps"):
        viz.token_heatmaps(images[0], store.token_maps()[0], [(80, "x")])
    with pytest.raises(ValueError, match="normalize"):
        viz.token_heatmaps(images[0], store.token_maps()[0], [(5, "cat")], normalize="global")


def test_word_heatmaps_adds_a_colour_panel_for_the_pair(capture):
    store, images = capture
    words = store.word_maps(PROMPT, ["cat", "dog"])[0]
    fig = viz.word_heatmaps(images[0], words, ["cat", "dog"])
    assert len(fig.axes) == 4
    assert titles(fig)[1] == f"cat\npeak {words[0].max():.3f}"
    assert titles(fig)[3].startswith("cat red, dog blue\noverlap ")
    rgb = fig.axes[3].images[0].get_array()
    assert rgb.shape[-1] == 3 and rgb[..., 1].max() == 0  # green is free with two words
    assert rgb[..., 0].max() == pytest.approx(1.0, abs=0.05) and rgb[..., 2].max() == pytest.approx(1.0, abs=0.05)
    assert len(viz.word_heatmaps(images[0], words[:1], ["cat"]).axes) == 2  # one word: no colour panel


def test_attention_report_names_the_neglected_word():
    cat = torch.zeros(16, 16)
    cat[2:6, 2:6] = 0.4
    dog = torch.zeros(16, 16)
    dog[10:14, 10:14] = 0.1
    report = viz.attention_report(torch.stack([cat, dog]), ["cat", "dog"])
    assert "dog is neglected: its peak is 4.0x lower than cat's" in report
    assert "0.400" in report and "0.100" in report and "0.25" in report
    same = viz.attention_report(torch.stack([cat, cat * 0.9])[None], ["cat", "dog"], labels=["seed 7"])
    assert "seed 7" in same and "neglected" not in same and "overlap (1.00)" in same
    with pytest.raises(ValueError, match="K = len"):
        viz.attention_report(torch.stack([cat, dog]), ["cat"])


def test_browse_maps_static_grid_steps_by_layers(capture, tokenizer):
    store, images = capture
    tokens = [(5, "cat"), (8, "dog")]
    fig = viz.browse_maps(store, images[0], tokens, interactive=False)
    assert isinstance(fig, Figure)
    steps, columns = min(4, store.num_steps), len(store.layers) + 1
    assert len(fig.axes) == steps * len(tokens) * columns
    assert titles(fig)[columns - 1] == "all layers\nstep 0 · cat"
    assert titles(fig)[-1] == f"all layers\nstep {store.num_steps - 1} · dog"
    # outside a notebook kernel, interactive=True degrades to the same static figure
    assert isinstance(viz.browse_maps(store, images[0], tokens, interactive=True), Figure)


def test_browse_maps_widget_redraws_for_each_step_and_layer(capture, monkeypatch):
    import ipywidgets as widgets
    store, images = capture
    monkeypatch.setattr(viz, "_in_kernel", lambda: True)  # as in a notebook kernel with a frontend
    shown = []
    monkeypatch.setattr(viz, "token_heatmaps", lambda image, maps, tokens: shown.append(maps) or Figure())
    displayed = []
    monkeypatch.setattr("IPython.display.display", lambda obj: displayed.append(obj))
    box = viz.browse_maps(store, images[0], [(5, "cat")], interactive=True, index=1)
    assert isinstance(box, widgets.VBox)
    # the static grid is shown beside the widget: an executed notebook keeps a figure without a kernel
    # (then the widget's first drawing, into its own output area)
    static = displayed[0]
    assert isinstance(static, Figure) and len(static.axes) == min(4, store.num_steps) * (len(store.layers) + 1)
    step, layer = box.children[0].children
    torch.testing.assert_close(shown[-1], store.token_maps()[1])  # starts at "mean" over steps, "all layers"
    step.value = 2
    layer.value = list(store.layers)[0]
    torch.testing.assert_close(shown[-1], store.token_maps(step=2, layers=[list(store.layers)[0]])[1])
    step.value = "mean"
    torch.testing.assert_close(shown[-1], store.token_maps(layers=[list(store.layers)[0]])[1])


def test_browse_maps_needs_every_step():
    store = AttentionStore({"down_blocks.1.attentions.0.transformer_blocks.0.attn2": 2}, keep="mean")
    with pytest.raises(ValueError, match="keep='steps'"):
        viz.browse_maps(store, np.zeros((64, 64, 3)), [(1, "a")], interactive=False)


def test_loss_curve_plots_each_key_against_step():
    history = [{"step": s, "loss": 1 / (s + 1), "sep": 0.5} if s % 2 else {"step": s, "loss": 1 / (s + 1)}
               for s in range(6)]
    fig = viz.loss_curve(history, keys=("loss", "sep"))
    lines = fig.axes[0].get_lines()
    assert [line.get_label() for line in lines] == ["loss", "sep"]
    assert list(lines[0].get_xdata()) == list(range(6)) and list(lines[1].get_xdata()) == [1, 3, 5]
    with pytest.raises(KeyError, match="logged keys"):
        viz.loss_curve(history, keys=("accuracy",))


def test_layer_localisation_tells_a_peaked_layer_from_a_flat_one():
    layers = {"down_blocks.1.attentions.0.transformer_blocks.0.attn2": 2,
              "up_blocks.1.attentions.0.transformer_blocks.0.attn2": 2}
    store = AttentionStore(layers, keep="mean", tokenizer=clip_tokenizer())
    store.begin_step(torch.zeros(1, 4, 8, 8))
    flat = torch.full((1, 16, 77), 1 / 77)  # (B, L, T): every token 1/77 everywhere
    peaked = flat.clone()
    peaked[0, :, 5] = 0.0
    peaked[0, 3, 5] = 0.5  # "cat" (token 5) all on one of the 16 pixels
    store.record(list(layers)[0], peaked[:, None])
    store.record(list(layers)[1], flat[:, None])
    rows = viz.layer_localisation(store, PROMPT, ["cat"])
    assert [r["layer"] for r in rows] == ["down1.0", "up1.0", "mean of the layers"]
    first, second, mean = rows
    assert first["peak / mean"] == pytest.approx(16.0) and second["peak / mean"] == pytest.approx(1.0)
    assert first["top 10 % share"] == pytest.approx(1.0) and second["top 10 % share"] == pytest.approx(2 / 16)
    # the mean of a peaked and a flat layer is less peaked than the peaked layer alone
    assert second["peak / mean"] < mean["peak / mean"] < first["peak / mean"]
