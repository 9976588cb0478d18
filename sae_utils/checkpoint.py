"""Training state on disk: safetensors shards plus a JSON file, written atomically.

A checkpoint is a folder: `state.json` (step, config, anything JSON, and the sha256 of every shard) and
`tensors-000.safetensors`, ... (each at most `max_shard_mb`, so a checkpoint can travel as small files). It is
written completely into a temporary sibling folder (state.json last), then swapped in with two renames:

    .checkpoint.tmp-X  written, synced     ->  checkpoint  renamed to .checkpoint.old-Y   (1)
                                           ->  .checkpoint.tmp-X renamed to checkpoint    (2)  ->  old removed

Whatever instant a process dies at, one complete checkpoint is findable: `find_checkpoint` takes `checkpoint/`,
or, after a death between (1) and (2), the newest complete sibling (the new one), renames it back and removes
the leftovers (a half-written temporary, an old copy). Reading checks every shard's hash, so a flipped byte
is refused, not resumed from. Nothing is pickled.

The fault-injection tests stop a process at the named instants of `fault_point` (see tests/test_faults.py).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 1: no hashes (still read)
# A temporary or displaced copy that a write leaves behind only if it was killed: ".NAME.tmp-1a2b3c4d[.png]".
ORPHAN = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-[0-9a-f]{8}(?:\.[A-Za-z0-9]+)?$")

# For tests only: called with the name of each instant of a write (fault_point); the fault-injection suite sets it
# to kill the process right there. None in normal use.
FAULT_HOOK: Callable[[str], None] | None = None


def fault_point(name: str) -> None:
    """A named instant of a write ("checkpoint:between-renames", ...) where a test may stop the process."""
    if FAULT_HOOK is not None:
        FAULT_HOOK(name)


class CheckpointError(RuntimeError):
    """A checkpoint folder is missing, incomplete or corrupted."""


def save_checkpoint(folder: str | os.PathLike, tensors: dict[str, torch.Tensor], state: dict,
                    max_shard_mb: float = 16.0) -> Path:
    """Write `tensors` and the JSON-able `state` to `folder`, replacing any previous checkpoint atomically."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    find_checkpoint(folder)  # a previous write that was killed: its complete copy back in place, leftovers gone
    tmp = folder.with_name(f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        shards = _shard(tensors, int(max_shard_mb * 2**20))
        digests = []
        for i, shard in enumerate(shards):
            path = tmp / f"tensors-{i:03d}.safetensors"
            save_file({k: v.detach().contiguous().cpu() for k, v in shard.items()}, path)
            digests.append(_file_sha256(path))
            fault_point("checkpoint:shard-written")
        manifest = {"format_version": FORMAT_VERSION, "written_ns": time.time_ns(), "shards": len(shards),
                    "sha256": digests, "tensors": sorted(tensors), "state": state,
                    "state_sha256": _json_sha256(json.loads(json.dumps(state)))}  # hashed as it will be read
        _write_synced(tmp / "state.json", json.dumps(manifest, indent=1).encode())  # last: it marks completeness
        fault_point("checkpoint:manifest-written")
        _fsync_dir(tmp)
    except OSError as error:  # e.g. disk full: the previous checkpoint is untouched, the partial copy goes
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(f"Could not write the checkpoint {folder} ({error}); the previous one, if any, is intact. "
                      "Free disk space or choose another output folder.") from error
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = folder.with_name(f".{folder.name}.old-{uuid.uuid4().hex[:8]}")
    if folder.exists():
        folder.rename(old)
        fault_point("checkpoint:between-renames")
    tmp.rename(folder)
    _fsync_parent(folder)
    fault_point("checkpoint:swapped")
    shutil.rmtree(old, ignore_errors=True)
    return folder


def find_checkpoint(folder: str | os.PathLike) -> Path | None:
    """The checkpoint at `folder`, after repairing what a killed write can leave: with `folder` missing, the
    newest complete sibling copy (a write killed between its two renames) is renamed to `folder`; then every
    leftover copy (`.NAME.tmp-*`, `.NAME.old-*`) is removed. None if there is no checkpoint at all."""
    folder = Path(folder)
    copies = [p for p in _orphans(folder.parent, folder.name) if p.is_dir()]
    if not folder.exists():
        complete = []
        for copy in copies:
            try:
                complete.append((_read_manifest(copy).get("written_ns", 0), copy))
            except CheckpointError:
                continue  # a half-written copy: nothing to recover from it
        if complete:
            newest = max(complete)[1]
            newest.rename(folder)
            _fsync_parent(folder)
            logger.warning("Recovered the checkpoint %s from %s (a write was interrupted between its renames).",
                           folder, newest.name)
    for copy in _orphans(folder.parent, folder.name):
        shutil.rmtree(copy, ignore_errors=True) if copy.is_dir() else copy.unlink(missing_ok=True)
    return folder if folder.exists() else None


def remove_orphans(folder: str | os.PathLike, names: list[str] | None = None) -> list[Path]:
    """Delete the temporary files that killed atomic writes left in `folder` (`.NAME.tmp-1a2b3c4d...`), for the
    files `names` (None: any). Only call it where no other process is writing. Returns what was removed."""
    removed = []
    for path in sorted(Path(folder).iterdir()) if Path(folder).is_dir() else []:
        match = ORPHAN.match(path.name)
        if match and (names is None or match["name"] in names) and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def check_writable(folder: str | os.PathLike, what: str = "the output folder") -> Path:
    """Create `folder` and write (then remove) a small file in it, so that a folder that cannot take the results
    fails now, before any work, rather than at the first save."""
    folder = Path(folder)
    probe = folder / f".write-test.tmp-{uuid.uuid4().hex[:8]}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise OSError(f"Cannot write to {what} {folder} ({error.strerror or error}): choose a folder you can write "
                      "to, or fix its permissions.") from error
    return folder


def atomic_write(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write a file so that a reader sees the old content or the new one, never half of it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        _write_synced(tmp, data.encode() if isinstance(data, str) else data)
        fault_point("atomic-write:written")
        os.replace(tmp, path)
    except Exception:
        tmp.unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(folder: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a checkpoint written by `save_checkpoint`: (tensors, state). Every shard's hash is checked."""
    folder = Path(folder)
    manifest = _read_manifest(folder)
    tensors = {}
    try:
        for i in range(manifest["shards"]):
            tensors.update(load_file(folder / f"tensors-{i:03d}.safetensors"))
    except (OSError, SafetensorError) as error:
        raise CheckpointError(f"The checkpoint at {folder} is incomplete or corrupted ({error}). {_FIX}") from error
    missing = set(manifest["tensors"]) - set(tensors)
    if missing:
        raise CheckpointError(f"The checkpoint at {folder} lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}. "
                              + _FIX)
    return tensors, manifest["state"]


_FIX = "Delete the folder to start over (--no-resume does the same), or restore it from a copy."


def _read_manifest(folder: Path) -> dict:
    """state.json, checked: its structure, the hash of its state, and (format 2) the hash of every shard."""
    path = folder / "state.json"
    if not path.is_file():
        raise CheckpointError(f"No checkpoint at {folder} (state.json missing). {_FIX}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"The checkpoint at {folder} is incomplete or corrupted: state.json is not JSON "
                              f"({error}). {_FIX}") from error
    if not (isinstance(manifest, dict) and isinstance(manifest.get("shards"), int) and manifest["shards"] >= 1
            and isinstance(manifest.get("tensors"), list) and all(isinstance(t, str) for t in manifest["tensors"])
            and isinstance(manifest.get("state"), dict)):
        raise CheckpointError(f"The checkpoint at {folder} has a state.json without the expected 'shards', 'tensors' "
                              f"and 'state' entries. {_FIX}")
    if manifest.get("format_version", 1) < 2:
        logger.warning("The checkpoint at %s predates shard hashes: it is read unchecked.", folder)
        return manifest
    digests = manifest.get("sha256")
    if manifest.get("state_sha256") != _json_sha256(manifest["state"]):
        raise CheckpointError(f"The checkpoint at {folder} is corrupted: its state does not match its hash (was "
                              f"state.json edited?). {_FIX}")
    if not isinstance(digests, list) or len(digests) != manifest["shards"]:
        raise CheckpointError(f"The checkpoint at {folder} lists no hash for each shard. {_FIX}")
    for i, digest in enumerate(digests):
        shard = folder / f"tensors-{i:03d}.safetensors"
        if not shard.is_file():
            raise CheckpointError(f"The checkpoint at {folder} is incomplete: {shard.name} is missing. {_FIX}")
        if _file_sha256(shard) != digest:
            raise CheckpointError(f"The checkpoint at {folder} is corrupted: {shard.name} does not match its hash. "
                                  + _FIX)
    return manifest


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


def _orphans(parent: Path, name: str) -> list[Path]:
    if not parent.is_dir():
        return []
    return sorted(p for p in parent.iterdir() if (m := ORPHAN.match(p.name)) and m["name"] == name)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _json_sha256(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(folder: Path) -> None:
    for path in folder.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    _fsync_parent(folder / "x")


def _fsync_parent(path: Path) -> None:
    """Make a rename in `path`'s folder durable (where the platform lets a folder be opened)."""
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
