import json
import os
from functools import lru_cache

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

import sae_utils.delta as delta_module
from sae_utils.attention import cross_attention_layers
from sae_utils.delta import (Delta, DeltaError, apply_delta, architecture_fingerprint, delta_summary, extract_delta,
                             load_delta, save_delta, trainable_parameter_names)
from sae_utils.models import SD_V1_UNET_CONFIG, tiny_pipeline



@lru_cache(maxsize=1)
def tiny_unet_config() -> dict:
    return dict(tiny_pipeline().unet.config)


def tiny_unet(seed: int = 0, **config_changes) -> UNet2DConditionModel:
    """The UNet of the `tiny` pipeline (random weights from `seed`), without building the rest of the pipeline."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DConditionModel.from_config({**tiny_unet_config(), **config_changes})


def sd_v1_meta_unet() -> UNet2DConditionModel:
    with init_empty_weights():
        return UNet2DConditionModel(**SD_V1_UNET_CONFIG)


def snapshot(unet) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in unet.named_parameters()}


def assert_unchanged(unet, before: dict[str, torch.Tensor]) -> None:
    after = dict(unet.named_parameters())
    assert after.keys() == before.keys()
    changed = [name for name, value in before.items() if not torch.equal(after[name], value)]
    assert changed == []


def trained_delta(unet, trainable: str = "k", scale: float = 0.5, seed: int = 1, **metadata) -> Delta:
    """A delta as finetuning would leave it: the selected weights moved; the UNet itself is left as it was."""
    names = trainable_parameter_names(unet, trainable)
    before = snapshot(unet)
    generator = torch.Generator().manual_seed(seed)
    params = dict(unet.named_parameters())
    with torch.no_grad():
        for name in names:
            params[name].add_(scale * torch.randn(params[name].shape, generator=generator))
    delta = extract_delta(unet, names, metadata)
    with torch.no_grad():
        for name, value in before.items():
            params[name].copy_(value)
    return delta


def unet_output(unet) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 16, 16, generator=generator)
    text = torch.randn(1, 8, unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        return unet(sample, 10, encoder_hidden_states=text).sample


# ----------------------------------------------------------------------------------------------------------
# Fingerprint and trainable sets
# ----------------------------------------------------------------------------------------------------------
def test_fingerprint_is_stable_and_independent_of_weights_and_dtype():
    a, b = tiny_pipeline(seed=0).unet, tiny_pipeline(seed=1).unet
    assert not torch.equal(a.conv_in.weight, b.conv_in.weight)
    fingerprint = architecture_fingerprint(a)
    assert len(fingerprint) == 16 and int(fingerprint, 16) >= 0
    assert architecture_fingerprint(b) == fingerprint
    assert architecture_fingerprint(b.to(torch.float16)) == fingerprint
    assert architecture_fingerprint(sd_v1_meta_unet()) != fingerprint
    assert architecture_fingerprint(tiny_unet(cross_attention_dim=48)) != fingerprint
    assert architecture_fingerprint(tiny_unet(attention_head_dim=4)) != fingerprint


def test_trainable_sets_select_the_cross_attention_projections(tiny):
    unet = tiny.unet
    layers = list(cross_attention_layers(unet))
    assert len(layers) == 10
    k = trainable_parameter_names(unet, "k")
    assert sorted(k) == sorted(f"{layer}.to_k.weight" for layer in layers)  # SD's projections have no bias
    kv = trainable_parameter_names(unet, "kv")
    assert len(kv) == 2 * len(k) and set(k) < set(kv)
    assert set(kv) - set(k) == set(trainable_parameter_names(unet, "v"))
    assert all(name.endswith("attn2.to_q.weight") for name in trainable_parameter_names(unet, "q"))
    assert trainable_parameter_names(unet) == k
    subset = layers[:2]
    assert trainable_parameter_names(unet, "kv", subset) == [
        n for n in kv if n.startswith((subset[0] + ".", subset[1] + "."))]
    assert len(trainable_parameter_names(unet, "kv", subset)) == 4


def test_trainable_set_errors_name_the_valid_options(tiny):
    with pytest.raises(ValueError, match="'k'.*'kv'.*'v'"):
        trainable_parameter_names(tiny.unet, "qk")
    with pytest.raises(ValueError) as error:
        trainable_parameter_names(tiny.unet, "k", ["down_blocks.9.attn2"])
    assert "down_blocks.9.attn2" in str(error.value)
    assert "down_blocks.2.attentions.0.transformer_blocks.0.attn2" in str(error.value)
    with pytest.raises(ValueError, match="selects no parameter"):
        trainable_parameter_names(tiny.unet, "k", [])
    with pytest.raises(TypeError, match="list"):
        trainable_parameter_names(tiny.unet, "k", "down_blocks.2.attentions.0.transformer_blocks.0.attn2")


def test_sd_v1_key_set_is_16_tensors_of_9_6_million_values():
    unet = sd_v1_meta_unet()
    names = trainable_parameter_names(unet, "k")
    params = dict(unet.named_parameters())
    assert len(names) == 16
    assert sum(params[n].numel() for n in names) == 9_584_640
    assert len(trainable_parameter_names(unet, "kv")) == 32
    # a delta of meta tensors costs no memory and has the sizes of the real one
    delta = Delta({n: torch.empty(params[n].shape, dtype=torch.float16, device="meta") for n in names})
    assert delta.num_values == 9_584_640 and delta.nbytes == 19_169_280
    summary = delta_summary(delta)
    assert "16 tensors" in summary and "9,584,640 values" in summary
    assert "38.3 MB at fp32" in summary and "19.2 MB at fp16" in summary


# ----------------------------------------------------------------------------------------------------------
# Extract, save, load
# ----------------------------------------------------------------------------------------------------------
def test_extract_copies_and_records_what_it_holds(tiny):
    names = trainable_parameter_names(tiny.unet, "kv", list(cross_attention_layers(tiny.unet))[:3])
    delta = extract_delta(tiny, names, {"concepts": ("cat", "dog"), "training_config": {"lr": 8e-6}})
    params = dict(tiny.unet.named_parameters())
    assert list(delta.tensors) == names
    for name, value in delta.tensors.items():
        assert torch.equal(value, params[name]) and value.data_ptr() != params[name].data_ptr()
        assert value.device.type == "cpu" and not value.requires_grad
    meta = delta.metadata
    assert meta["fingerprint"] == architecture_fingerprint(tiny.unet)
    assert meta["trainable"] == "kv" and len(meta["layers"]) == 3
    assert meta["concepts"] == ["cat", "dog"] and meta["training_config"] == {"lr": 8e-6}
    assert meta["dtype"] == "float32" and meta["sae_utils_version"] and meta["created"]
    assert meta["tensors"] == {name: list(params[name].shape) for name in names}
    assert delta.num_values == sum(params[n].numel() for n in names)
    assert delta.nbytes == 4 * delta.num_values


def test_extract_rejects_bad_input(tiny):
    k = trainable_parameter_names(tiny.unet, "k")
    with pytest.raises(ValueError, match="Not parameters"):
        extract_delta(tiny.unet, ["nope.weight"])
    with pytest.raises(ValueError, match="No parameter names"):
        extract_delta(tiny.unet, [])
    with pytest.raises(ValueError, match="JSON"):
        extract_delta(tiny.unet, k, {"training_config": {"dtype": torch.float16}})
    with pytest.raises(ValueError, match="trainable='v'"):
        extract_delta(tiny.unet, k, {"trainable": "v"})


def test_round_trip_is_bitwise(tmp_path):
    unet = tiny_unet()
    delta = trained_delta(unet, "kv", base_model="tiny", concepts=["cat", "dog"], prompts=["a cat and a dog"])
    path = save_delta(delta, tmp_path / "d.safetensors")
    assert path == tmp_path / "d.safetensors"
    loaded = load_delta(path)
    hash_key = delta_module.HASH_KEY
    assert {k: v for k, v in loaded.metadata.items() if k != hash_key} == delta.metadata
    assert len(loaded.metadata[hash_key]) == 64  # the sha256 of the content, checked on every load
    assert list(loaded.tensors) == list(delta.tensors)  # same order too
    for name, value in delta.tensors.items():
        assert loaded.tensors[name].dtype == value.dtype and torch.equal(loaded.tensors[name], value)


def _data_bytes(path) -> int:
    """A safetensors file is an 8-byte header length, the JSON header, then the raw tensor bytes."""
    raw = path.read_bytes()
    return len(raw) - 8 - int.from_bytes(raw[:8], "little")


def test_float16_option_halves_the_tensor_bytes(tmp_path):
    delta = trained_delta(tiny_unet())
    full = save_delta(delta, tmp_path / "fp32.safetensors")
    half = save_delta(delta, tmp_path / "fp16.safetensors", dtype=torch.float16)
    assert _data_bytes(full) == delta.nbytes
    assert _data_bytes(half) == delta.nbytes // 2
    loaded = load_delta(half)
    assert loaded.metadata["dtype"] == "float16" and delta.metadata["dtype"] == "float32"
    for name, value in delta.tensors.items():
        assert loaded.tensors[name].dtype == torch.float16
        assert torch.equal(loaded.tensors[name], value.half())


# ----------------------------------------------------------------------------------------------------------
# Apply and undo
# ----------------------------------------------------------------------------------------------------------
def test_apply_changes_the_output_and_undo_restores_it_bitwise():
    unet = tiny_unet()
    delta = trained_delta(unet)
    before, output = snapshot(unet), unet_output(unet)
    handle = apply_delta(unet, delta)
    params = dict(unet.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in delta.tensors.items())
    assert not torch.allclose(unet_output(unet), output, atol=1e-4)
    handle.undo()
    assert_unchanged(unet, before)
    assert torch.equal(unet_output(unet), output)
    handle.undo()  # idempotent
    assert not handle.active
    assert_unchanged(unet, before)


def test_context_manager_applies_a_delta_from_another_model_of_the_same_architecture(tmp_path):
    pipe = tiny_pipeline(seed=0)
    delta = load_delta(save_delta(trained_delta(tiny_unet(seed=1)), tmp_path / "d.safetensors", torch.float16))
    before, output = snapshot(pipe.unet), unet_output(pipe.unet)
    with apply_delta(pipe, delta) as handle:  # a pipeline works as well as a bare UNet
        assert handle.active
        params = dict(pipe.unet.named_parameters())
        for name, value in delta.tensors.items():  # fp16 values cast into the fp32 UNet
            assert params[name].dtype == torch.float32 and torch.equal(params[name], value.float())
        assert not torch.allclose(unet_output(pipe.unet), output, atol=1e-4)
    assert not handle.active
    assert_unchanged(pipe.unet, before)
    assert torch.equal(unet_output(pipe.unet), output)


def test_context_manager_undoes_on_error():
    unet = tiny_unet()
    before = snapshot(unet)
    with pytest.raises(RuntimeError, match="boom"):
        with apply_delta(unet, trained_delta(unet)):
            raise RuntimeError("boom")
    assert_unchanged(unet, before)


def test_a_layer_subset_delta_changes_only_its_layers():
    unet = tiny_unet()
    layer = "down_blocks.2.attentions.0.transformer_blocks.0.attn2"
    names = trainable_parameter_names(unet, "k", [layer])
    with torch.no_grad():
        dict(unet.named_parameters())[names[0]].mul_(2)
    delta = extract_delta(unet, names)
    fresh = tiny_unet()
    before = snapshot(fresh)
    with apply_delta(fresh, delta):
        changed = [n for n, p in fresh.named_parameters() if not torch.equal(p, before[n])]
        assert changed == [f"{layer}.to_k.weight"]


def test_undo_refuses_to_discard_later_changes():
    unet = tiny_unet()
    before = snapshot(unet)
    handle = apply_delta(unet, trained_delta(unet))
    name = next(iter(handle.delta.tensors))
    with torch.no_grad():
        dict(unet.named_parameters())[name].add_(1.0)  # e.g. training went on
    with pytest.raises(DeltaError, match="changed since the delta was applied"):
        handle.undo()
    assert handle.active
    handle.undo(force=True)
    assert_unchanged(unet, before)


# ----------------------------------------------------------------------------------------------------------
# Bad deltas are rejected and leave the pipeline untouched
# ----------------------------------------------------------------------------------------------------------
def test_delta_of_another_architecture_is_rejected_and_names_both():
    unet = tiny_unet()
    other = tiny_unet(cross_attention_dim=48)
    delta = trained_delta(other, base_model="other/model")
    before = snapshot(unet)
    with pytest.raises(DeltaError) as error:
        apply_delta(unet, delta)
    message = str(error.value)
    assert architecture_fingerprint(unet) in message and architecture_fingerprint(other) in message
    assert "other/model" in message and "only applies to the architecture it was trained on" in message
    assert "cross_attention_dim: delta 48, UNet 32" in message
    assert_unchanged(unet, before)
    # without the fingerprint check the shapes still stop it
    with pytest.raises(DeltaError, match="Shapes differ"):
        apply_delta(unet, delta, strict=False)
    assert_unchanged(unet, before)


def test_wrong_fingerprint_is_rejected_unless_not_strict():
    unet = tiny_unet()
    delta = trained_delta(unet)
    delta.metadata["fingerprint"] = "0123456789abcdef"
    before = snapshot(unet)
    with pytest.raises(DeltaError, match="0123456789abcdef"):
        apply_delta(unet, delta)
    assert_unchanged(unet, before)
    name = next(iter(delta.tensors))
    with apply_delta(unet, delta, strict=False):
        assert torch.equal(dict(unet.named_parameters())[name], delta.tensors[name])
        assert not torch.equal(delta.tensors[name], before[name])
    assert_unchanged(unet, before)


@pytest.mark.parametrize("defect", ["wrong shape", "unknown name", "not finite", "unlisted tensor"])
def test_malformed_delta_is_rejected_before_anything_changes(defect):
    unet = tiny_unet()
    delta = trained_delta(unet)
    names = list(delta.tensors)
    last = names[-1]  # the last tensor: a partial apply would already have changed the others
    if defect == "wrong shape":
        delta.tensors[last] = torch.zeros(3, 3)
        delta.metadata["tensors"][last] = [3, 3]
    elif defect == "unknown name":
        delta.tensors["up_blocks.9.attn2.to_k.weight"] = torch.zeros(3, 3)
        delta.metadata["tensors"]["up_blocks.9.attn2.to_k.weight"] = [3, 3]
    elif defect == "not finite":
        delta.tensors[last][0, 0] = float("nan")
    else:
        delta.tensors["extra"] = torch.zeros(2)
    before = snapshot(unet)
    with pytest.raises(DeltaError) as error:
        apply_delta(unet, delta)
    expected = {"wrong shape": "Shapes differ", "unknown name": "has no parameters", "not finite": "NaN",
                "unlisted tensor": "not listed"}[defect]
    assert expected in str(error.value)
    assert_unchanged(unet, before)


def _written_delta(tmp_path):
    return save_delta(trained_delta(tiny_unet()), tmp_path / "good.safetensors")


def test_truncated_file_is_rejected(tmp_path):
    raw = _written_delta(tmp_path).read_bytes()
    for cut in (len(raw) // 2, 20, 0):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(raw[:cut])
        with pytest.raises(DeltaError) as error:
            load_delta(bad)
        assert str(bad) in str(error.value) and "truncated or corrupted; re-save it or re-train" in str(error.value)


def test_random_bytes_and_missing_files_are_rejected(tmp_path):
    noise = tmp_path / "noise.safetensors"
    noise.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
                      .numpy().tobytes())
    with pytest.raises(DeltaError, match="truncated or corrupted"):
        load_delta(noise)
    with pytest.raises(DeltaError, match="does not exist"):
        load_delta(tmp_path / "missing.safetensors")
    with pytest.raises(DeltaError, match="folder"):
        load_delta(tmp_path)


def test_files_with_missing_tensors_or_no_metadata_are_rejected(tmp_path):
    unet = tiny_unet()
    delta = trained_delta(unet)
    names = list(delta.tensors)
    missing = tmp_path / "missing.safetensors"
    save_file({n: delta.tensors[n] for n in names[1:]}, missing, metadata={"sae_utils": json.dumps(delta.metadata)})
    with pytest.raises(DeltaError, match=r"1 listed but missing \['" + names[0].replace(".", r"\.")):
        load_delta(missing)
    plain = tmp_path / "plain.safetensors"
    save_file(delta.tensors, plain)
    with pytest.raises(DeltaError, match="not a sae_utils delta"):
        load_delta(plain)
    garbled = tmp_path / "garbled.safetensors"
    save_file(delta.tensors, garbled, metadata={"sae_utils": "{not json"})
    with pytest.raises(DeltaError, match="not valid JSON"):
        load_delta(garbled)


# ----------------------------------------------------------------------------------------------------------
# Atomic save
# ----------------------------------------------------------------------------------------------------------
def test_saving_over_a_delta_replaces_it_and_leaves_no_temp_files(tmp_path):
    unet = tiny_unet()
    old, new = trained_delta(unet, seed=1), trained_delta(unet, seed=2)
    path = save_delta(old, tmp_path / "d.safetensors")
    save_delta(new, path)
    assert os.listdir(tmp_path) == ["d.safetensors"]
    loaded = load_delta(path)
    assert all(torch.equal(loaded.tensors[n], v) for n, v in new.tensors.items())


def test_an_interrupted_save_keeps_the_old_delta(tmp_path, monkeypatch):
    unet = tiny_unet()
    old, new = trained_delta(unet, seed=1), trained_delta(unet, seed=2)
    path = save_delta(old, tmp_path / "d.safetensors")

    def crash_halfway(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 100)
        raise OSError("disk full")

    monkeypatch.setattr(delta_module, "save_file", crash_halfway)
    with pytest.raises(OSError, match="disk full"):
        save_delta(new, path)
    assert os.listdir(tmp_path) == ["d.safetensors"]
    loaded = load_delta(path)
    assert all(torch.equal(loaded.tensors[n], v) for n, v in old.tensors.items())


def test_summary_names_what_matters():
    delta = trained_delta(tiny_unet(), base_model="tiny", concepts=["cat", "dog"])
    summary = delta_summary(delta)
    assert f"{len(delta.tensors)} tensors" in summary and f"{delta.num_values:,} values" in summary
    assert "trainable 'k'" in summary and "base model: tiny" in summary and "cat, dog" in summary
    assert delta.metadata["fingerprint"] in summary


# ----------------------------------------------------------------------------------------------------------
# Corrupted deltas: every kind is refused, with what is wrong
# ----------------------------------------------------------------------------------------------------------
def _header_length(raw: bytes) -> int:
    return 8 + int.from_bytes(raw[:8], "little")


@pytest.mark.parametrize("where", ["first data byte", "middle data byte", "last data byte", "metadata digit"])
def test_one_changed_byte_is_refused(tmp_path, where):
    path = save_delta(trained_delta(tiny_unet(), base_model="tiny", steps=200), tmp_path / "d.safetensors")
    raw = bytearray(path.read_bytes())
    start = _header_length(raw)
    if where == "metadata digit":  # still valid JSON, a silently different delta without the hash
        at = raw.index(b'\\"steps\\": 200') + len(b'\\"steps\\": ')
        raw[at] = ord("3")
    else:
        at = {"first data byte": start, "middle data byte": (start + len(raw)) // 2,
              "last data byte": len(raw) - 1}[where]
        raw[at] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(DeltaError, match="corrupted: its content does not match the sha256"):
        load_delta(path)


def test_values_scaled_by_1e30_are_refused_in_a_file_and_in_memory(tmp_path):
    unet = tiny_unet()
    delta = trained_delta(unet)
    path = save_delta(delta, tmp_path / "d.safetensors")
    raw = bytearray(path.read_bytes())
    start = _header_length(raw)
    scaled = torch.frombuffer(bytearray(raw[start:start + 4]), dtype=torch.float32) * 1e30  # one value, x1e30
    raw[start:start + 4] = scaled.numpy().tobytes()
    path.write_bytes(bytes(raw))
    with pytest.raises(DeltaError, match="sha256"):
        load_delta(path)
    name = next(iter(delta.tensors))
    delta.tensors[name] = delta.tensors[name] * 1e30  # made in memory, no file to hash
    before = snapshot(unet)
    with pytest.raises(DeltaError, match="times the size .* not a finetune of this model"):
        apply_delta(unet, delta)
    assert_unchanged(unet, before)


def test_a_delta_that_overflows_the_unets_dtype_is_refused():
    unet = tiny_unet().to(torch.float16)
    delta = trained_delta(tiny_unet())
    name = next(iter(delta.tensors))
    delta.tensors[name] = delta.tensors[name].clone()
    delta.tensors[name][0, 0] = 1e6  # finite in float32, inf in float16
    with pytest.raises(DeltaError, match="overflow the UNet's torch.float16"):
        apply_delta(unet, delta)


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool, torch.int64])
def test_tensors_that_are_not_floats_are_refused(tmp_path, dtype):
    delta = trained_delta(tiny_unet())
    tensors = {n: (t * 10).to(dtype) for n, t in delta.tensors.items()}  # the right shapes, the wrong kind
    path = tmp_path / "ints.safetensors"
    save_file(tensors, path, metadata={"sae_utils": json.dumps(delta.metadata)})
    with pytest.raises(DeltaError, match=f"must be float32, float16 or bfloat16 .*{str(dtype).removeprefix('torch.')}"):
        load_delta(path)
    with pytest.raises(DeltaError, match="must be float32"):
        apply_delta(tiny_unet(), Delta(tensors, delta.metadata))


@pytest.mark.parametrize("metadata", ["[1, 2]", '"a string"', "3", "null"])
def test_metadata_that_is_not_a_json_object_is_refused(tmp_path, metadata):
    path = tmp_path / "list.safetensors"
    save_file(trained_delta(tiny_unet()).tensors, path, metadata={"sae_utils": metadata})
    with pytest.raises(DeltaError, match="not an object"):
        load_delta(path)


def test_a_delta_of_the_toy_model_can_be_extracted_and_names_it_portably(tmp_path):
    from sae_utils.models import load_pipeline

    toy = load_pipeline("toy", device="cpu")  # its name_or_path is a Path: extract_delta crashed on it
    delta = extract_delta(toy, trainable_parameter_names(toy.unet, "k"))
    assert delta.metadata["base_model"] == "toy"
    folder = tmp_path / "my-sd-copy"
    tiny_pipeline().save_pretrained(folder)
    copy = load_pipeline(str(folder), device="cpu")
    assert extract_delta(copy, trainable_parameter_names(copy.unet, "k")).metadata["base_model"] == "my-sd-copy"
