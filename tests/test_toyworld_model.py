"""The toy model's trainer: a few steps run, resume bit for bit, refuse other settings, export a pipeline."""
import pytest
import torch

from sae_utils.models import load_pipeline
from sae_utils.toyworld.train_model import ToyTrainConfig, ToyTrainer, text_transformer_layers


def small(**overrides):
    base = dict(vae_steps=2, vae_batch=4, steps=4, batch=4, checkpoint_every=2, eval_every=0,
                unet_channels=(32, 32, 32), warmup=2)
    return ToyTrainConfig(**{**base, **overrides})


def state(trainer):
    return {**{f"unet.{k}": v for k, v in trainer.unet.state_dict().items()},
            **{f"ema.{i}": e for i, e in enumerate(trainer.ema)},
            **{f"vae.{k}": v for k, v in trainer.vae.state_dict().items()}}



def test_resume_continues_bit_for_bit(tmp_path):
    straight = ToyTrainer(tmp_path / "a", small())
    straight.run()
    interrupted = ToyTrainer(tmp_path / "b", small(steps=2))
    interrupted.run()
    resumed = ToyTrainer(tmp_path / "b", small(steps=4))
    assert (resumed.vae_step, resumed.step) == (2, 2)
    resumed.run()
    a, b = state(straight), state(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]
    assert straight.vae.config.scaling_factor == resumed.vae.config.scaling_factor


def test_resume_refuses_another_model_or_other_data_and_a_mistyped_spec_fails_early(tmp_path):
    ToyTrainer(tmp_path, small(steps=2)).run()
    with pytest.raises(ValueError, match="other settings.*unet_channels"):
        ToyTrainer(tmp_path, small(unet_channels=(32, 64, 64)))
    with pytest.raises(ValueError, match="other settings.*kind_frequencies"):
        ToyTrainer(tmp_path, small(steps=4, kind_frequencies="ring=0.25"))
    with pytest.raises(ValueError, match="other settings.*word_order"):
        ToyTrainer(tmp_path, small(steps=4, word_order="fixed"))
    with pytest.raises(ValueError, match="word_order 'sorted': use one of"):
        ToyTrainer(tmp_path / "new", small(word_order="sorted"))
    with pytest.raises(ValueError, match="'rign' is not a kind"):
        ToyTrainer(tmp_path / "new", small(kind_frequencies="rign=0.25"))
    assert not (tmp_path / "new" / "checkpoint").exists()


def test_export_is_a_standard_pipeline(tmp_path):
    trainer = ToyTrainer(tmp_path / "train", small(steps=2))
    trainer.run()
    folder = trainer.export(tmp_path / "model")
    pipe = load_pipeline(folder, device="cpu")
    assert pipe.unet.dtype == torch.float32  # stored in fp16, loaded as asked
    image = pipe("a photo of a star and a heart", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 32, 32, 3)
    info = __import__("json").loads((folder / "toy_model.json").read_text())
    assert {"star", "heart", "red"} <= set(info["vocabulary"]) and info["sampling"]["num_inference_steps"] == 25
    command = info["training"]["command"]  # reproduces the run: the settings that differ from the defaults
    assert "--steps 2 " in command and "--unet-channels 32,32,32" in command and "--lr " not in command
    for name, ema in zip([n for n, _ in trainer.unet.named_parameters()], trainer.ema):
        torch.testing.assert_close(pipe.unet.get_parameter(name), ema.half().float())  # the EMA weights ship


def test_a_warm_start_into_a_deeper_text_encoder_starts_as_the_folder_and_then_trains_its_new_layers(tmp_path):
    source = ToyTrainer(tmp_path / "source", small(steps=2))
    source.run()
    folder = source.export(tmp_path / "model")
    deeper = ToyTrainer(tmp_path / "deeper", small(steps=2, text_layers=2, init_from=str(folder), word_order="fixed"))
    pipe = load_pipeline(folder, device="cpu")
    ids = pipe.tokenizer(["a photo of a star and a heart", ""], padding="max_length", max_length=77,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(deeper.text_encoder(ids)[0], pipe.text_encoder(ids)[0])  # the new layers pass it through
    deeper.run()
    assert text_transformer_layers(deeper.text_encoder)[1].mlp.fc2.weight.abs().sum() > 0  # and they learn
    with pytest.raises(ValueError, match="has 2 transformer layers and this run asks for 0.*--text-layers 2"):
        ToyTrainer(tmp_path / "shallower", small(init_from=str(deeper.export(tmp_path / "deeper_model"))))


def test_attention_prior_is_zero_for_maps_on_the_objects_and_log_ratio_for_flat_maps():
    import math

    import torch.nn.functional as F

    from sae_utils.tokens import token_positions
    from sae_utils.toyworld.train_model import ToyTrainer
    from sae_utils.toyworld.world import caption, make_rng, object_masks, sample_scene

    trainer = ToyTrainer("/nonexistent-never-written", small(attention_prior=1.0))
    scene = sample_scene(make_rng(0), ["star", "heart"])
    text = caption(scene)
    masks = F.adaptive_avg_pool2d(torch.from_numpy(object_masks(scene))[:, None], 16)[:, 0]

    class Store:  # what attention_prior_loss reads: the captured layers and their (B, T, h, w) maps
        layers = ["one 16x16 layer"]

        def __init__(self, maps):
            self.maps = maps

        def layer_maps(self, layer):
            return self.maps

    on_objects = torch.full((1, 77, 16, 16), 1e-12)
    for k, spec in enumerate(scene.objects):
        on_objects[0, token_positions(trainer.tokenizer, text, spec.kind)] = masks[k]
    assert trainer.attention_prior_loss(Store(on_objects), [scene], [text]).item() == pytest.approx(0, abs=1e-4)
    flat = torch.full((1, 77, 16, 16), 1 / 77)
    expected = sum(torch.special.xlogy(t, t * 256).sum() for t in (m / m.sum() for m in masks)) / 2  # KL(t || 1/256)
    loss = trainer.attention_prior_loss(Store(flat), [scene], [text]).item()
    assert loss == pytest.approx(expected.item(), rel=1e-3) and loss > math.log(2)
    assert trainer.attention_prior_loss(Store(flat), [scene], [""]).item() == 0  # an empty caption names nothing


def test_a_resumed_run_records_what_it_changed_and_from_which_step(tmp_path):
    ToyTrainer(tmp_path, small(steps=2)).run()
    resumed = ToyTrainer(tmp_path, small(steps=4, attention_prior=0.01))
    assert resumed.config.extra["changes"] == [{"step": 2, "changed": {"steps": [2, 4], "attention_prior": [0.0, 0.01]}}]


def test_the_shipped_toy_model_loads_offline_and_draws_what_it_is_asked():
    import json
    import os

    from sae_utils.models import TOY_MODEL_DIR, model_info
    from sae_utils.toyworld.evaluator import objects_present

    weights = [p for p in TOY_MODEL_DIR.rglob("*.safetensors")]
    assert sum(p.stat().st_size for p in weights) < 30e6 and len(weights) == 3  # fp16, small enough for git
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # loading must not need the network
    pipe = load_pipeline("toy", device="cpu")
    assert len(pipe.tokenizer) == 49408 and pipe.unet.dtype == torch.float32
    kinds = ["star", "heart", "ring", "cross"]
    images = pipe([f"a photo of a {k}" for k in kinds], generator=[torch.Generator().manual_seed(100_000 + i)
                                                                  for i in range(4)], output_type="np").images
    assert images.shape == (4, 32, 32, 3)
    found = objects_present((images * 255).round().astype("uint8"), [[k] for k in kinds])
    assert found.float().mean() >= 0.75, found  # the committed rate is >= 0.9 on 256 images; 4 may miss one
    info = model_info(pipe)
    assert info["base_rates"]["single"]["all_present"]["rate"] >= 0.9 and info["base_rates"]["single"]["all_present"]["n"] >= 200
    assert json.loads(json.dumps(info["training"]))["diffusion_steps"] > 1000
