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
