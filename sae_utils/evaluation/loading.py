"""Load the metric models (CLIP, BLIP, an OWL detector) by name, failing at once when the weights are not here.

    clip, clip_processor = load_clip()                      # "openai/clip-vit-base-patch16"
    models = load_metric_models(device="cuda")              # all three, as a MetricModels bundle
    models = load_metric_models(blip=None, detector=None)   # CLIP only

A name is a local folder (what `save_pretrained` or `hf download NAME --local-dir DIR` wrote)
or a hub id. A hub id is looked up in the local Hugging Face cache first; if it is not there, the hub is
tried only when HF_HUB_OFFLINE is unset and huggingface.co answers within 3 s. Otherwise
`MetricModelNotAvailable` is raised at once, instead of transformers retrying for minutes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import (AutoImageProcessor, AutoModelForZeroShotObjectDetection, AutoProcessor,
                          BlipForConditionalGeneration, BlipProcessor, CLIPModel, CLIPProcessor)

from sae_utils.models import ModelNotAvailableError, _hub_reachable, resolve_device

DEFAULT_CLIP = "openai/clip-vit-base-patch16"           # ViT-B/16, as Attend-and-Excite's CLIP metrics
DEFAULT_BLIP = "Salesforce/blip-image-captioning-base"  # BLIP base finetuned on COCO captions (LAVIS base_coco)
DEFAULT_DETECTOR = "google/owlv2-base-patch16-ensemble"  # open-vocabulary; the paper used Detic (not on the hub)
DETECTOR_TYPES = ("owlv2", "owlvit")  # detection.py reads their (images, patches, queries) logits
# transformers 5 picks an image processor's backend with `backend=`; 4.x with `use_fast=False` (the PIL one)
_PIL_BACKEND = {"backend": "pil"} if int(transformers.__version__.split(".")[0]) >= 5 else {"use_fast": False}


class MetricModelNotAvailable(ModelNotAvailableError):
    """The weights of a metric model cannot be loaded here (no local copy, and no reachable hub)."""


@dataclass
class MetricModels:
    """The loaded metric models and their processors; a metric whose name was None stays None."""
    clip: CLIPModel | None = None
    clip_processor: CLIPProcessor | None = None
    blip: BlipForConditionalGeneration | None = None
    blip_processor: BlipProcessor | None = None
    detector: torch.nn.Module | None = None
    detector_processor: object | None = None


def load_clip(name: str | os.PathLike = DEFAULT_CLIP, device: str | torch.device = "auto",
              dtype: torch.dtype = torch.float32) -> tuple[CLIPModel, CLIPProcessor]:
    """CLIP model and processor (tokenizer + image processor), in eval mode on `device`."""
    return _load(CLIPModel, CLIPProcessor, name, device, dtype)


def load_blip(name: str | os.PathLike = DEFAULT_BLIP, device: str | torch.device = "auto",
              dtype: torch.dtype = torch.float32) -> tuple[BlipForConditionalGeneration, BlipProcessor]:
    """BLIP captioning model and processor, in eval mode on `device`."""
    return _load(BlipForConditionalGeneration, BlipProcessor, name, device, dtype)


def load_detector(name: str | os.PathLike = DEFAULT_DETECTOR, device: str | torch.device = "auto",
                  dtype: torch.dtype = torch.float32):
    """An OWLv2 (or OWL-ViT) open-vocabulary detector and its processor, in eval mode on `device`."""
    model, processor = _load(AutoModelForZeroShotObjectDetection, AutoProcessor, name, device, dtype)
    if model.config.model_type not in DETECTOR_TYPES:
        raise ValueError(f"{name!r} is a {model.config.model_type!r} detector; detect_objects reads the outputs "
                         f"of {DETECTOR_TYPES} models. Use e.g. {DEFAULT_DETECTOR!r}.")
    return model, processor


def load_metric_models(clip: str | os.PathLike | None = DEFAULT_CLIP, blip: str | os.PathLike | None = DEFAULT_BLIP,
                       detector: str | os.PathLike | None = DEFAULT_DETECTOR, device: str | torch.device = "auto",
                       dtype: torch.dtype = torch.float32) -> MetricModels:
    """Every metric model that has a name; pass None to skip one (e.g. `detector=None`)."""
    models = MetricModels()
    if clip is not None:
        models.clip, models.clip_processor = load_clip(clip, device, dtype)
    if blip is not None:
        models.blip, models.blip_processor = load_blip(blip, device, dtype)
    if detector is not None:
        models.detector, models.detector_processor = load_detector(detector, device, dtype)
    return models


def _load(model_class, processor_class, name, device, dtype):
    source = _local_source(name)
    if source is None:  # a hub id: the cache first, the network only if it answers
        try:
            return _from_pretrained(model_class, processor_class, name, device, dtype, local_files_only=True)
        except OSError:
            pass  # not (completely) in the local cache
        _check_hub(str(name))
        source = str(name)
    return _from_pretrained(model_class, processor_class, source, device, dtype,
                            local_files_only=isinstance(source, Path))


def _local_source(name) -> Path | None:
    """The folder for a local name; None for a hub id; an error for a path that does not exist."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    text = str(name)
    if text.startswith(("/", ".", "~")) or text.count("/") > 1 or os.sep != "/" and os.sep in text:
        raise MetricModelNotAvailable(f"{text!r} looks like a folder but does not exist here. Pass the folder that "
                                      "`hf download NAME --local-dir FOLDER` wrote, or a hub id.")
    return None


def _check_hub(name: str) -> None:
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    if offline or not _hub_reachable():
        why = "HF_HUB_OFFLINE is set" if offline else "huggingface.co cannot be reached from this machine"
        raise MetricModelNotAvailable(
            f"Cannot load the metric model {name!r}: it is not in the local Hugging Face cache and {why}. On a "
            f"machine with internet run `hf download {name} --local-dir FOLDER`, copy FOLDER here "
            "and pass its path instead of the name; or, where the hub is reachable, unset HF_HUB_OFFLINE "
            "(HF_HUB_OFFLINE=0).")


def _from_pretrained(model_class, processor_class, source, device, dtype, local_files_only: bool):
    processor = processor_class.from_pretrained(source, local_files_only=local_files_only)
    # The PIL image processor whether or not torchvision is installed: the reference code (openai clip, LAVIS)
    # resizes PIL images, so with PIL; and the torchvision backend gives other pixels (up to 1.5e-2 apart after
    # normalisation, seen on a tiny 40x48 -> 32 px resize), so scores would depend on the environment.
    processor.image_processor = AutoImageProcessor.from_pretrained(source, local_files_only=local_files_only,
                                                                   **_PIL_BACKEND)
    model = model_class.from_pretrained(source, local_files_only=local_files_only)
    # cast after loading: from_pretrained's keyword for it is torch_dtype in older transformers, dtype in 5
    return model.to(device=resolve_device(device), dtype=dtype).eval(), processor
