"""The released code's readings of the method (github.com/adobe/SeperateAndEnhance, Attend-and-Excite's official
pipeline), rebuilt here from their rules and checked against ours."""
import copy
import math
import re

import pytest
import torch
import torch.nn.functional as F

from sae_utils.attention import layers_at_resolution
from sae_utils.finetune import RELEASED_SINGLE_TEMPLATE, FinetuneConfig, Finetuner, preset
from sae_utils.losses import attend_and_excite_token_maps
from sae_utils.maps import released_head_stack
from sae_utils.models import model_family, tiny_pipeline


def _released_gaussian(channels: int) -> torch.Tensor:
    """utils.GaussianSmoothing(channels, kernel_size=3, sigma=0.5): exp(-((x - mean) / (2 std))^2), normalised."""
    grid = torch.arange(3, dtype=torch.float32)
    g = 1 / (0.5 * math.sqrt(2 * math.pi)) * torch.exp(-((grid - 1) / (2 * 0.5)) ** 2)
    kernel = torch.outer(g, g)
    kernel = kernel / kernel.sum()
    return kernel.view(1, 1, 3, 3).repeat(channels, 1, 1, 1)


def _released_losses(amap1, amap2):
    """utils.compute_separate_loss and compute_enhance_loss, on one "sample": (S, 16, 16) each."""
    separate = (amap1 * amap2 / (amap1 + amap2)).max()
    kernel = _released_gaussian(amap1.shape[0])
    peaks = [F.conv2d(F.pad(a.unsqueeze(0), (1, 1, 1, 1), mode="reflect"), kernel, groups=a.shape[0]).max()
             for a in (amap1, amap2)]
    return separate, 1 - min(peaks)


def test_the_released_reading_gives_the_released_losses_from_raw_attention():
    """Capture the map layers' inputs, compute softmax(QK^T / sqrt(d)) by hand with diffusers 0.14's batch-major
    heads, keep attn[n // 2:], reshape (1, bs, -1, res, res, 77), average the layers, index the words, and apply
    the released loss functions: the finetuner's released reading must give the same losses."""
    finetuner = Finetuner(FinetuneConfig(model="tiny", pairs=[("cat", "dog")], template=RELEASED_SINGLE_TEMPLATE,
                                         map_reading="released", device="cpu"), pipeline=tiny_pipeline())
    inputs = finetuner.step_inputs()
    unet = finetuner.unet
    seen = {}
    def keep(name):
        def hook(module, args, kwargs):
            seen.setdefault(name, (args[0], kwargs["encoder_hidden_states"]))
        return hook

    hooks = [unet.get_submodule(name).register_forward_pre_hook(keep(name), with_kwargs=True) for name in layers_at_resolution(unet, finetuner.map_resolution, finetuner.latent_size)]
    try:
        with torch.no_grad():
            terms = finetuner.sepen_terms_from(inputs["noisy"], inputs["timesteps"], inputs["text"], inputs["masks"])
    finally:
        for hook in hooks:
            hook.remove()
    assert len(seen) == 3  # tiny's map level: down_blocks.2 (1 layer) and up_blocks.1 (2), SD v1's 16x16 blocks
    bs, res = 4, finetuner.map_resolution
    stored = []
    with torch.no_grad():
        for name, (hidden, context) in seen.items():
            attn = unet.get_submodule(name)
            h = attn.heads
            q, k = attn.to_q(hidden), attn.to_k(context)
            to_batch = lambda x: x.reshape(x.shape[0], x.shape[1], h, -1).permute(0, 2, 1, 3).reshape(  # noqa: E731
                x.shape[0] * h, x.shape[1], -1)  # diffusers 0.14 head_to_batch_dim: row b * heads + head
            probs = (torch.einsum("b i d, b j d -> b i j", to_batch(q), to_batch(k)) * attn.scale).softmax(-1)
            kept = probs[probs.shape[0] // 2:]  # AttentionControl.__call__: attn[h // 2:]
            stored.append(kept.reshape(1, bs, -1, res, res, kept.shape[-1]))  # aggregate_attention
        amap = torch.cat(stored).sum(0) / len(stored)
        prompt = finetuner.sampler.batch(0, 0, 0, bs)[0].prompt
        words = prompt.split()
        c1, c2 = words.index("cat") + 1, words.index("dog") + 1  # utils.get_index
        released = [_released_losses(amap[i, :, :, :, c1], amap[i, :, :, :, c2]) for i in range(bs)]
    assert prompt == "a photo of cat and dog"
    torch.testing.assert_close(terms.separate, torch.stack([r[0] for r in released]), atol=1e-6, rtol=0)
    torch.testing.assert_close(terms.enhance, torch.stack([r[1] for r in released]), atol=1e-6, rtol=0)


def test_the_released_head_stack_reads_the_second_half_of_the_batch():
    probs = torch.arange(4 * 8, dtype=torch.float32).view(4, 8, 1, 1, 1).expand(4, 8, 3, 2, 2)
    stack = released_head_stack(probs)  # row value = sample * 8 + head
    assert stack.shape == (4, 4, 3, 2, 2)
    assert stack[:, :, 0, 0, 0].tolist() == [[16, 17, 18, 19], [20, 21, 22, 23], [24, 25, 26, 27], [28, 29, 30, 31]]
    with pytest.raises(ValueError, match="divisible"):
        released_head_stack(torch.zeros(4, 1, 3, 2, 2))


def test_only_the_second_half_of_the_batch_gets_a_gradient_with_the_released_reading():
    finetuner = Finetuner(FinetuneConfig(model="tiny", pairs=[("cat", "dog")], map_reading="released",
                                         device="cpu"), pipeline=tiny_pipeline())
    inputs = finetuner.step_inputs()
    noisy = inputs["noisy"].clone().requires_grad_(True)
    with finetuner.capturing():
        terms = finetuner.sepen_terms_from(noisy, inputs["timesteps"], inputs["text"], inputs["masks"])
        terms.total.sum().backward()
    per_sample = noisy.grad.flatten(1).abs().sum(1)
    assert per_sample[:2].max() == 0 and per_sample[2:].min() > 0


def test_the_separate_norm_update_is_a_second_step_on_the_batchs_own_concepts():
    common = dict(model="tiny", concepts=["cat", "dog", "frog", "bird"], steps=1, learning_rate=1e-3, device="cpu",
                  norm_loss_weight=0.5)
    joint = Finetuner(FinetuneConfig(**common), pipeline=tiny_pipeline())
    joint.train_step()
    separate = Finetuner(FinetuneConfig(**common, norm_update="separate"), pipeline=tiny_pipeline())
    prompts = []
    original = separate.text_embeddings
    separate.text_embeddings = lambda p: (prompts.extend(p), original(p))[1]
    entry = separate.train_step()
    steps = lambda f: {int(f.optimizer.state[p]["step"]) for p in f.parameters}  # noqa: E731
    # two AdamW steps where the SepEn loss reaches (the keys after the last map layer get only the norm update)
    assert steps(joint) == {1} and max(steps(separate)) == 2
    assert entry["norm"] > 0
    firsts = [f"a photo of a {s.words[0]}" for s in separate.sampler.batch(0, 0, 0, 4)]
    assert prompts[-4:] == firsts  # the released train_large.py: "a photo of a {A}" of each sample
    with pytest.raises(ValueError, match="norm_update"):
        FinetuneConfig(**common, norm_update="twice").validate()


def test_the_released_code_preset_follows_its_scripts():
    single = preset("released-code", model="tiny", pairs=[("bear", "book")])
    assert (single.template, single.learning_rate, single.steps, single.mixed_precision, single.map_reading) == \
        ("a photo of {a} {connector} {b}", 2e-6, 200, "no", "released")
    multi = preset("released-code", model="tiny", concepts=["cat", "dog"])
    assert (multi.norm_update, multi.norm_loss_weight, multi.learning_rate, multi.connectors) == \
        ("separate", 0.5, 1e-6, ("and", "with"))  # 5e-7 x 2 (use_norm) per sample; "and" / "with"


def _official_aae(token_maps, last_idx):
    """Attend-and-Excite's _compute_max_attention_per_index: softmax(100 * maps[..., 1:last_idx]) over tokens."""
    text = token_maps.permute(0, 2, 3, 1)[..., 1:last_idx] * 100  # (B, h, w, T) as its attention store keeps them
    return torch.softmax(text, dim=-1).permute(0, 3, 1, 2)  # position i of the result is token i + 1


def test_attend_and_excite_keeps_the_official_tokens_for_each_family():
    torch.manual_seed(3)
    maps = torch.rand(2, 77, 4, 4).softmax(dim=1)
    n = 7  # "a cat and a dog" style prompt: 7 tokens, the end token at 8
    sd1 = attend_and_excite_token_maps(maps, [n, n], token_range="all-but-last")
    torch.testing.assert_close(sd1[:, 1:76], _official_aae(maps, -1))  # SD 1.4: last_idx = -1
    assert (sd1[:, 0] == 0).all() and (sd1[:, 76] == 0).all()
    sd2 = attend_and_excite_token_maps(maps, [n, n], token_range="prompt")
    torch.testing.assert_close(sd2[:, 1:n + 1], _official_aae(maps, n + 1))  # normalize_eot: len(ids) - 1 = n + 1
    assert (sd2[:, n + 1:] == 0).all()
    assert (sd1[:, 2] < sd2[:, 2]).all()  # against ~70 end/padding tokens a word's share is smaller


def test_the_model_family_decides_attend_and_excite_s_token_range(tiny):
    from sae_utils.baselines import attend_and_excite

    assert model_family(tiny) == "sd1"
    sd2 = copy.copy(tiny)
    sd2.tokenizer = copy.deepcopy(tiny.tokenizer)
    sd2.tokenizer.pad_token = "!"  # SD 2.x's OpenCLIP tokenizer pads with "!" (id 0)
    assert model_family(sd2) == "sd2"
    run = lambda **kw: attend_and_excite(tiny, "a cat and a dog", ["cat", "dog"],  # noqa: E731
                                         [torch.Generator().manual_seed(0)], num_inference_steps=2,
                                         max_iter_to_alter=1, thresholds={}, height=64, width=64, **kw).log[0]["peaks"]
    assert run() == run(token_range="all-but-last") != run(token_range="prompt")


def test_the_released_multi_concept_positions_mostly_miss_the_words(tokenizer):
    from sae_utils.prompts import released_large_hit_rate, released_large_positions

    cat_dog = released_large_positions(tokenizer, "cat", "dog")
    assert cat_dog["reads"] == {6: "and", 9: "<|endoftext|>"} and cat_dog["word_positions"] == {"cat": [5], "dog": [8]}
    assert not cat_dog["both_inside"]
    assert released_large_positions(tokenizer, "teddy bear", "bowl")["both_inside"]  # a two-token word shifts "dog"
    rate = released_large_hit_rate(tokenizer, samples=400)
    assert rate["multi_token_concepts"] == 53 and 0.1 < rate["both_inside"] < 0.3


def test_readme_choices_table_has_every_released_difference_with_a_measurement():
    """Issue 13's acceptance: each difference from the released code has our default, theirs, and a measurement."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("## Choices this project made"):]
    section = section[:section.index("\n## ", 1)] if "\n## " in section[1:] else section
    rows = [line for line in section.splitlines() if re.match(r"\| \d+ \|", line)]
    assert [int(r.split("|")[1]) for r in rows] == [1, 2, 3, 4, 5, 6]
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split(" | ")]
        assert len(cells) >= 6 and all(cells[:6]), row[:80]
        assert "not yet measured" not in row, f"row {cells[0]} ({cells[1]}) has no measurement yet"
