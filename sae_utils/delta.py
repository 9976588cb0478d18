"""A delta: the tensors that SepEn finetuning trained, plus what they were trained for, in one safetensors file.

    names = trainable_parameter_names(pipe.unet, "k")      # SD v1: the 16 attn2.to_k weights, 9,584,640 values
    ...train those parameters...
    delta = extract_delta(pipe.unet, names, {"base_model": "CompVis/stable-diffusion-v1-4", "concepts": [...]})
    save_delta(delta, "cat_dog.safetensors", dtype=torch.float16)   # 19.2 MB for SD v1
    with apply_delta(other_pipe, load_delta("cat_dog.safetensors")):
        images = other_pipe("a cat and a dog").images        # the original weights are back after the block

A delta records its model family ("sd1", "sd2", "sdxl"; sae_utils.families) and is refused by a pipeline of another
family, with a message naming both. It applies to any UNet of the architecture it was trained on (same
`architecture_fingerprint`: e.g. SD v1.4, v1.5 and their finetunes) and is undone bitwise. Everything is checked before a single weight changes, so a
rejected delta leaves the pipeline as it was. The metadata is JSON, stored as the safetensors header's string
metadata under the key "sae_utils"; nothing is pickled. A saved delta carries the sha256 of its content (tensors
and metadata, `content_sha256`), so a file with one changed byte is refused on loading.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

import sae_utils as _package

from .attention import cross_attention_layers
from .checkpoint import fault_point

logger = logging.getLogger(__name__)

METADATA_KEY = "sae_utils"
FORMAT_VERSION = 1
HASH_KEY = "content_sha256"  # over the tensors (names, dtypes, shapes, bytes) and the rest of the metadata
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# A trained key moves by a small fraction of its size; a tensor whose RMS is this many times the weights' it would
# replace is not a finetune of them (a mis-scaled or corrupted delta), and is refused.
MAX_SCALE = 100.0
# Which projections of each cross-attention layer a trainable set selects. K alone is SepEn; V and K+V exist for
# the ablation (finetuning V collapses image quality), Q for completeness.
TRAINABLE_SETS = {"k": ("to_k",), "kv": ("to_k", "to_v"), "v": ("to_v",), "q": ("to_q",)}
# The UNet config fields that decide the shapes of the weights (not sample_size, dropout, norm eps, ...).
ARCHITECTURE_FIELDS = (
    "in_channels", "out_channels", "block_out_channels", "layers_per_block", "down_block_types", "mid_block_type",
    "up_block_types", "cross_attention_dim", "attention_head_dim", "num_attention_heads",
    "transformer_layers_per_block", "use_linear_projection", "only_cross_attention", "encoder_hid_dim",
)


class DeltaError(ValueError):
    """A delta file or a delta cannot be read, or does not fit the UNet it is applied to."""


# ----------------------------------------------------------------------------------------------------------
# Which UNets a delta fits, and which parameters it holds
# ----------------------------------------------------------------------------------------------------------
def architecture_config(unet) -> dict:
    """The shape-defining config fields of a UNet, JSON-normalised (tuples become lists)."""
    return json.loads(json.dumps({name: unet.config.get(name) for name in ARCHITECTURE_FIELDS}))


def architecture_fingerprint(unet) -> str:
    """16 hex characters that are equal for two UNets exactly when a delta of one fits the other.

    A sha256 of the shape-defining config fields and the (name, shape) of every cross-attention parameter.
    Independent of the weights, the dtype and the device (a meta-device UNet works).
    """
    layers = tuple(f"{layer}." for layer in cross_attention_layers(unet))
    shapes = sorted([name, list(p.shape)] for name, p in unet.named_parameters() if name.startswith(layers))
    canonical = json.dumps({"config": architecture_config(unet), "cross_attention": shapes},
                           sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def trainable_parameter_names(unet, trainable: str = "k", layers: Sequence[str] | None = None) -> list[str]:
    """Names of the parameters a trainable set selects, in the UNet's parameter order.

    trainable: "k" (SepEn: every cross-attention attn2.to_k), "kv" (to_k and to_v), "v" (to_v only), "q" (to_q);
        weights and biases (if the projection has one).
    layers: restrict to these cross-attention layers (keys of `cross_attention_layers(unet)`, e.g.
        "down_blocks.2.attentions.0.transformer_blocks.0.attn2"); None = all of them.
    """
    if trainable not in TRAINABLE_SETS:
        raise ValueError(f"Unknown trainable set {trainable!r}; the options are {list(TRAINABLE_SETS)} "
                         "('k' is SepEn's: the cross-attention keys).")
    all_layers = list(cross_attention_layers(unet))
    if layers is None:
        layers = all_layers
    elif isinstance(layers, str):
        raise TypeError(f"layers={layers!r} is one string; pass a list of layer names, e.g. [{layers!r}].")
    else:
        unknown = [name for name in layers if name not in all_layers]
        if unknown:
            raise ValueError(f"Not cross-attention layers of this UNet: {unknown}. The valid names are: {all_layers}")
        if not layers:
            raise ValueError("layers=[] selects no parameter; pass None for all cross-attention layers.")
    modules = {f"{layer}.{projection}" for layer in layers for projection in TRAINABLE_SETS[trainable]}
    return [name for name, _ in unet.named_parameters() if name.rsplit(".", 1)[0] in modules]


# ----------------------------------------------------------------------------------------------------------
# The delta
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Delta:
    """Trained tensors (parameter name -> value, CPU) and their metadata (JSON-able dict).

    metadata keys set by `extract_delta`: format_version, base_model, family, fingerprint, architecture, trainable,
    layers, tensors (name -> shape), dtype, sae_utils_version, created; the caller adds concepts, prompts,
    training_config, or anything else JSON-able.
    """
    tensors: dict[str, torch.Tensor]
    metadata: dict = field(default_factory=dict)

    @property
    def num_values(self) -> int:
        return sum(t.numel() for t in self.tensors.values())

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors in their current dtype (the size of a saved file, less its small header)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def extract_delta(model, names: Sequence[str], metadata: dict | None = None) -> Delta:
    """Copy the current values of the parameters `names` of a UNet (or a pipeline's UNet) into a `Delta`.

    metadata: what to remember (base_model, concepts, prompts, training_config, ...), JSON-able; it is stored as
        JSON, so tuples come back as lists. The keys that describe the tensors (fingerprint, architecture, layers,
        tensors, dtype, sae_utils_version, created, format_version) are computed here and overwrite any given;
        a given `trainable` must agree with the names.
    """
    unet = getattr(model, "unet", model)
    names = list(names)
    if not names:
        raise ValueError("No parameter names given; use trainable_parameter_names(unet, 'k') to choose them.")
    params = dict(unet.named_parameters())
    unknown = [name for name in names if name not in params]
    if unknown:
        raise ValueError(f"Not parameters of this UNet: {unknown[:5]}. Use trainable_parameter_names(unet, ...).")
    tensors = {name: params[name].detach().to(device="cpu", copy=True) for name in names}
    layers = sorted({name.split(".to_")[0] for name in names if ".attn2.to_" in name})
    trainable = _trainable_set_of(unet, names, layers)
    given = dict(metadata or {})
    if given.get("trainable") not in (None, trainable):
        raise ValueError(f"metadata says trainable={given['trainable']!r} but the names are the {trainable!r} set; "
                         "drop the key (it is inferred) or pass the names of that set.")
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()})
    full = {
        "format_version": FORMAT_VERSION,
        "base_model": _model_name(model),
        **given,
        "family": _family(model) or given.get("family"),  # a bare UNet of SD 1.x/2.x: the caller says
        "fingerprint": architecture_fingerprint(unet),
        "architecture": architecture_config(unet),
        "trainable": trainable,
        "layers": layers,
        "tensors": {name: list(t.shape) for name, t in tensors.items()},
        "dtype": dtypes[0] if len(dtypes) == 1 else "mixed",
        "sae_utils_version": getattr(_package, "__version__", "0.1.0"),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        full = json.loads(json.dumps(full))
    except (TypeError, ValueError) as error:
        raise ValueError(f"The delta's metadata must be JSON-able (it is stored as text in the file): {error}. "
                         "Convert configs with dataclasses.asdict and paths with str.") from error
    return Delta(tensors, full)


def _family(model) -> str | None:
    """The model family of a pipeline; of a bare UNet only when its layout alone tells (SDXL), else None."""
    from .families import family_of

    if getattr(model, "unet", None) is not None:
        return family_of(model)
    return "sdxl" if family_of(model) == "sdxl" else None


def _check_family(model, delta: Delta) -> None:
    """A delta of another family is refused, naming both (before the fingerprint, which would only say 'differs')."""
    from .families import FAMILIES

    theirs, ours = delta.metadata.get("family"), _family(model)
    if theirs is None or theirs == ours:
        return
    if ours is None and theirs != "sdxl":  # a bare UNet that is not SDXL's: sd1 or sd2, the fingerprint decides
        return
    ours = ours or "sd1/sd2"
    title = lambda name: FAMILIES[name].title if name in FAMILIES else name  # noqa: E731
    raise DeltaError(
        f"This delta was trained on {title(theirs)} ({theirs!r}; base model {delta.metadata.get('base_model')!r}) but "
        f"the pipeline is {title(ours)} ({ours!r}): a delta holds keys of one family's cross-attention layers and "
        f"means nothing in another's. Load a {theirs} model to use it (offline: {FAMILIES[theirs].tiny!r} for a "
        f"twin's delta), or train a delta on this {ours} model." if theirs in FAMILIES else
        f"This delta records an unknown family {theirs!r}; the families are {list(FAMILIES)}.")


def _trainable_set_of(unet, names: list[str], layers: list[str]) -> str:
    """The trainable set whose selection on `layers` is exactly `names`, else "custom"."""
    for trainable in TRAINABLE_SETS:
        if layers and set(trainable_parameter_names(unet, trainable, layers)) == set(names):
            return trainable
    return "custom"


def _model_name(model) -> str | None:
    """The hub id a pipeline / UNet was loaded from, "toy", or a local folder's name (not this machine's path);
    None for one built in memory (e.g. `tiny`)."""
    from .models import portable_model_name

    unet = getattr(model, "unet", model)
    source = getattr(model, "name_or_path", None) or unet.config.get("_name_or_path") or None
    return portable_model_name(source) if source else None


# ----------------------------------------------------------------------------------------------------------
# On disk
# ----------------------------------------------------------------------------------------------------------
def save_delta(delta: Delta, path: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """Write the delta to a safetensors file, atomically: an interrupted save leaves the previous file intact.

    dtype: None keeps the tensors' own dtype (the round trip is exact); e.g. torch.float16 halves the file
        (19.2 MB instead of 38.3 MB for SD v1's keys) and the metadata's "dtype" says so.
    Returns the path; the size is logged (logging.INFO).
    """
    _check_tensors_match_metadata(delta, where="this delta")
    path = Path(path)
    if path.is_dir():
        raise DeltaError(f"{path} is a folder; give a file path such as {path / 'delta.safetensors'}.")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().to(device="cpu", dtype=dtype or t.dtype).contiguous()
               for name, t in delta.tensors.items()}
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise DeltaError(f"dtype={dtype}: a delta holds float32, float16 or bfloat16 tensors.")
    metadata = json.loads(json.dumps({k: v for k, v in delta.metadata.items() if k != HASH_KEY}))  # as it is read
    if dtype is not None:
        metadata["dtype"] = str(dtype).removeprefix("torch.")
    metadata[HASH_KEY] = content_sha256(tensors, metadata)
    # A temporary sibling, then a rename: os.replace is atomic within one file system.
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        save_file(tensors, tmp, metadata={METADATA_KEY: json.dumps(metadata), "format": "pt"})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        fault_point("delta:written")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    logger.info("Saved a delta of %d tensors (%.1f MB) to %s", len(tensors),
                sum(t.numel() * t.element_size() for t in tensors.values()) / 1e6, path)
    return path


def load_delta(path: str | os.PathLike) -> Delta:
    """Read a delta written by `save_delta` (tensors on the CPU, in the dtype they were saved in)."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a delta file" if path.is_dir() else "does not exist"
        raise DeltaError(f"{path} {what}. Save a delta with save_delta(delta, path) or check the path.")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError) as error:
        raise DeltaError(f"Cannot read {path} as a safetensors file ({error}): the file is truncated or corrupted; "
                         "re-save it or re-train.") from error
    if METADATA_KEY not in header:
        raise DeltaError(f"{path} is a safetensors file but not a sae_utils delta: its header has no "
                         f"{METADATA_KEY!r} metadata (it holds {len(tensors)} tensors, e.g. {sorted(tensors)[:2]}). "
                         "Make deltas with extract_delta and save_delta.")
    try:
        metadata = json.loads(header[METADATA_KEY])
    except json.JSONDecodeError as error:
        raise DeltaError(f"The metadata of {path} is not valid JSON ({error}): the file is truncated or corrupted; "
                         "re-save it or re-train.") from error
    if not isinstance(metadata, dict):
        raise DeltaError(f"The metadata of {path} is a JSON {type(metadata).__name__}, not an object: the file was "
                         "not written by save_delta, or was edited. Re-save it or re-train.")
    delta = Delta(tensors, metadata)
    _check_tensors_match_metadata(delta, where=str(path))
    expected = metadata.get(HASH_KEY)
    if expected is None:
        logger.warning("%s has no content hash (saved by an older sae_utils): it is read unchecked.", path)
    elif content_sha256(tensors, {k: v for k, v in metadata.items() if k != HASH_KEY}) != expected:
        raise DeltaError(f"{path} is corrupted: its content does not match the sha256 it was saved with (a changed "
                         "byte in its tensors or metadata). Re-save it from the training run or re-train.")
    delta.tensors = {name: tensors[name] for name in metadata["tensors"]}  # safetensors sorts; keep extract's order
    return delta


def content_sha256(tensors: dict[str, torch.Tensor], metadata: dict) -> str:
    """sha256 of a delta's content: each tensor's name, dtype, shape and bytes (in name order), then the metadata
    as canonical JSON. Independent of the file's layout; stored in the file under `HASH_KEY`."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    digest.update(json.dumps(metadata, sort_keys=True, separators=(",", ":")).encode())
    return digest.hexdigest()


def same_delta(delta: Delta, path: str | os.PathLike) -> bool:
    """Whether the delta file at `path` holds exactly this delta: the same tensors bitwise, the same metadata but
    for its creation time and hash (an unreadable file is not the same)."""
    try:
        saved = load_delta(path)
    except DeltaError:
        return False
    ignore = ("created", HASH_KEY)
    if {k: v for k, v in saved.metadata.items() if k not in ignore} != \
            json.loads(json.dumps({k: v for k, v in delta.metadata.items() if k not in ignore})):
        return False
    return saved.tensors.keys() == delta.tensors.keys() and all(
        saved.tensors[n].dtype == t.dtype and torch.equal(saved.tensors[n], t.cpu()) for n, t in delta.tensors.items())


def _check_tensors_match_metadata(delta: Delta, where: str) -> None:
    if not isinstance(delta.metadata, dict):
        raise DeltaError(f"The metadata of {where} is a {type(delta.metadata).__name__}, not a dict; make deltas with "
                         "extract_delta.")
    listed = delta.metadata.get("tensors")
    if not isinstance(listed, dict):
        raise DeltaError(f"The metadata of {where} has no 'tensors' table (name -> shape); make deltas with "
                         "extract_delta.")
    missing = sorted(set(listed) - set(delta.tensors))
    extra = sorted(set(delta.tensors) - set(listed))
    if missing or extra:
        raise DeltaError(f"The metadata of {where} disagrees with its tensors: {len(missing)} listed but missing "
                         f"{missing[:3]}, {len(extra)} present but not listed {extra[:3]}. The delta is incomplete; "
                         "re-save it or re-train.")
    wrong = [f"{name}: {tuple(delta.tensors[name].shape)} vs listed {tuple(shape)}"
             for name, shape in listed.items() if list(delta.tensors[name].shape) != list(shape)]
    if wrong:
        raise DeltaError(f"The tensors of {where} do not have the shapes its metadata lists: {wrong[:3]}. "
                         "Re-save it or re-train.")
    not_float = [f"{name}: {t.dtype}" for name, t in delta.tensors.items() if t.dtype not in FLOAT_DTYPES]
    if not_float:
        raise DeltaError(f"The tensors of {where} must be float32, float16 or bfloat16 weights; {len(not_float)} are "
                         f"not: {not_float[:3]}. Re-save it from the training run or re-train.")


# ----------------------------------------------------------------------------------------------------------
# Applying and undoing
# ----------------------------------------------------------------------------------------------------------
class DeltaHandle:
    """One applied delta: the originals it replaced, to put back with `undo()` (or on leaving a `with` block).

    `undo()` is idempotent: after the first call it does nothing (`active` turns False). It refuses to run if the
    parameters no longer hold the delta's values (trained further, or another delta applied on top and not undone
    first), since restoring then would silently discard that change; `undo(force=True)` restores anyway.
    """

    def __init__(self, unet, delta: Delta, originals: dict[str, torch.Tensor], applied: dict[str, torch.Tensor]):
        self.unet, self.delta = unet, delta
        self._originals: dict[str, torch.Tensor] | None = originals
        self._applied = applied

    @property
    def active(self) -> bool:
        return self._originals is not None

    def undo(self, force: bool = False) -> None:
        if self._originals is None:
            return
        params = dict(self.unet.named_parameters())
        if not force:
            changed = [name for name, value in self._applied.items() if not torch.equal(params[name], value)]
            if changed:
                raise DeltaError(
                    f"{len(changed)} parameters changed since the delta was applied (e.g. {changed[0]}): trained "
                    "further, or another delta applied on top. Undo that one first, or undo(force=True) to restore "
                    "the originals anyway.")
        with torch.no_grad():
            for name, value in self._originals.items():
                params[name].copy_(value)
        self._originals = None

    def __enter__(self) -> DeltaHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.undo()

    def __repr__(self) -> str:
        return f"DeltaHandle({len(self._applied)} tensors, {'active' if self.active else 'undone'})"


def apply_delta(model, delta: Delta, strict: bool = True) -> DeltaHandle:
    """Put the delta's values into a pipeline's (or a bare) UNet; returns a handle that undoes it.

    Checks everything first (model family, architecture fingerprint, every name present, every shape equal, values finite) and
    raises `DeltaError` without touching the UNet if anything is off. Values are cast to each parameter's dtype and
    device. strict=False skips only the fingerprint comparison (names and shapes are always checked), for a UNet
    that differs from the delta's outside the trained tensors in a way you know to be harmless.
    """
    unet = getattr(model, "unet", model)
    _check_tensors_match_metadata(delta, where="the delta")
    _check_family(model, delta)
    if strict:
        _check_fingerprint(model, unet, delta)
    params = dict(unet.named_parameters())
    missing = [name for name in delta.tensors if name not in params]
    if missing:
        raise DeltaError(f"The UNet has no parameters {missing[:3]} ({len(missing)} of the delta's "
                         f"{len(delta.tensors)}); a delta only applies to the architecture it was trained on.")
    wrong = [f"{name}: delta {tuple(t.shape)}, UNet {tuple(params[name].shape)}"
             for name, t in delta.tensors.items() if t.shape != params[name].shape]
    if wrong:
        raise DeltaError(f"Shapes differ for {len(wrong)} tensors: {wrong[:3]}. A delta only applies to the "
                         "architecture it was trained on.")
    not_finite = [name for name, t in delta.tensors.items() if not torch.isfinite(t).all()]
    if not_finite:
        raise DeltaError(f"The delta holds NaN or infinite values in {not_finite[:3]}: the training diverged. "
                         "Re-train with a lower learning rate.")
    applied = {name: t.to(device=params[name].device, dtype=params[name].dtype) for name, t in delta.tensors.items()}
    overflow = [name for name, t in applied.items() if not torch.isfinite(t).all()]
    if overflow:
        raise DeltaError(f"The delta's values in {overflow[:3]} overflow the UNet's {params[overflow[0]].dtype}: they "
                         "are far outside any trained weights (a corrupted or mis-scaled delta). Re-train it.")
    scales = {name: _rms(t) / max(_rms(params[name]), 1e-6) for name, t in applied.items()}
    outsized = sorted((name for name, scale in scales.items() if scale > MAX_SCALE), key=lambda n: -scales[n])
    if outsized:
        raise DeltaError(f"The delta's {outsized[0]} is {scales[outsized[0]]:.3g} times the size (RMS) of the weights "
                         f"it replaces ({len(outsized)} tensors above {MAX_SCALE:g}x): not a finetune of this model "
                         "(a corrupted or mis-scaled delta). Re-train it, or check that it was made for this model.")
    originals = {name: params[name].detach().clone() for name in applied}
    with torch.no_grad():
        for name, value in applied.items():
            params[name].copy_(value)
    return DeltaHandle(unet, delta, originals, applied)


def _check_fingerprint(model, unet, delta: Delta) -> None:
    expected = delta.metadata.get("fingerprint")
    if expected is None:
        raise DeltaError("The delta has no architecture fingerprint in its metadata; make it with extract_delta, or "
                         "pass strict=False to check names and shapes only.")
    actual = architecture_fingerprint(unet)
    if actual == expected:
        return
    theirs = delta.metadata.get("architecture") or {}
    ours = architecture_config(unet)
    differences = [f"{key}: delta {theirs.get(key)!r}, UNet {ours.get(key)!r}"
                   for key in ARCHITECTURE_FIELDS if key in theirs and theirs[key] != ours.get(key)]
    raise DeltaError(
        f"This delta was trained on {delta.metadata.get('base_model') or 'an unnamed model'} (architecture "
        f"{expected}), but the pipeline's UNet ({_model_name(model) or 'an unnamed model built in memory'}) has "
        f"architecture {actual}. A delta only applies to the architecture it was trained on"
        + (f"; they differ in {'; '.join(differences)}" if differences else "")
        + ". Load a pipeline of the delta's base model, or re-train the delta on this one.")


def _rms(t: torch.Tensor) -> float:
    return t.detach().float().pow(2).mean().sqrt().item() if t.numel() else 0.0


def delta_summary(delta: Delta) -> str:
    """A few lines for humans: size, trainable set, base model, concepts."""
    meta = delta.metadata
    values = delta.num_values
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in delta.tensors.values()})
    lines = [
        f"delta: {len(delta.tensors)} tensors, {values:,} values, trainable {meta.get('trainable', '?')!r} in "
        f"{len(meta.get('layers', []))} cross-attention layers",
        f"  size: {values * 4 / 1e6:.1f} MB at fp32, {values * 2 / 1e6:.1f} MB at fp16 "
        f"(held as {'/'.join(dtypes)}: {delta.nbytes / 1e6:.1f} MB)",
        f"  base model: {meta.get('base_model') or 'unnamed'} (family {meta.get('family') or '?'}, architecture "
        f"{meta.get('fingerprint', '?')})",
    ]
    for key in ("concepts", "prompts"):
        if meta.get(key):
            items = [str(x) for x in meta[key]]
            more = f", ... ({len(items)} in all)" if len(items) > 8 else ""
            lines.append(f"  {key}: {', '.join(items[:8])}{more}")
    return "\n".join(lines)
