"""Training state on disk: safetensors shards plus a JSON file, written atomically.

A checkpoint is a folder: `state.json` (step, config, anything JSON) and `tensors-000.safetensors`, ...
(each at most `max_shard_mb`, so a checkpoint can travel as small files). It is written into a temporary
sibling folder and swapped in with renames, so an interrupted write never leaves a half checkpoint: the
previous one stays readable. Nothing is pickled.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


class CheckpointError(RuntimeError):
    """A checkpoint folder is missing, incomplete or corrupted."""


def save_checkpoint(folder: str | os.PathLike, tensors: dict[str, torch.Tensor], state: dict,
                    max_shard_mb: float = 16.0) -> Path:
    """Write `tensors` and the JSON-able `state` to `folder`, replacing any previous checkpoint atomically."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    shards = _shard(tensors, int(max_shard_mb * 2**20))
    for i, shard in enumerate(shards):
        save_file({k: v.detach().contiguous().cpu() for k, v in shard.items()}, tmp / f"tensors-{i:03d}.safetensors")
    manifest = {"shards": len(shards), "tensors": sorted(tensors), "state": state}
    (tmp / "state.json").write_text(json.dumps(manifest, indent=1))
    _fsync_dir(tmp)
    old = folder.with_name(f".{folder.name}.old-{uuid.uuid4().hex[:8]}")
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def atomic_write(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write a file so that a reader sees the old content or the new one, never half of it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)
    return path


def load_checkpoint(folder: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a checkpoint written by `save_checkpoint`: (tensors, state)."""
    folder = Path(folder)
    manifest_path = folder / "state.json"
    if not manifest_path.exists():
        raise CheckpointError(f"No checkpoint at {folder} (state.json missing).")
    try:
        manifest = json.loads(manifest_path.read_text())
        tensors = {}
        for i in range(manifest["shards"]):
            tensors.update(load_file(folder / f"tensors-{i:03d}.safetensors"))
    except (json.JSONDecodeError, KeyError, OSError, SafetensorError) as error:
        raise CheckpointError(f"The checkpoint at {folder} is incomplete or corrupted ({error}). Delete it to "
                              "start over, or restore it from a copy.") from error
    missing = set(manifest["tensors"]) - set(tensors)
    if missing:
        raise CheckpointError(f"The checkpoint at {folder} lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}.")
    return tensors, manifest["state"]


def optimizer_to_tensors(optimizer: torch.optim.Optimizer, prefix: str = "optimizer") -> tuple[dict, dict]:
    """An optimizer's state dict split into tensors (for safetensors) and JSON (hyperparameters)."""
    state_dict = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entry in state_dict["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{prefix}.{index}.{key}"] = value
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def optimizer_from_tensors(optimizer: torch.optim.Optimizer, tensors: dict, meta: dict,
                           prefix: str = "optimizer") -> None:
    """Inverse of `optimizer_to_tensors`: load the saved state into `optimizer` (same parameter order)."""
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith(prefix + "."):
            index, key = name[len(prefix) + 1:].split(".", 1)
            state.setdefault(int(index), {})[key] = value
    for name, value in meta["scalars"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _shard(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    return shards


def _fsync_dir(folder: Path) -> None:
    for path in folder.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
