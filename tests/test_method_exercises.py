"""The exercises where the learner writes the method (01: a capture processor, 03: the training step): the course's
solutions pass, and each likely mistake is rejected with its own hint, on `tiny` (random) and on the toy model."""
from __future__ import annotations

import math

import pytest
import torch

from sae_utils.attention import capture_cross_attention
from sae_utils.exercises import ExerciseError
from sae_utils.finetune import FinetuneConfig, Finetuner
from sae_utils.losses import sepen_loss, sepen_loss_terms
from sae_utils.method_exercises import check_capture_processor, check_training_step
from sae_utils.models import load_pipeline
from sae_utils.solutions import CaptureProcessorSolution, training_step_solution

MODELS = ["tiny", "toy"]
PAIRS = {"tiny": ("cat", "dog"), "toy": ("star", "heart")}


@pytest.fixture(scope="module", params=MODELS)
def model(request):
    return request.param


@pytest.fixture(scope="module")
def pipe(model):
    return load_pipeline(model, "cpu")


@pytest.fixture(scope="module")
def finetuner(model, pipe):
    return Finetuner(FinetuneConfig(model=model, pairs=[PAIRS[model]], device="cpu", steps=1), pipeline=pipe,
                     resume=False)


# ---------- 01: capture processors, right and wrong ----------

def processor(mistake: str | None = None):
    """A capture processor class as a learner might write it, with one mistake."""

    class Processor:
        def __init__(self):
            self.maps = []

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
            B, L, _ = hidden_states.shape
            q, k, v = attn.to_q(hidden_states), attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
            heads = 1 if mistake == "no head split" else attn.heads
            d = k.shape[-1] // heads
            q, k, v = (x.view(B, -1, heads, d).transpose(1, 2) for x in (q, k, v))
            scores = q @ k.transpose(-1, -2)
            if mistake != "no scale":
                scores = scores * (attn.scale if mistake != "full width" else 1 / math.sqrt(heads * d))
            probs = scores.softmax(dim=-2 if mistake == "softmax over pixels" else -1)
            half = probs[:B // 2] if mistake == "unconditional half" else probs if mistake == "both halves" \
                else probs[B // 2:]
            maps = {"heads summed": half.sum(1), "first head": half[:, 0], "no head mean": half}.get(mistake, None)
            maps = half.mean(1) if maps is None else maps
            side = math.isqrt(L)
            if mistake == "no transpose":
                maps = maps.reshape(maps.shape[0], -1, side, side)
            elif mistake != "no head mean":
                maps = maps.transpose(-1, -2).reshape(maps.shape[0], -1, side, side)
            self.maps.append(maps.detach())
            if mistake == "no head split":  # the output as it should be, so that only the maps are wrong
                return attn.to_out[1](attn.to_out[0]((probs @ v).transpose(1, 2).reshape(B, L, -1)))
            out = (probs @ v).transpose(1, 2).reshape(B, L, attn.heads * d)
            if mistake == "no output projection":
                return out
            return attn.to_out[1](attn.to_out[0](out))

    return Processor


def test_the_solution_passes(pipe, capsys):
    assert check_capture_processor(CaptureProcessorSolution, pipe) is True
    assert "Well done" in capsys.readouterr().out
    assert check_capture_processor(processor(), pipe) is True  # the test's own right answer


@pytest.mark.parametrize("mistake, hint", [
    ("no scale", "left out the softmax scale"),
    ("full width", "the full width"),
    ("unconditional half", "the unconditional"),
    ("both halves", "you kept both halves"),
    ("heads summed", "you summed the"),
    ("first head", "only the first head"),
    ("no head mean", "average the"),
    ("no head split", "did not split the heads"),
    ("no transpose", "without transposing"),
    ("softmax over pixels", "softmax over the pixels"),
    ("no output projection", "attn.to_out"),
])
def test_a_wrong_processor_is_rejected_with_its_hint(pipe, mistake, hint):
    with pytest.raises(ExerciseError) as failure:
        check_capture_processor(processor(mistake), pipe)
    assert hint in str(failure.value), str(failure.value)


def test_an_unfinished_processor_says_not_done(pipe, capsys):
    class Stub:
        def __init__(self):
            self.maps = []

        def __call__(self, *args, **kwargs):
            raise NotImplementedError

    assert check_capture_processor(Stub, pipe) is False
    assert "Not done yet" in capsys.readouterr().out


def test_the_check_leaves_the_processors_as_they_were(pipe):
    before = {k: type(v) for k, v in pipe.unet.attn_processors.items()}
    check_capture_processor(CaptureProcessorSolution, pipe)
    with pytest.raises(ExerciseError):
        check_capture_processor(processor("no scale"), pipe)
    assert {k: type(v) for k, v in pipe.unet.attn_processors.items()} == before


# ---------- 03: training steps, right and wrong ----------

def step(mistake: str | None = None):
    """my_training_step as a learner might write it, with one mistake."""

    def my_training_step(pipe, noise_scheduler, prompt, words, generator, batch_size=4):
        unet = pipe.unet
        if mistake != "no freezing":
            unet.requires_grad_(False)
        pattern = {"self-attention keys too": ".to_k.", "map layers only": "up_blocks.1"}.get(mistake, ".attn2.to_k.")
        for name, p in unet.named_parameters():
            if pattern in name and (mistake != "map layers only" or ".attn2.to_k." in name):
                p.requires_grad_(True)
                if mistake != "no zeroing":
                    p.grad = None
        side = unet.config.sample_size
        scale = pipe.vae.config.scaling_factor
        if mistake == "t first":
            t = torch.randint(0, 1000, (batch_size,), generator=generator)
        z0 = torch.randn(batch_size, 4, side, side, generator=generator)
        z0 = z0 if mistake == "no scaling" else z0 / scale if mistake == "divided" else z0 * scale
        noise = torch.randn(batch_size, 4, side, side, generator=generator)
        if mistake != "t first":
            high = 999 if mistake == "t up to 998" else 1000
            t = torch.randint(1 if mistake == "t from 1" else 0, high, (batch_size,), generator=generator)
        noisy = z0 if mistake == "no noise" else noise_scheduler.add_noise(z0, noise, t)
        ids = pipe.tokenizer([prompt] * batch_size, padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids
        with torch.no_grad():
            text = pipe.text_encoder(ids)[0]
        with capture_cross_attention(pipe, keep="last") as store:
            unet(noisy, t, encoder_hidden_states=text)
        maps = store.word_maps(prompt, words)
        if mistake == "separate only":
            loss = sepen_loss_terms(maps).separate.mean()
        else:
            losses = sepen_loss(maps)
            loss = {"sum": losses.sum(), "per sample": losses}.get(mistake, losses.mean())
        if mistake == "update":
            loss.backward()
            with torch.no_grad():
                for name, p in unet.named_parameters():
                    if p.grad is not None:
                        p -= 1e-3 * p.grad
            return loss
        if mistake != "no backward":
            loss.sum().backward()
        return loss

    return my_training_step


def test_the_step_solution_passes(finetuner, capsys):
    assert check_training_step(training_step_solution, finetuner) is True
    assert "Well done" in capsys.readouterr().out
    assert check_training_step(step(), finetuner) is True


@pytest.mark.parametrize("mistake, hint", [
    ("t up to 998", "never draws 999"),
    ("t from 1", "timesteps run from 0 to 999"),
    ("t first", "draw in the order"),
    ("no scaling", "scale them by the autoencoder's factor"),
    ("divided", "you divided by the scaling factor"),
    ("no noise", "noise them to t"),
    ("sum", "you summed the batch"),
    ("per sample", "losses, shape"),
    ("separate only", "left out the enhance term"),
    ("no freezing", "freeze the UNet first"),
    ("self-attention keys too", "self-attention keys"),
    ("map layers only", "not only the map-level layers'"),
    ("no zeroing", "you did not zero the gradients"),
    ("no backward", "call loss.backward()"),
    ("update", "stop after backward"),
])
def test_a_wrong_step_is_rejected_with_its_hint(finetuner, mistake, hint):
    with pytest.raises(ExerciseError) as failure:
        check_training_step(step(mistake), finetuner)
    assert hint in str(failure.value), str(failure.value)


def test_the_step_check_leaves_the_finetuner_as_it_was(finetuner):
    flags = {n: p.requires_grad for n, p in finetuner.unet.named_parameters()}
    values = [p.detach().clone() for p in finetuner.parameters]
    for answer in (training_step_solution, step("update"), step("no freezing")):
        try:
            check_training_step(answer, finetuner)
        except ExerciseError:
            pass
    assert {n: p.requires_grad for n, p in finetuner.unet.named_parameters()} == flags
    assert all(torch.equal(p, v) for p, v in zip(finetuner.parameters, values))
    assert all(p.grad is None for p in finetuner.unet.parameters())


def test_an_unfinished_step_says_not_done(finetuner, capsys):
    def stub(*args):
        raise NotImplementedError

    assert check_training_step(stub, finetuner) is False
    assert "Not done yet" in capsys.readouterr().out


# ---------- which keys can train ----------

def test_keys_after_the_last_map_layer_get_no_gradient_on_tiny_and_sd_layout(pipe):
    """The forward stops after the last map-level layer: the keys after it get no gradient (verified by a real
    backward), on tiny/toy and on Stable Diffusion v1's layout (16 keys, of which up_blocks.2-3's 6 get none)."""
    from diffusers import UNet2DConditionModel

    from sae_utils.method_exercises import cross_attention_order, layers_after_maps
    from sae_utils.models import SD_V1_UNET_CONFIG

    def keys_with_gradient(model):
        unet = getattr(model, "unet", model)
        unet.requires_grad_(False)
        keys = {n: p for n, p in unet.named_parameters() if ".attn2.to_k." in n}
        for p in keys.values():
            p.requires_grad_(True)
            p.grad = None
        side = unet.config.sample_size
        with capture_cross_attention(model, keep="last", cfg=False, stop_when_complete=True) as store:
            from sae_utils.attention import forward_until_captured
            forward_until_captured(unet, torch.randn(1, 4, side, side), torch.tensor(500),
                                   encoder_hidden_states=torch.randn(1, 77, unet.config.cross_attention_dim))
        store.token_maps()[:, 1:3].square().sum().backward()
        got = {n.rsplit(".to_k.", 1)[0] for n, p in keys.items() if p.grad is not None and p.grad.abs().sum() > 0}
        for p in keys.values():
            p.grad = None
        return got, {n.rsplit(".to_k.", 1)[0] for n in keys}

    with_grad, all_keys = keys_with_gradient(pipe)
    after = layers_after_maps(pipe)
    assert after and with_grad == all_keys - set(after)
    assert set(cross_attention_order(pipe)) == all_keys

    # Stable Diffusion v1's layout (2 layers per block), at a small width: the same 16 keys, the same order
    sd_layout = UNet2DConditionModel(**{**SD_V1_UNET_CONFIG, "sample_size": 32, "block_out_channels": (32, 32, 64, 64),
                                        "cross_attention_dim": 32, "norm_num_groups": 8})
    with_grad, all_keys = keys_with_gradient(sd_layout)
    after = layers_after_maps(sd_layout)
    assert len(all_keys) == 16 and len(after) == 6
    assert all(name.startswith(("up_blocks.2.", "up_blocks.3.")) for name in after)
    assert with_grad == all_keys - set(after)


def test_show_solution_prints_each_exercise_and_refuses_unknown_names(capsys):
    from sae_utils.solutions import SOLUTIONS, show_solution

    for name in SOLUTIONS:
        show_solution(name)
        assert "def " in capsys.readouterr().out
    with pytest.raises(KeyError, match="my_training_step"):
        show_solution("my_trainig_step")
