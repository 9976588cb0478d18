import gc
import json
import os
import subprocess
import sys

import pytest
import torch
from diffusers import UNet2DConditionModel

from sae_utils.delta import apply_delta, load_delta
from sae_utils.finetune import FinetuneConfig, Finetuner
from sae_utils.models import tiny_pipeline



def config(**overrides):
    base = dict(model="tiny", pairs=[("cat", "dog")], steps=3, learning_rate=5e-2, device="cpu")
    return FinetuneConfig(**{**base, **overrides})


def snapshot(pipe):
    return {f"{part}.{name}": p.detach().clone() for part in ("unet", "text_encoder", "vae")
            for name, p in getattr(pipe, part).named_parameters()}


@pytest.mark.parametrize("trainable, layers", [("k", None), ("kv", None),
                                               ("k", ["down_blocks.1.attentions.0.transformer_blocks.0.attn2"])])
def test_only_the_selected_tensors_change(trainable, layers):
    finetuner = Finetuner(config(trainable=trainable, layers=layers), pipeline=tiny_pipeline())
    before = snapshot(finetuner.pipe)
    finetuner.train(progress=False)
    after = snapshot(finetuner.pipe)
    changed = {name for name in before if not torch.equal(before[name], after[name].to(before[name].dtype))}
    selected = {f"unet.{name}" for name in finetuner.trainable_names}
    assert changed and changed <= selected
    assert all(("to_k" in n) or (trainable == "kv" and "to_v" in n) for n in changed)
    if layers:
        assert all(n.startswith(f"unet.{layers[0]}") for n in changed)


def test_optimisation_lowers_the_heldout_losses():
    # tiny's random maps are near-uniform over 77 tokens (enhance ~0.986); 30 steps raise the object peaks.
    finetuner = Finetuner(config(steps=30), pipeline=tiny_pipeline())
    result = finetuner.train(progress=False)
    first, last = (h["validation"] for h in (result.history[0], result.history[-1]))
    assert result.history[0]["step"] == 0 and result.history[-1]["step"] == 30
    assert last["enhance"] < first["enhance"] - 0.03  # measured 0.986 -> 0.922
    assert last["loss"] < first["loss"] - 0.003  # measured 0.5007 -> 0.4940 (separate rises as peaks grow)


def on_disk(path, **overrides):
    """A run with an output folder: its validation images (before and after) are drawn with 1 sampling step, not
    the sampler's default, which made the runs below minutes long; the validation code path runs all the same."""
    return config(output_dir=str(path), validation_inference_steps=1, **overrides)


def test_resume_continues_to_the_same_weights(tmp_path):
    straight = Finetuner(on_disk(tmp_path / "a", steps=6, checkpoint_every=3),
                         pipeline=tiny_pipeline()).train(progress=False)
    Finetuner(on_disk(tmp_path / "b", steps=3, checkpoint_every=3), pipeline=tiny_pipeline()).train(progress=False)
    resumed_run = Finetuner(on_disk(tmp_path / "b", steps=6, checkpoint_every=3), pipeline=tiny_pipeline())
    assert resumed_run.step == 3
    resumed = resumed_run.train(progress=False)
    for name, value in straight.delta.tensors.items():
        assert torch.equal(value, resumed.delta.tensors[name]), name
    losses = lambda history: [h["loss"] for h in history if "loss" in h]  # noqa: E731
    assert losses(straight.history) == losses(resumed.history)


def test_resume_refuses_other_settings(tmp_path):
    Finetuner(on_disk(tmp_path, steps=2), pipeline=tiny_pipeline()).train(progress=False)
    with pytest.raises(ValueError, match="other settings.*learning_rate"):
        Finetuner(on_disk(tmp_path, steps=4, learning_rate=1e-3), pipeline=tiny_pipeline())


def test_outputs_on_disk(tmp_path):
    result = Finetuner(config(steps=2, output_dir=str(tmp_path), validation_inference_steps=2),
                       pipeline=tiny_pipeline()).train(progress=False)
    assert {"delta.safetensors", "history.json", "history.csv", "loss.png", "checkpoint", "validation"} <= \
        set(os.listdir(tmp_path))
    assert not [name for name in os.listdir(tmp_path) if ".tmp-" in name]  # atomic writes leave no temp files
    assert len(list((tmp_path / "validation").glob("*.png"))) == 2  # before and after
    history = json.loads((tmp_path / "history.json").read_text())
    assert [h["step"] for h in history if "loss" in h] == [1, 2]
    saved = load_delta(tmp_path / "delta.safetensors")
    assert saved.metadata["trainable"] == "k" and saved.metadata["concepts"] == ["cat", "dog"]
    fresh = tiny_pipeline()
    with apply_delta(fresh, saved):
        for name, value in result.delta.tensors.items():
            assert torch.equal(fresh.unet.get_parameter(name), value)


@pytest.mark.parametrize("overrides, message", [
    (dict(learning_rate=0.0), "learning_rate must be > 0"),
    (dict(steps=0), "steps must be > 0"),
    (dict(pairs=None), "Give either `pairs`"),
    (dict(trainable="kvq"), "kvq"),
    (dict(template="a photo of a {a}"), r"must contain \{a\} and \{b\}"),
    (dict(pairs=[("cat", " ".join(["dog"] * 80))]), "tokens"),
    (dict(mixed_precision="fp8"), "mixed_precision"),
    (dict(timestep_range=(500, 100)), "timestep_range"),
])
def test_bad_settings_are_explained(overrides, message):
    with pytest.raises((ValueError, TypeError), match=message):
        Finetuner(config(**overrides), pipeline=tiny_pipeline())


def test_unknown_concept_for_a_model_with_a_vocabulary(tmp_path):
    pipe = tiny_pipeline()
    pipe.save_pretrained(tmp_path)
    (tmp_path / "toy_model.json").write_text(json.dumps({"vocabulary": ["star", "heart"]}))
    with pytest.raises(ValueError, match="Unknown concept word.*dog.*knows: heart, star"):
        Finetuner(config(model=str(tmp_path), pairs=[("star", "dog")]))


def test_norm_loss_uses_the_original_weights_of_the_same_unet():
    unets_before = sum(type(o) is UNet2DConditionModel for o in gc.get_objects())
    finetuner = Finetuner(config(concepts=["cat", "dog", "bird"], pairs=None, norm_loss_weight=0.5),
                          pipeline=tiny_pipeline())
    assert sum(type(o) is UNet2DConditionModel for o in gc.get_objects()) == unets_before + 1  # no frozen copy
    assert finetuner.norm_loss(step=0, start=0, size=2).item() == 0.0  # nothing trained yet
    finetuner.train(progress=False)
    trained = [p.detach().clone() for p in finetuner.parameters]
    assert finetuner.norm_loss(step=0, start=0, size=2).item() > 0
    assert all(torch.equal(p, t) for p, t in zip(finetuner.parameters, trained))  # swapped back after use


@pytest.mark.parametrize("variant", [dict(early_exit=False), dict(gradient_checkpointing=True, early_exit=False),
                                     dict(gradient_checkpointing=True)])
def test_lean_step_gives_the_same_loss_and_gradients_as_the_plain_one(variant):
    """The optimised step (early exit after the last 16x16 layer) equals the straightforward one in fp32."""
    def loss_and_grads(finetuner):
        samples = finetuner.sampler.batch(0, 0, 0, 4)
        noisy, timesteps = finetuner.random_inputs(0, 0, 4)
        with finetuner.capturing():  # backward meets the same processors (gradient checkpointing recomputes)
            loss = finetuner.sepen_terms(samples, noisy, timesteps).total.mean()
            loss.backward()
        return loss.detach(), [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in finetuner.parameters]

    lean_loss, lean_grads = loss_and_grads(Finetuner(config(), pipeline=tiny_pipeline()))
    plain_loss, plain_grads = loss_and_grads(Finetuner(config(**variant), pipeline=tiny_pipeline()))
    torch.testing.assert_close(lean_loss, plain_loss, atol=1e-6, rtol=0)
    for lean, plain in zip(lean_grads, plain_grads):
        torch.testing.assert_close(lean, plain, atol=1e-7, rtol=1e-5)


def test_bf16_trains_float32_master_weights_and_hands_back_the_pipeline_dtype():
    finetuner = Finetuner(config(mixed_precision="bf16", steps=2), pipeline=tiny_pipeline().to(dtype=torch.bfloat16))
    assert all(p.dtype == torch.float32 for p in finetuner.parameters)
    assert finetuner.unet.conv_in.weight.dtype == torch.bfloat16
    result = finetuner.train(progress=False)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in result.delta.tensors.values())
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in finetuner.parameters)
    finetuner.pipe("a cat and a dog", num_inference_steps=2)  # a plain pipeline again


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    """`accelerate launch` with 2 CPU processes of batch 2 = one process of batch 4 (the same global batch).

    Losses agree to the printed precision; weights to 1e-2 after 4 steps at lr 0.2: the per-process means are
    reduced in another order, and Adam normalises near-zero gradient components, so rounding-level
    differences in those show up as small weight differences.
    """
    common = ["--model", "tiny", "--pair", "cat", "dog", "--steps", "4", "--learning-rate", "0.05",
              "--device", "cpu", "--validation-inference-steps", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "sae_utils", "finetune"]
    subprocess.run(launch + common + ["--batch-size", "2", "--output-dir", str(tmp_path / "two")], env=env, check=True,
                   timeout=600, capture_output=True)
    subprocess.run([sys.executable, "-m", "sae_utils", "finetune"] + common +
                   ["--batch-size", "4", "--output-dir", str(tmp_path / "one")], env=env, check=True, timeout=600,
                   capture_output=True)
    one, two = (load_delta(tmp_path / d / "delta.safetensors") for d in ("one", "two"))
    for name in one.tensors:
        torch.testing.assert_close(one.tensors[name], two.tensors[name], atol=1e-2, rtol=0)
    losses = [[h["loss"] for h in json.loads((tmp_path / d / "history.json").read_text()) if "loss" in h]
              for d in ("one", "two")]
    assert losses[0] == pytest.approx(losses[1], abs=2e-6)


def test_auto_precision_follows_a_given_pipeline_and_a_mismatch_is_refused():
    pipe = tiny_pipeline().to(dtype=torch.bfloat16)
    assert Finetuner(config(), pipeline=pipe).precision == "bf16"
    with pytest.raises(ValueError, match="pipeline is in torch.float32 but mixed_precision='bf16'"):
        Finetuner(config(mixed_precision="bf16"), pipeline=tiny_pipeline())
    finetuner = Finetuner(config(steps=1), pipeline=tiny_pipeline().to(dtype=torch.bfloat16))
    finetuner.train(progress=False)
    assert {p.dtype for p in finetuner.unet.parameters()} == {torch.bfloat16}  # one dtype again: plain sampling works


def test_latent_scale_sets_the_spread_of_the_random_clean_latents():
    # at t = 0 the noisy latents are (almost) the clean ones: their std is the latent scale
    reference = Finetuner(config(timestep_range=(0, 1)), pipeline=tiny_pipeline())
    noisy, _ = reference.random_inputs(step=0, start=0, size=64)
    assert noisy.std().item() == pytest.approx(reference.pipe.vae.config.scaling_factor, rel=0.05)
    small = Finetuner(config(timestep_range=(0, 1), latent_scale=0.18215), pipeline=tiny_pipeline())
    assert small.random_inputs(step=0, start=0, size=64)[0].std().item() == pytest.approx(0.18215, rel=0.05)


def test_trajectory_latents_follow_the_models_own_sampling_path():
    # timesteps >= 900: the path stops within the first sampler steps, so the test stays short
    finetuner = Finetuner(config(latent_source="trajectory", timestep_range=(900, 1000)), pipeline=tiny_pipeline())
    samples = finetuner.sampler.batch(0, 0, 0, 2)
    latents, timesteps = finetuner.trajectory_inputs(samples, step=0, start=0)
    again, _ = finetuner.trajectory_inputs(samples, step=0, start=0)
    assert latents.shape == (2, 4, 32, 32) and torch.equal(latents, again) and len(set(timesteps.tolist())) == 1
    assert 900 <= timesteps[0] < 1000
    finetuner.train(progress=False)  # the whole step runs on them
    with pytest.raises(ValueError, match="latent_source"):
        config(latent_source="data").validate()


# ----------------------------------------------------------------------------------------------------------
# Reliability (issue 14): divergence, words, settings, reruns
# ----------------------------------------------------------------------------------------------------------
def quick(tmp_path, **overrides):
    """A run with an output folder whose validation costs little (one seed, one sampler step)."""
    return config(output_dir=str(tmp_path), validation_seeds=(0,), validation_inference_steps=1, **overrides)


def test_divergence_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    from sae_utils.checkpoint import load_checkpoint
    from sae_utils.finetune import DivergenceError

    # lr 1e20: step 1 is finite but throws the keys far out; step 2's gradient is NaN (it ran on, saving NaN)
    finetuner = Finetuner(quick(tmp_path, steps=4, learning_rate=1e20, checkpoint_every=1), pipeline=tiny_pipeline())
    with pytest.raises(DivergenceError, match=r"diverged at step 2: grad_norm = nan.*last good checkpoint \(step 1\)"):
        finetuner.train(progress=False)
    tensors, state = load_checkpoint(tmp_path / "checkpoint")
    assert state["step"] == 1 and all(torch.isfinite(t).all() for t in tensors.values())
    assert not (tmp_path / "delta.safetensors").exists()  # no NaN delta
    assert finetuner.step == 1 and all(torch.isfinite(p).all() for p in finetuner.parameters)  # not applied


def test_an_overflowing_loss_is_named_before_any_update():
    from sae_utils.finetune import DivergenceError

    finetuner = Finetuner(config(lambda_sep=3e38, lambda_en=3e38), pipeline=tiny_pipeline())
    before = [p.detach().clone() for p in finetuner.parameters]
    with pytest.raises(DivergenceError, match=r"step 1: loss = inf.*no checkpoint had been written") as error:
        finetuner.train(progress=False)
    assert error.value.step == 1 and "loss" in error.value.terms and "separate" not in error.value.terms
    assert all(torch.equal(p, b) for p, b in zip(finetuner.parameters, before))


@pytest.mark.parametrize("overrides, message", [
    (dict(lambda_sep=float("nan")), "lambda_sep must be >= 0 and finite"),
    (dict(lambda_en=float("inf")), "lambda_en must be >= 0 and finite"),
    (dict(learning_rate=float("inf")), "learning_rate must be > 0 and finite"),
    (dict(learning_rate=float("nan")), "learning_rate must be > 0 and finite"),
    (dict(max_grad_norm=-1.0), r"max_grad_norm must be > 0 \(inf: no clipping\)"),  # trained uphill
    (dict(max_grad_norm=0.0), "max_grad_norm must be > 0"),  # trained nothing
    (dict(max_grad_norm=float("nan")), "max_grad_norm must be > 0"),
    (dict(norm_loss_weight=float("nan")), "norm_loss_weight must be >= 0 and finite"),
    (dict(checkpoint_every=0), "checkpoint_every must be > 0"),  # ZeroDivisionError
    (dict(timestep_range=(5,)), r"timestep_range=\(5,\): expected a list of 2"),  # IndexError
    (dict(adam_betas=(0.9,)), r"adam_betas=\(0.9,\): expected a list of 2"),  # TypeError
    (dict(adam_betas=(0.9, 1.0)), r"each must be in \[0, 1\)"),
    (dict(seed=-1), "seed, validate_every and validation_seeds must be >= 0"),
    (dict(steps="200"), "steps='200': expected an integer"),  # a config file's string
    (dict(learning_rate="2e-6"), "learning_rate='2e-6': expected a number"),
    (dict(shuffle_order="yes"), "shuffle_order='yes': expected true or false"),
    (dict(latent_scale=float("nan")), "latent_scale must be a finite number > 0"),
    (dict(kernel_reading="gauss"), "kernel_reading='gauss'"),
    (dict(validation_inference_steps=0), "validation_inference_steps must be a positive integer"),
])
def test_settings_that_cannot_train_are_refused_before_any_work(overrides, message):
    with pytest.raises((ValueError, TypeError), match=message):
        config(**overrides).validate()


def test_a_learning_rate_beyond_float32_is_refused():
    with pytest.raises(ValueError, match="beyond float32"):
        Finetuner(config(learning_rate=1e38), pipeline=tiny_pipeline())


def test_each_word_trains_on_its_own_tokens():
    # the second word took its first occurrence: the template's "photo", or the "bear" of "teddy bear"
    for pair, expected in [(("photo", "dog"), [[5], [8]]), (("teddy bear", "bear"), [[5, 6], [9]]),
                           (("bear", "teddy bear"), [[5], [8, 9]])]:
        finetuner = Finetuner(config(pairs=[pair]), pipeline=tiny_pipeline())
        masks = finetuner.word_masks(finetuner.sampler.all_prompts())[0]
        assert [torch.nonzero(m).flatten().tolist() for m in masks] == expected, pair
    with pytest.raises(ValueError, match="same word"):
        Finetuner(config(pairs=[("cat", "Cat")]), pipeline=tiny_pipeline())


def test_validation_matches_whole_words():
    # 'pen' matched inside 'penguin' and the run died with a misleading WordNotInPromptError
    from sae_utils.prompts import multi_concept_split

    seen = multi_concept_split()["seen"]
    assert "pen" in seen and "penguin" in seen
    finetuner = Finetuner(config(pairs=None, concepts=seen, seed=27, steps=1), pipeline=tiny_pipeline())
    assert finetuner.validate()["validation"]["loss"] > 0
    custom = Finetuner(config(pairs=None, concepts=["pen", "penguin", "teddy bear", "bear"],
                              validation_prompts=["a photo of a penguin and a pen", "a teddy bear with a bear"]),
                       pipeline=tiny_pipeline())
    samples = custom.validation_samples()
    assert [s.words for s in samples] == [("penguin", "pen"), ("teddy bear", "bear")]
    assert [s.word_specs[1] for s in samples] == [("pen", 0), ("bear", 1)]
    with pytest.raises(ValueError, match="must name two different training concepts once each"):
        Finetuner(config(validation_prompts=["a photo of a cat"]), pipeline=tiny_pipeline())


def test_the_readme_example_undoes_to_the_base_model():
    pipe = tiny_pipeline()
    base = {n: pipe.unet.get_parameter(n).detach().clone() for n in Finetuner(config(), pipeline=tiny_pipeline())
            .trainable_names}
    finetuner = Finetuner(config(steps=1), pipeline=pipe)
    result = finetuner.train(progress=False)  # the trained keys stay in pipe
    assert not all(torch.equal(pipe.unet.get_parameter(n), v) for n, v in base.items())
    finetuner.restore_base()
    assert all(torch.equal(pipe.unet.get_parameter(n), v) for n, v in base.items())
    with apply_delta(pipe, result.delta):
        assert all(torch.equal(pipe.unet.get_parameter(n), result.delta.tensors[n]) for n in base)
    assert all(torch.equal(pipe.unet.get_parameter(n), v) for n, v in base.items())  # undone to the base


def test_a_finished_run_asked_again_leaves_its_delta_untouched(tmp_path):
    Finetuner(quick(tmp_path, steps=2), pipeline=tiny_pipeline()).train(progress=False)
    delta = tmp_path / "delta.safetensors"
    inode, content = delta.stat().st_ino, delta.read_bytes()
    Finetuner(quick(tmp_path, steps=2), pipeline=tiny_pipeline()).train(progress=False)
    assert delta.stat().st_ino == inode and delta.read_bytes() == content  # the same file: its sha is unchanged
    with pytest.raises(ValueError, match="at step 2, past steps=1"):  # it returned the longer run silently
        Finetuner(quick(tmp_path, steps=1), pipeline=tiny_pipeline())


def test_the_delta_names_a_folder_model_by_its_name(tmp_path):
    folder = tmp_path / "my-sd-copy"
    folder.mkdir()
    finetuner = Finetuner(config(model=str(folder), steps=1), pipeline=tiny_pipeline())
    assert finetuner.delta().metadata["base_model"] == "my-sd-copy"
