import time

import pytest
import torch
from diffusers import StableDiffusionPipeline
from transformers import CLIPTokenizer

from sae_utils.attention import cross_attention_layers, layers_at_resolution
from sae_utils.models import (SD_V1_UNET_CONFIG, ModelNotAvailableError, check_tokenizer, load_pipeline,
                              resolve_dtype, tiny_pipeline)


def test_tiny_has_the_sd_v1_layout(tiny):
    config = tiny.unet.config
    assert tuple(config.down_block_types) == SD_V1_UNET_CONFIG["down_block_types"]
    assert tuple(config.up_block_types) == SD_V1_UNET_CONFIG["up_block_types"]
    resolutions = {config.sample_size // f for f in cross_attention_layers(tiny.unet).values()}
    assert resolutions == {32, 16, 8, 4}  # three cross-attention down levels and the mid block
    assert len(tiny.tokenizer) == 49408 and tiny.tokenizer.model_max_length == 77
    assert isinstance(tiny, StableDiffusionPipeline)


def test_tiny_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    a, b = tiny_pipeline(), tiny_pipeline()
    assert torch.rand(1).item() == expected.item()
    for pa, pb in zip(a.unet.parameters(), b.unet.parameters()):
        assert torch.equal(pa, pb)
    assert not torch.equal(tiny_pipeline(seed=1).unet.conv_in.weight, a.unet.conv_in.weight)


def test_tiny_generates_an_image(tiny):
    # its speed (well under a second on a 2-core CPU) is measured by benchmarks/tiny_pipeline.py
    out = tiny("a cat and a dog", num_inference_steps=5, generator=torch.Generator().manual_seed(0),
               output_type="np")
    assert out.images.shape == (1, 64, 64, 3)
    assert 0.0 <= out.images.min() and out.images.max() <= 1.0 and out.images.std() > 0


def test_same_seed_same_image(tiny):
    images = [tiny("a cat", num_inference_steps=3, generator=torch.Generator().manual_seed(7),
                   output_type="np").images for _ in range(2)]
    assert (images[0] == images[1]).all()


def test_unreachable_hub_model_fails_fast_with_a_useful_message():
    start = time.perf_counter()
    with pytest.raises(ModelNotAvailableError) as error:
        load_pipeline("CompVis/stable-diffusion-v1-4", device="cpu")
    message = str(error.value)
    assert time.perf_counter() - start < 10
    assert "CompVis/stable-diffusion-v1-4" in message
    assert "local folder" in message and "toy" in message and "tiny" in message


def test_local_folder_round_trip(tiny, tmp_path):
    tiny.save_pretrained(tmp_path)
    loaded = load_pipeline(tmp_path, device="cpu")
    assert torch.equal(loaded.unet.conv_in.weight, tiny.unet.conv_in.weight)
    assert loaded.unet.dtype == torch.float32


def test_single_checkpoint_file_gets_a_conversion_hint():
    with pytest.raises(ModelNotAvailableError, match="from_single_file"):
        load_pipeline("sd-v1-4.ckpt", device="cpu")


def test_dtype_choice():
    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert resolve_dtype(None, torch.device("cuda")) == torch.float16
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match="Unknown dtype"):
        resolve_dtype("float8", torch.device("cpu"))
    pipe = load_pipeline("tiny", device="cpu", dtype="bfloat16")
    assert pipe.unet.dtype == torch.bfloat16 and pipe.text_encoder.dtype == torch.bfloat16


def test_a_fallback_tokenizer_is_rejected(tmp_path):
    # transformers builds a near-empty tokenizer instead of failing on a folder without tokenizer files
    with pytest.raises(ModelNotAvailableError, match="49408"):
        check_tokenizer(CLIPTokenizer(), where=str(tmp_path))


def test_sd_v1_layer_selection_on_the_real_architecture():
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        unet = UNet2DConditionModel(**SD_V1_UNET_CONFIG)
    layers = cross_attention_layers(unet)
    assert len(layers) == 16  # the 16 transformer blocks of SD v1
    chosen = layers_at_resolution(unet, 16)
    assert {name.split(".attentions")[0] for name in chosen} == {"down_blocks.2", "up_blocks.1"}
    assert len(chosen) == 5
    keys = sum(unet.get_submodule(name).to_k.weight.numel() for name in layers)
    assert keys == 9_584_640  # SD v1.4 K-only delta: 9.6 M values


def test_a_missing_local_folder_is_reported_as_a_missing_folder(tmp_path):
    # it was reported as "not in the Hugging Face cache"
    for name in (str(tmp_path / "no-such-model"), "./outputs/no-such-model", "~/no/such/model"):
        with pytest.raises(ModelNotAvailableError, match="No model folder at") as error:
            load_pipeline(name, device="cpu")
        assert "cache" not in str(error.value)
    with pytest.raises(ModelNotAvailableError, match=r"nor a local folder: .*outputs/no-such-model does not exist"):
        load_pipeline("outputs/no-such-model", device="cpu")  # could be a hub id too: both are said


def test_a_hub_error_becomes_the_clear_error(monkeypatch):
    """With the network on and a hub host that accepts connections, diffusers' own OSError (a repository not
    found, a proxy's error page) used to replace the clear error."""
    import sae_utils.models as models

    def from_pretrained(source, dtype, safety_checker, local_files_only):
        raise OSError(f"{source} is not a local folder and is not a valid model identifier" if local_files_only
                      else "401 Client Error: Repository Not Found for url: https://huggingface.co/api/models/x/y")

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(models, "_hub_reachable", lambda: True)
    monkeypatch.setattr(models, "_from_pretrained", from_pretrained)
    with pytest.raises(ModelNotAvailableError, match=r"Cannot load 'x/y' from the hub.*401.*Check the id"):
        load_pipeline("x/y", device="cpu")


def test_a_delta_names_its_base_model_portably(tiny, tmp_path):
    from sae_utils.models import TOY_MODEL_DIR, portable_model_name

    assert portable_model_name("CompVis/stable-diffusion-v1-4") == "CompVis/stable-diffusion-v1-4"
    assert portable_model_name(TOY_MODEL_DIR) == "toy" and portable_model_name("toy") == "toy"
    tiny.save_pretrained(tmp_path / "my-model")
    assert portable_model_name(tmp_path / "my-model") == "my-model"  # not this machine's path
