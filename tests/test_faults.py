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
