"""The toy model's trainer: a few steps run, resume bit for bit, refuse other settings, export a pipeline."""
import pytest
import torch

from sae_utils.models import load_pipeline
from sae_utils.toyworld.train_model import ToyTrainConfig, ToyTrainer


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


def test_resume_refuses_another_model(tmp_path):
    ToyTrainer(tmp_path, small(steps=2)).run()
    with pytest.raises(ValueError, match="other settings.*unet_channels"):
        ToyTrainer(tmp_path, small(unet_channels=(32, 64, 64)))


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
    for name, ema in zip([n for n, _ in trainer.unet.named_parameters()], trainer.ema):
        torch.testing.assert_close(pipe.unet.get_parameter(name), ema.half().float())  # the EMA weights ship
