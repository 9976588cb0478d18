"""Fault injection (issue 14): kills at chosen instants of every write, corrupted checkpoints and deltas, and the
bad values of each command line. Each test checks that the message names the problem and that what is on disk
is intact or resumes exactly.

A kill is real: the write runs in a forked child that SIGKILLs itself when the code reaches the named instant
(`sae_utils.checkpoint.fault_point`), so no `finally` or `except` of the code runs after it, as after a power cut
or the OOM killer. The children do file work only (no torch kernels), so forking is safe.
"""
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import warnings

import pytest
import torch

import sae_utils.checkpoint as checkpoint
from sae_utils.checkpoint import CheckpointError, find_checkpoint, load_checkpoint, save_checkpoint
from sae_utils.cli import main
from sae_utils.finetune import FinetuneConfig, Finetuner
from sae_utils.models import tiny_pipeline
from sae_utils.sampling import GenerationConfig, append_records, generate, image_relpath, read_metadata


def killed_at(point: str, action, hit: int = 1) -> None:
    """Run `action()` in a forked child that is killed (SIGKILL) the `hit`-th time it reaches `point`."""
    pid = os.fork()
    if pid == 0:  # the child: never returns to pytest
        try:
            reached = [0]

            def hook(name):
                if name == point:
                    reached[0] += 1
                    if reached[0] == hit:
                        os.kill(os.getpid(), signal.SIGKILL)

            checkpoint.FAULT_HOOK = hook
            action()
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"{point} was never reached"


def leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name)


# ----------------------------------------------------------------------------------------------------------
# Checkpoints: a kill at any instant of a write
# ----------------------------------------------------------------------------------------------------------
def tensors_of(version: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(version)
    return {f"w{i}": torch.randn(64, 64, generator=generator) for i in range(3)}


# (instant, the step found afterwards): before its renames the old checkpoint stands; between them the new copy
# is complete and is recovered; after them it is in place
INSTANTS = [("checkpoint:shard-written", 1), ("checkpoint:manifest-written", 1),
            ("checkpoint:between-renames", 2), ("checkpoint:swapped", 2)]


@pytest.mark.parametrize("point, step", INSTANTS)
def test_a_kill_during_a_checkpoint_write_leaves_one_complete_checkpoint(tmp_path, point, step):
    folder = tmp_path / "checkpoint"
    save_checkpoint(folder, tensors_of(1), {"step": 1}, max_shard_mb=0.01)  # 3 shards: kills between them too
    killed_at(point, lambda: save_checkpoint(folder, tensors_of(2), {"step": 2}, max_shard_mb=0.01))
    assert leftovers(tmp_path)  # what the kill left (before the fix: never cleaned)
    assert find_checkpoint(folder) == folder  # between the renames there was no checkpoint/ at all
    tensors, state = load_checkpoint(folder)
    assert state == {"step": step}
    assert all(torch.equal(tensors[k], v) for k, v in tensors_of(step).items())
    assert leftovers(tmp_path) == []


def test_a_kill_during_the_first_checkpoint_write_leaves_none_and_no_leftovers(tmp_path):
    folder = tmp_path / "checkpoint"
    killed_at("checkpoint:shard-written", lambda: save_checkpoint(folder, tensors_of(1), {"step": 1}))
    assert find_checkpoint(folder) is None and leftovers(tmp_path) == []


def test_a_full_disk_during_a_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    folder = tmp_path / "checkpoint"
    save_checkpoint(folder, tensors_of(1), {"step": 1})

    def disk_full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * 100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left on device.*the previous one, if any, is intact"):
        save_checkpoint(folder, tensors_of(2), {"step": 2})
    assert leftovers(tmp_path) == [] and load_checkpoint(folder)[1] == {"step": 1}


def test_a_kill_during_an_atomic_write_keeps_the_old_file_and_its_leftover_is_removed(tmp_path):
    path = tmp_path / "history.json"
    checkpoint.atomic_write(path, "old")
    killed_at("atomic-write:written", lambda: checkpoint.atomic_write(path, "new"))
    assert path.read_text() == "old" and leftovers(tmp_path)
    assert checkpoint.remove_orphans(tmp_path, ["history.json"]) and leftovers(tmp_path) == []


def test_a_kill_while_saving_the_delta_keeps_the_old_one_and_the_next_run_removes_the_leftover(tmp_path):
    from sae_utils.delta import load_delta, save_delta

    result = Finetuner(run_config(tmp_path, steps=1), pipeline=tiny_pipeline()).train(progress=False)
    path = tmp_path / "delta.safetensors"
    content = path.read_bytes()
    other = result.delta.tensors | {n: t + 1 for n, t in list(result.delta.tensors.items())[:1]}
    killed_at("delta:written", lambda: save_delta(type(result.delta)(other, result.delta.metadata), path))
    assert path.read_bytes() == content and leftovers(tmp_path)
    Finetuner(run_config(tmp_path, steps=1), pipeline=tiny_pipeline())
    assert leftovers(tmp_path) == [] and load_delta(path).tensors.keys() == result.delta.tensors.keys()


# ----------------------------------------------------------------------------------------------------------
# Checkpoints on disk, damaged: refused with the problem named
# ----------------------------------------------------------------------------------------------------------
def _damage(folder, kind):
    shards = sorted(folder.glob("tensors-*.safetensors"))
    manifest = json.loads((folder / "state.json").read_text())
    if kind == "truncated shard":
        shards[0].write_bytes(shards[0].read_bytes()[:100])
    elif kind == "flipped byte in a shard":
        raw = bytearray(shards[0].read_bytes())
        raw[-5] ^= 0x10
        shards[0].write_bytes(bytes(raw))
    elif kind == "missing shard":
        shards[-1].unlink()
    elif kind == "no state.json":
        (folder / "state.json").unlink()
    elif kind == "truncated state.json":
        (folder / "state.json").write_text((folder / "state.json").read_text()[:50])
    elif kind == "state.json is a list":
        (folder / "state.json").write_text("[1, 2]")
    elif kind == "state.json edited":
        manifest["state"]["step"] = 7
        (folder / "state.json").write_text(json.dumps(manifest))
    elif kind == "a listed tensor missing":
        manifest["tensors"].append("w9")
        (folder / "state.json").write_text(json.dumps(manifest))
    return {"truncated shard": "does not match its hash", "flipped byte in a shard": "does not match its hash",
            "missing shard": "is missing", "no state.json": "state.json missing",
            "truncated state.json": "not JSON", "state.json is a list": "without the expected",
            "state.json edited": "does not match its hash", "a listed tensor missing": "lacks 1 tensors"}[kind]


@pytest.mark.parametrize("kind", ["truncated shard", "flipped byte in a shard", "missing shard", "no state.json",
                                  "truncated state.json", "state.json is a list", "state.json edited",
                                  "a listed tensor missing"])
def test_a_damaged_checkpoint_is_refused_with_the_problem_named(tmp_path, kind):
    folder = save_checkpoint(tmp_path / "checkpoint", tensors_of(1), {"step": 1}, max_shard_mb=0.01)
    message = _damage(folder, kind)
    with pytest.raises(CheckpointError, match=message) as error:
        load_checkpoint(folder)
    assert "Delete the folder to start over" in str(error.value)


# ----------------------------------------------------------------------------------------------------------
# Finetuning: interrupted at any instant of a checkpoint write, the resumed run ends bitwise equal
# ----------------------------------------------------------------------------------------------------------
def run_config(folder, **overrides):
    base = dict(model="tiny", pairs=[("cat", "dog")], steps=4, learning_rate=5e-2, device="cpu", batch_size=2,
                checkpoint_every=2, output_dir=str(folder), validation_seeds=(0,), validation_inference_steps=1)
    return FinetuneConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return Finetuner(run_config(tmp_path_factory.mktemp("straight")), pipeline=tiny_pipeline()).train(progress=False)


@pytest.mark.parametrize("point", [point for point, _ in INSTANTS])
def test_a_run_killed_while_checkpointing_resumes_to_the_same_weights(tmp_path, uninterrupted, point):
    run = Finetuner(run_config(tmp_path), pipeline=tiny_pipeline())
    for _ in range(4):  # the loop of `train`, up to the checkpoint at step 4, which is killed
        entry = run.train_step()
        run.history.append({**entry, "seconds": 0.0})
        if run.step == 2:
            run.save_checkpoint()
    killed_at(point, run.save_checkpoint)
    resumed = Finetuner(run_config(tmp_path), pipeline=tiny_pipeline())
    assert resumed.step == dict(INSTANTS)[point] * 2  # step 2 or 4: a complete checkpoint, never step 0
    assert leftovers(tmp_path) == []
    result = resumed.train(progress=False)
    for name, value in uninterrupted.delta.tensors.items():
        assert torch.equal(result.delta.tensors[name], value), name
    losses = lambda history: [h["loss"] for h in history if "loss" in h]  # noqa: E731
    assert losses(result.history) == losses(uninterrupted.history)


@pytest.fixture(scope="module")
def trained_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("trained")
    Finetuner(run_config(folder, steps=2), pipeline=tiny_pipeline()).train(progress=False)
    return folder


def _rewrite(folder, change):
    """A checkpoint saved by a broken writer: consistent hashes, wrong content."""
    tensors, state = load_checkpoint(folder / "checkpoint")
    change(tensors, state)
    save_checkpoint(folder / "checkpoint", tensors, state)


def _first_key(tensors):
    return next(k for k in sorted(tensors) if k.startswith("trainable."))


CHECKPOINT_DEFECTS = {
    "string step": (lambda t, s: s.update(step="2"), "its step is '2', not a positive integer"),
    "negative step": (lambda t, s: s.update(step=-2), "its step is -2"),
    "boolean step": (lambda t, s: s.update(step=True), "its step is True"),
    "NaN weights": (lambda t, s: t[_first_key(t)].fill_(float("nan")), "holds NaN or infinite values"),
    "no optimizer state": (lambda t, s: [t.pop(k) for k in list(t) if k.startswith("optimizer.")],
                           "no optimizer state"),
    "half an optimizer state": (lambda t, s: t.pop(next(k for k in sorted(t) if k.endswith("exp_avg_sq"))),
                                "exp_avg_sq is missing"),
    "wrong shape": (lambda t, s: t.update({_first_key(t): torch.zeros(3)}), "not a float tensor of shape"),
    "integer weights": (lambda t, s: t.update({_first_key(t): t[_first_key(t)].long()}), "not a float tensor"),
    "other tensors": (lambda t, s: s.update(trainable_names=["x"]), "other trainable tensors"),
    "no history": (lambda t, s: s.pop("history"), "'history' is missing"),
    "NaN seconds": (lambda t, s: s.update(seconds=float("nan")), "its seconds are nan"),
}


@pytest.mark.parametrize("defect", sorted(CHECKPOINT_DEFECTS))
def test_a_checkpoint_that_cannot_be_resumed_from_is_refused(tmp_path, trained_folder, defect):
    folder = tmp_path / "run"
    shutil.copytree(trained_folder, folder)
    change, message = CHECKPOINT_DEFECTS[defect]
    _rewrite(folder, change)
    with pytest.raises(CheckpointError, match=message) as error:
        Finetuner(run_config(folder), pipeline=tiny_pipeline())
    assert "--no-resume" in str(error.value)
    Finetuner(run_config(folder), pipeline=tiny_pipeline(), resume=False)  # starting over stays possible


# ----------------------------------------------------------------------------------------------------------
# Generation folders: cut lines, killed image writes, failed first runs
# ----------------------------------------------------------------------------------------------------------
PROMPT = "a cat and a dog"


def gen_config(folder, **overrides):
    base = dict(model="tiny", prompts=[PROMPT], seeds=[0, 1, 2], num_inference_steps=1, height=32, width=32,
                batch_size=1, output_dir=str(folder), progress=False, device="cpu")
    return GenerationConfig(**{**base, **overrides})


def assert_whole_lines(folder):
    for line in (folder / "metadata.jsonl").read_text().splitlines():
        json.loads(line)


def test_a_line_cut_off_by_a_kill_is_repaired_before_the_next_append(tiny, tmp_path):
    generate(gen_config(tmp_path, capture_attention=True), pipe=tiny)  # (attention: a metric without models)
    path = tmp_path / "metadata.jsonl"
    path.write_bytes(path.read_bytes()[:-40])  # killed mid-line: the last record (seed 2) is cut
    with pytest.warns(UserWarning, match="cut off"):
        assert sorted(r["seed"] for r in read_metadata(tmp_path)) == [0, 1]
    again = generate(gen_config(tmp_path, capture_attention=True), pipe=tiny)
    assert (again.generated, again.skipped) == (1, 2)  # the cut record's image is drawn again
    assert_whole_lines(tmp_path)  # before the fix: the new record was glued to the cut one
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sorted(r["seed"] for r in read_metadata(tmp_path)) == [0, 1, 2]
    main(["evaluate", str(tmp_path), "--metrics", "none", "--n-boot", "10", "--no-figures"])  # it evaluates


def test_a_write_limit_mid_line_is_repaired_too(tiny, tmp_path):
    """`ulimit -f`: the write stops part-way through a line (a real short write, in a child process)."""
    generate(gen_config(tmp_path, seeds=[0, 1]), pipe=tiny)
    path = tmp_path / "metadata.jsonl"
    record = read_metadata(tmp_path)[0]
    pid = os.fork()
    if pid == 0:
        try:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG instead of a signal
            resource.setrlimit(resource.RLIMIT_FSIZE, (path.stat().st_size + 30, resource.RLIM_INFINITY))
            append_records(path, [{**record, "seed": 2}])
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert not path.read_bytes().endswith(b"\n")  # cut mid-line
    again = generate(gen_config(tmp_path), pipe=tiny)
    assert again.generated == 1 and sorted(r["seed"] for r in read_metadata(tmp_path)) == [0, 1, 2]
    assert_whole_lines(tmp_path)


def test_a_folder_broken_by_an_older_version_is_read_again(tmp_path):
    """Before the fix, a record was appended onto the cut line: 'line N is not JSON' for good."""
    good = {"prompt": PROMPT, "words": ["cat", "dog"], "seed": 0, "method": "sd", "image": image_relpath(PROMPT, 0)}
    glued = json.dumps({**good, "seed": 1})[:37] + json.dumps({**good, "seed": 2})
    (tmp_path / "metadata.jsonl").write_text(json.dumps(good) + "\n" + glued + "\n" + json.dumps(good) + "\n")
    with pytest.warns(UserWarning, match="appended to a cut-off line"):
        assert sorted(r["seed"] for r in read_metadata(tmp_path)) == [0, 2]
    (tmp_path / "metadata.jsonl").write_text(json.dumps(good) + "\nnot a record\n" + json.dumps(good) + "\n")
    with pytest.raises(ValueError, match="line 2, is not an image record"):
        read_metadata(tmp_path)


def test_a_kill_mid_png_leaves_no_half_image_and_its_leftover_is_removed(tiny, tmp_path):
    from sae_utils.sampling import _write_atomically

    generate(gen_config(tmp_path, seeds=[0]), pipe=tiny)
    image = tmp_path / image_relpath(PROMPT, 1)

    def write_png():
        from PIL import Image

        _write_atomically(image, lambda tmp: Image.new("RGB", (32, 32)).save(tmp, format="PNG"))

    killed_at("generate:file-written", write_png)
    assert not image.exists() and leftovers(tmp_path)  # a whole PNG or none under the final name
    assert generate(gen_config(tmp_path, seeds=[0, 1]), pipe=tiny).generated == 1
    assert image.is_file() and leftovers(tmp_path) == []


def _other_architecture_delta(path):
    from diffusers import UNet2DConditionModel

    from sae_utils.delta import extract_delta, save_delta, trainable_parameter_names

    unet = UNet2DConditionModel.from_config({**tiny_pipeline().unet.config, "cross_attention_dim": 48})
    return save_delta(extract_delta(unet, trainable_parameter_names(unet, "k")), path)


@pytest.mark.parametrize("mistake, fix, message", [
    (dict(height=33), dict(height=32), "height=33 is not a multiple of 8"),
    (dict(prompts=[PROMPT + ", " + " ".join(["very"] * 80)]), dict(), "the last .* would be cut off"),
    (dict(delta="OTHER"), dict(), "architecture"),
])
def test_a_first_run_that_fails_leaves_the_folder_free(tiny, tmp_path, mistake, fix, message):
    if mistake.get("delta"):
        mistake = {"delta": str(_other_architecture_delta(tmp_path / "other.safetensors"))}
    folder = tmp_path / "run"
    with pytest.raises(ValueError, match=message):
        generate(gen_config(folder, seeds=[0], **mistake), pipe=tiny)
    assert not (folder / "run.json").exists() and not list(folder.rglob("*.png"))
    assert generate(gen_config(folder, seeds=[0], **fix), pipe=tiny).generated == 1  # was: "other settings"
    with pytest.raises(ValueError, match="other settings"):  # the folder's run is now fixed, as before
        generate(gen_config(folder, seeds=[0], guidance_scale=2.0), pipe=tiny)


def test_two_objects_of_one_word_get_their_own_maps(tiny, tmp_path):
    # "a teddy bear and a bear": both objects read the first "bear", overlap 1.0
    prompt = "a photo of a teddy bear and a bear"
    generate(gen_config(tmp_path, prompts=[prompt], seeds=[0], capture_attention=True), pipe=tiny)
    record, = read_metadata(tmp_path)
    from safetensors.torch import load_file

    maps = load_file(tmp_path / record["attention"]["maps"])["word_maps"]
    assert record["words"] == ["bear", "bear"] and not torch.equal(maps[0], maps[1])
    assert record["attention"]["overlap"] < 0.999


def test_an_unwritable_output_folder_fails_before_the_model_loads(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    # the model would fail to load (offline); the folder is found out first, in no time
    with pytest.raises(OSError, match="Cannot write to the output folder"):
        generate(gen_config(blocker / "run", model="CompVis/stable-diffusion-v1-4"))
    with pytest.raises(OSError, match="Cannot write to the output folder"):
        Finetuner(run_config(blocker / "run", model="CompVis/stable-diffusion-v1-4"))


# ----------------------------------------------------------------------------------------------------------
# The command lines: every bad value is one line, naming it; --debug shows the traceback
# ----------------------------------------------------------------------------------------------------------
def one_line_error(argv, capsys, prog) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    message = exit_.value.code if isinstance(exit_.value.code, str) else capsys.readouterr().err.strip()
    assert exit_.value.code not in (0, None)
    assert message.startswith(f"{prog}: error: ") and "\n" not in message and "Traceback" not in message, message
    return message


FINETUNE = ["finetune", "--model", "tiny", "--pair", "cat", "dog", "--device", "cpu", "--steps", "1"]


@pytest.mark.parametrize("flags, message", [
    (["--lambda-sep", "nan"], "lambda_sep must be >= 0 and finite, got nan"),
    (["--lambda-en", "inf"], "lambda_en must be >= 0 and finite, got inf"),
    (["--learning-rate", "inf"], "learning_rate must be > 0 and finite"),
    (["--max-grad-norm", "-1"], "max_grad_norm must be > 0"),
    (["--max-grad-norm", "0"], "max_grad_norm must be > 0"),
    (["--checkpoint-every", "0"], "checkpoint_every must be > 0"),
    (["--seed", "-1"], "seed, validate_every and validation_seeds must be >= 0"),
    (["--timestep-range", "5"], "argument --timestep-range: expected 2 arguments"),
    (["--adam-betas", "0.9"], "argument --adam-betas: expected 2 arguments"),
    (["--steps", "many"], "argument --steps: invalid int value"),
    (["--pair", "cat", "Cat"], "are the same word"),
    (["--mixed-precision", "fp8"], "mixed_precision='fp8'"),
])
def test_sae_finetune_bad_values(capsys, flags, message):
    assert message in one_line_error(FINETUNE + flags, capsys, "sae-finetune")


@pytest.mark.parametrize("content, message", [
    ({"lerning_rate": 1e-6}, "unknown key(s) 'lerning_rate' (did you mean 'learning_rate'?)"),
    ({"batch_size": "4"}, "batch_size='4': expected an integer"),
    ({"adam_betas": [0.9]}, "adam_betas=(0.9,): expected a list of 2"),
    ({"shuffle_order": 1}, "shuffle_order=1: expected true or false"),
    ([1, 2], "must hold a JSON object"),
    ("{not json", "is not JSON"),
])
def test_sae_finetune_config_file_mistakes(tmp_path, capsys, content, message):
    path = tmp_path / "config.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    assert message in one_line_error(FINETUNE + ["--config", str(path)], capsys, "sae-finetune")


GENERATE = ["generate", "--model", "tiny", "--prompts", PROMPT, "--num-inference-steps", "1", "--height", "32",
            "--width", "32", "--device", "cpu", "--no-progress"]


@pytest.mark.parametrize("flags, message", [
    (["--num-seeds", "0"], "num_seeds must be positive"),
    (["--seeds", "-1"], "seeds must be distinct non-negative integers"),
    (["--batch-size", "0"], "batch_size must be positive"),
    (["--guidance-scale", "nan"], "guidance_scale must be a finite number >= 0"),
    (["--num-inference-steps", "0"], "num_inference_steps must be a positive integer"),
    (["--height", "33"], "height=33 is not a multiple of 8"),
    (["--method", "magic"], "Unknown method 'magic'"),
    (["--prompt-set", "nope"], "is neither a named prompt set"),
    (["--delta", "missing.safetensors"], "missing.safetensors does not exist"),
    (["--prompts", " "], "An empty prompt"),
])
def test_sae_generate_bad_values(tmp_path, capsys, flags, message):
    argv = GENERATE + ["--output-dir", str(tmp_path / "run")] + flags
    assert message in one_line_error(argv, capsys, "sae-generate")
    assert not (tmp_path / "run" / "run.json").exists()


def test_sae_generate_config_with_a_misspelt_key(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"num_seed": 4}))
    message = one_line_error(GENERATE + ["--config", str(path)], capsys, "sae-generate")
    assert "'num_seed' (did you mean 'num_seeds'?)" in message


def test_sae_evaluate_bad_values(tmp_path, capsys):
    assert "holds no metadata.jsonl" in one_line_error(["evaluate", str(tmp_path / "nothing"), "--metrics", "toy"],
                                                        capsys, "sae-evaluate")
    assert not (tmp_path / "nothing").exists()  # nothing is created for a folder that is not a run
    for flags, message in [(["--n-boot", "0"], "n_boot must be a positive integer"),
                           (["--toy-threshold", "nan"], "toy_threshold must be a number in [0, 1]"),
                           (["--metrics", "fid"], "Unknown metrics ['fid']")]:
        argv = ["evaluate", str(tmp_path), "--metrics", "toy"] + flags
        assert message in one_line_error(argv, capsys, "sae-evaluate")
    (tmp_path / "metadata.jsonl").write_text('{"prompt": "a"}\n{broken\n{"prompt": "b"}\n')
    assert "line 1, is not an image record" in one_line_error(["evaluate", str(tmp_path), "--metrics", "toy"],
                                                               capsys, "sae-evaluate")


def test_debug_shows_the_error_itself():
    with pytest.raises(ValueError, match="lambda_sep must be >= 0 and finite"):
        main(FINETUNE + ["--lambda-sep", "nan", "--debug"])
    with pytest.raises(FileNotFoundError):
        main(["evaluate", "/no/such/run", "--metrics", "toy", "--debug"])


def test_the_installed_command_prints_one_line_and_no_traceback():
    command = [sys.executable, "-m", "sae_utils", "finetune", "--model", "tiny", "--pair", "cat", "dog",
               "--learning-rate", "inf"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        "sae-finetune: error: learning_rate must be > 0 and finite, got inf."]
