"""The toy-world evaluator: a small CNN that says which of the 8 kinds are present in a 32x32 image.

It outputs one independent probability per kind (multi-label), so "a star and a heart" is correct
when exactly those two are above the threshold. It was trained on renders with generated-image
artefacts (noise, blur, tinted backgrounds, warps) and with blobs labelled "absent"; see
train_evaluator.py and assets/evaluator_report.json for how well it does.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .world import KINDS

IMAGE_SIZE = 32
ASSETS = Path(__file__).parent / "assets"
DEFAULT_WEIGHTS = ASSETS / "evaluator.safetensors"
RETRAIN = "python -m sae_utils.toyworld.train_evaluator --out sae_utils/toyworld/assets"


def config_path(weights: Path) -> Path:
    """The architecture config that sits next to the weights: evaluator.safetensors -> evaluator_config.json."""
    return weights.with_name(weights.stem + "_config.json")


def _stage(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class ShapeDetector(nn.Module):
    """images: (N, 3, 32, 32) in [0, 1] -> logits: (N, 8), one per kind in KINDS order.

    Three conv stages (each halving the side), then a 1x1 conv gives a logit per kind at every
    cell of the 4x4 map and a max over cells says "present anywhere" (a shape is local).
    """

    def __init__(self, channels: Sequence[int] = (32, 64, 128), n_kinds: int = len(KINDS)):
        super().__init__()
        stages, c_in = [], 3
        for c in channels:
            stages += [_stage(c_in, c), nn.MaxPool2d(2)]
            c_in = c
        self.features = nn.Sequential(*stages)
        self.head = nn.Conv2d(c_in, n_kinds, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.features(images * 2 - 1))  # (N, K, h, w)
        return logits.flatten(2).amax(2)


def save_evaluator(model: ShapeDetector, path: str | Path, channels: Sequence[int]) -> None:
    """Weights as safetensors, the architecture (and the kind order) as JSON next to them."""
    from safetensors.torch import save_file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(path))
    config = {"channels": list(channels), "kinds": list(KINDS), "image_size": IMAGE_SIZE}
    config_path(path).write_text(json.dumps(config, indent=1) + "\n")


def load_evaluator(path: str | Path | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """The detector in eval mode; `path=None` is the shipped assets/evaluator.safetensors."""
    from safetensors.torch import load_file
    path = Path(path) if path is not None else DEFAULT_WEIGHTS
    cfg_file = config_path(path)
    for f in (path, cfg_file):
        if not f.is_file():
            raise FileNotFoundError(f"toy-world evaluator file {f} is missing; retrain it with `{RETRAIN}`")
    try:
        config = json.loads(cfg_file.read_text())
        state = load_file(str(path))
        model = ShapeDetector(config["channels"])
        model.load_state_dict(state)
    except Exception as e:  # corrupt or mismatched files all have the same fix
        raise RuntimeError(f"toy-world evaluator {path} (with {cfg_file.name}) could not be loaded ({e}); "
                           f"retrain it with `{RETRAIN}`") from e
    if tuple(config["kinds"]) != KINDS:
        raise RuntimeError(f"evaluator {path} was trained for kinds {config['kinds']}, the world has {KINDS}; "
                           f"retrain it with `{RETRAIN}`")
    return model.to(device).eval()


@functools.lru_cache(maxsize=1)
def _default_evaluator() -> nn.Module:
    return load_evaluator()


def as_batch(images) -> torch.Tensor:
    """A list of PIL images, a uint8 array (N, H, W, 3), or a float tensor (N, 3, H, W) in [0, 1]
    -> float tensor (N, 3, 32, 32) in [0, 1].

    Other sizes are resized to 32x32 with antialiased bilinear filtering (an area average when
    shrinking); the evaluator was trained at 32 px, so images far from 32 px lose what it learnt from.
    """
    if isinstance(images, (list, tuple)):
        if not all(isinstance(im, Image.Image) for im in images):
            raise TypeError("a list of images must hold PIL images; pass arrays as one (N, H, W, 3) uint8 array")
        images = np.stack([np.asarray(im.convert("RGB")) for im in images])
    if isinstance(images, Image.Image):
        raise TypeError("pass a list of PIL images, e.g. [image], not a single image")
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise TypeError(f"a numpy batch must be uint8 (N, H, W, 3); got {images.dtype} {images.shape}")
        images = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255
    if not (isinstance(images, torch.Tensor) and images.ndim == 4 and images.shape[1] == 3
            and images.is_floating_point()):
        got = tuple(images.shape) if hasattr(images, "shape") else type(images).__name__
        raise TypeError(f"expected a float tensor (N, 3, H, W) in [0, 1]; got {got}")
    if images.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        images = F.interpolate(images.float(), size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear",
                               antialias=True, align_corners=False)
    return images.float()


@torch.inference_mode()
def shape_probabilities(images, evaluator: nn.Module | None = None, batch_size: int = 1024) -> torch.Tensor:
    """images -> probs: (N, 8), P(kind present) in KINDS order, on the CPU.

    images: a list of PIL images, a uint8 array (N, H, W, 3), or a float tensor (N, 3, H, W) in [0, 1].
    Images that are not 32x32 are resized to 32x32 first (antialiased bilinear, see as_batch).
    """
    model = evaluator if evaluator is not None else _default_evaluator()
    device = next(model.parameters()).device
    x = as_batch(images)
    return torch.cat([torch.sigmoid(model(x[i:i + batch_size].to(device))).cpu()
                      for i in range(0, len(x), batch_size)]) if len(x) else torch.zeros(0, len(KINDS))


def _kind_index(word: str) -> int:
    if word not in KINDS:
        raise ValueError(f"unknown kind {word!r}; the evaluator knows: {', '.join(KINDS)}")
    return KINDS.index(word)


def objects_present(images, words: Sequence[Sequence[str]] | Sequence[str], threshold: float = 0.5,
                    evaluator: nn.Module | None = None) -> torch.Tensor:
    """present: (N, K) bool, whether word k (of image n) is detected.

    `words` is either K words asked of every image (("star", "heart")) or one list of K words per image.
    """
    probs = shape_probabilities(images, evaluator)
    n = len(probs)
    if len(words) and all(isinstance(w, str) for w in words):
        words = [words] * n
    if len(words) != n or len({len(w) for w in words}) > 1:
        raise ValueError(f"words must be K kinds for all images or one list of K kinds per image "
                         f"(got {len(words)} lists for {n} images)")
    index = torch.tensor([[_kind_index(w) for w in ws] for ws in words], dtype=torch.long).reshape(n, -1)
    return probs.gather(1, index) > threshold


def detected_kinds(images, threshold: float = 0.5, evaluator: nn.Module | None = None) -> list[set[str]]:
    """The set of kinds above the threshold, per image."""
    probs = shape_probabilities(images, evaluator)
    return [{k for k, p in zip(KINDS, row) if p > threshold} for row in probs.tolist()]
