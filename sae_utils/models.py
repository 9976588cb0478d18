"""Load a Stable Diffusion pipeline: a real checkpoint (SD 1.x, 2.x, XL), a random-weight twin, or the `toy` model.

All are plain diffusers pipelines (`StableDiffusionPipeline`, `StableDiffusionXLPipeline` for SDXL), so every
other module of `sae_utils` runs the same code on each of them (sae_utils.families says what differs):

    pipe = load_pipeline("tiny")                              # random weights, SD v1 layout, offline, CPU
    pipe = load_pipeline("tiny-sd2"), load_pipeline("tiny-sdxl")   # the same for SD 2.x and SDXL
    pipe = load_pipeline("toy")                               # the project's trained model of a shape world
    pipe = load_pipeline("CompVis/stable-diffusion-v1-4", device="cuda")   # the real thing (needs internet)
    pipe = load_pipeline("sdxl", device="cuda")               # a family's name: its official checkpoint
"""
from __future__ import annotations

import gzip
import json
import importlib
import importlib.util
import os
import re
import socket
from functools import lru_cache
from pathlib import Path

import torch

from . import _environment  # noqa: F401  (before diffusers: quiets an expected transformers notice)
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .families import ALIASES, FAMILIES, TINY_MODELS, family_of, tiny_twin

DEFAULT_MODEL = "CompVis/stable-diffusion-v1-4"
TOY_MODEL_DIR = Path(__file__).parent / "toyworld" / "model"
CLIP_VOCAB_SIZE = 49408
MAX_TOKENS = 77  # the CLIP text encoder reads 77 tokens: start, 75 words' tokens, end (or padding)

# The UNet of Stable Diffusion v1.x (CompVis/stable-diffusion-v1-4, unet/config.json). Used to build the
# architecture with random weights (benchmarks, tests) and to fingerprint checkpoints.
SD_V1_UNET_CONFIG = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    norm_num_groups=32, act_fn="silu", flip_sin_to_cos=True, freq_shift=0, downsample_padding=1,
)
# SD v1's sampler, as shipped with the checkpoint (scheduler/scheduler_config.json).
SD_V1_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False,
)


class ModelNotAvailableError(RuntimeError):
    """The requested weights cannot be loaded here (no internet, no local copy, missing file)."""


# ----------------------------------------------------------------------------------------------------------
# The tokenizer
# ----------------------------------------------------------------------------------------------------------
@lru_cache(maxsize=2)
def clip_tokenizer(pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """The CLIP BPE tokenizer of Stable Diffusion v1 (49408 tokens), built offline.

    Built from CLIP's byte-pair merges, shipped in sae_utils/data (MIT, OpenAI; see NOTICE.md), the way
    CLIP builds its vocabulary: 256 byte symbols, the same with the end-of-word mark, one token per merge,
    and the start and end tokens. pad_token: SD 1.x pads with the end token; `clip_tokenizer("!")` is the
    OpenCLIP tokenizer of SD 2.x and SDXL's tokenizer_2 (the same vocabulary, padding with "!", id 0).
    """
    bpe_path = Path(__file__).parent / "data" / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]  # the 48894 merges CLIP uses
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_symbols = list(bytes_to_unicode().values())
    vocab = byte_symbols + [s + "</w>" for s in byte_symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    tokenizer = CLIPTokenizer(vocab={s: i for i, s in enumerate(vocab)}, merges=merges,
                              model_max_length=MAX_TOKENS, pad_token=pad_token)
    check_tokenizer(tokenizer, where=str(bpe_path))
    return tokenizer


def check_tokenizer(tokenizer, where: str = "") -> None:
    """Fail loudly on a wrong tokenizer (e.g. transformers' silent 2-token fallback for a missing folder)."""
    if len(tokenizer) != CLIP_VOCAB_SIZE or tokenizer("a cat").input_ids != [49406, 320, 2368, 49407]:
        raise ModelNotAvailableError(
            f"The tokenizer loaded from {where or 'the pipeline'} is not the CLIP tokenizer of Stable Diffusion "
            f"({len(tokenizer)} tokens, expected {CLIP_VOCAB_SIZE}). Check that the folder holds "
            "tokenizer files, or use sae_utils.models.clip_tokenizer().")


# ----------------------------------------------------------------------------------------------------------
# The `tiny` pipeline: SD v1's layout with random weights
# ----------------------------------------------------------------------------------------------------------
def tiny_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """A random-weight `StableDiffusionPipeline` with the Stable Diffusion v1 layout, built offline.

    Same block types, same processors, same tokenizer as SD v1, at a fraction of the width: 4 UNet levels
    (cross-attention in the first three and the mid block, as in SD), a 32x32 latent so that cross-attention
    runs at 32x32, 16x16, 8x8 and 4x4, a 2-level autoencoder (64 px images) and a 2-layer CLIP text encoder. Its images are noise;
    it exists for tests and fast CI. Deterministic: the same `seed` gives the same weights, and the
    caller's global random state is left untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**{
            **SD_V1_UNET_CONFIG, "sample_size": 32, "layers_per_block": 1,
            "block_out_channels": (32, 32, 64, 64), "cross_attention_dim": 32, "norm_num_groups": 8})
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            norm_num_groups=8, sample_size=64)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=CLIP_VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=MAX_TOKENS, projection_dim=32,
            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), unet=unet,
        scheduler=PNDMScheduler(**SD_V1_SCHEDULER_CONFIG), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)


def sd_v1_pipeline(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0,
                   ) -> StableDiffusionPipeline:
    """Stable Diffusion v1's full architecture (UNet 860 M, CLIP ViT-L/14 text encoder, autoencoder) with
    random weights, built directly on `device`: for benchmarks and memory checks where the checkpoint
    cannot be downloaded. Its images are noise; its shapes, speed and memory are SD's. Seeds every device's
    generator with `seed` (the CPU's is restored afterwards)."""
    device = torch.device(device)
    with torch.random.fork_rng(devices=[]), device:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**SD_V1_UNET_CONFIG)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=CLIP_VOCAB_SIZE, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=MAX_TOKENS, hidden_act="quick_gelu",
            projection_dim=768, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
            layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, sample_size=512)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), unet=unet,
        scheduler=PNDMScheduler(**SD_V1_SCHEDULER_CONFIG), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


# ----------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------
def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`"auto"` picks CUDA, then Apple's MPS, then the CPU."""
    if str(device) != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """`None`/`"auto"`: float16 on a GPU (what fits a 15 GB T4), float32 on the CPU."""
    if dtype in (None, "auto"):
        return torch.float16 if device.type in ("cuda", "mps") else torch.float32
    if isinstance(dtype, str):
        names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
                 "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
        if dtype not in names:
            raise ValueError(f"Unknown dtype {dtype!r}; use one of {sorted(names)} or a torch.dtype.")
        return names[dtype]
    return dtype


def load_pipeline(model: str | os.PathLike = DEFAULT_MODEL, device: str | torch.device = "auto",
                  dtype: str | torch.dtype | None = None, safety_checker: bool = True,
                  progress_bar: bool = False) -> StableDiffusionPipeline:
    """A pipeline from a name: a twin (`"tiny"` = SD 1.x, `"tiny-sd2"`, `"tiny-sdxl"`), `"toy"`, a family
    (`"sd1"`, `"sd2"`, `"sd2-base"`, `"sdxl"`: its official checkpoint), a local folder, or a hub id.

    SD 1.x and 2.x load as `StableDiffusionPipeline`, SDXL as `StableDiffusionXLPipeline` (the folder's
    model_index.json decides); other pipelines are refused. device: `"auto"` (CUDA, MPS, else CPU) or any torch
    device. dtype: `None` = float16 on a GPU, float32 on the CPU. safety_checker: keep the checkpoint's NSFW filter (a real checkpoint only). A hub id that is
    neither cached nor reachable raises `ModelNotAvailableError` at once instead of retrying for minutes.
    """
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    name = ALIASES.get(str(model), str(model))
    if name in TINY_MODELS:
        pipe = tiny_twin(TINY_MODELS[name])
    elif name == "toy":
        if not (TOY_MODEL_DIR / "model_index.json").exists():
            raise ModelNotAvailableError(
                f"The toy model is not in this checkout ({TOY_MODEL_DIR}). Train it with "
                "`python -m sae_utils.toyworld.train_model`, or use model='tiny'.")
        pipe = _from_pretrained(TOY_MODEL_DIR, dtype, safety_checker=False, local_files_only=True)
    elif Path(name).expanduser().is_dir():
        pipe = _from_pretrained(Path(name).expanduser(), dtype, safety_checker, local_files_only=True)
    elif Path(name).suffix in (".ckpt", ".safetensors"):
        raise ModelNotAvailableError(
            f"{name!r} looks like a single checkpoint file; sae_utils loads diffusers folders. Convert it with "
            "StableDiffusionPipeline.from_single_file(...).save_pretrained(folder) and pass the folder.")
    elif not _could_be_hub_id(name):
        raise ModelNotAvailableError(
            f"No model folder at {name!r} ({Path(name).expanduser().resolve()} does not exist or is not a folder). "
            "Check the path; a hub id looks like 'CompVis/stable-diffusion-v1-4'.")
    else:
        pipe = _from_hub(name, dtype, safety_checker)
    for tokenizer in (pipe.tokenizer, getattr(pipe, "tokenizer_2", None)):
        if tokenizer is not None:
            check_tokenizer(tokenizer, where=name)
    pipe.set_progress_bar_config(disable=not progress_bar)
    pipe.to(device)
    if pipe.unet.dtype != dtype:  # casting a float32 model to float32 only earns a diffusers warning
        pipe.to(dtype=dtype)
    return pipe


def is_twin(model: str | os.PathLike) -> bool:
    """True for a random-weight twin ("tiny", "tiny-sd1", "tiny-sd2", "tiny-sdxl"): noise for images, numbers that
    mean nothing; the notebooks use it to pick CI-sized defaults."""
    return str(model) in TINY_MODELS


def portable_model_name(model: str | os.PathLike) -> str:
    """How a delta names its base model: a hub id as it is, "toy" for the shipped toy model, and a local folder
    by its own name, not by this machine's path (which means nothing elsewhere)."""
    name = str(model)
    if name in TINY_MODELS or name == "toy":
        return name
    if name in ALIASES:
        return ALIASES[name]
    path = Path(name).expanduser()
    if path.is_dir():
        return "toy" if path.resolve() == TOY_MODEL_DIR.resolve() else path.resolve().name
    return name


def _could_be_hub_id(name: str) -> bool:
    """'owner/name' or 'name' of letters, digits, '-', '_', '.': anything else (an absolute or relative path,
    '~', two slashes) can only be a local folder."""
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", name) is not None and ".." not in name


def model_family(pipe) -> str:
    """"sd1", "sd2" or "sdxl": what a method's official settings depend on (see `families.family_of`). SD 2.x's
    OpenCLIP tokenizer pads with "!" (id 0), SD 1.x's CLIP tokenizer with the end token; SDXL has two text encoders;
    the toy and tiny models use SD 1's tokenizer and layout."""
    return family_of(pipe)


def model_info(pipe) -> dict:
    """What a model folder says about itself in `toy_model.json` (vocabulary, sampler defaults, provenance);
    {} for models without one (real checkpoints, `tiny`)."""
    folder = getattr(pipe, "name_or_path", None) or pipe.config.get("_name_or_path") or ""
    path = Path(folder) / "toy_model.json"
    return json.loads(path.read_text()) if folder and path.is_file() else {}


def _from_hub(repo_id: str, dtype: torch.dtype, safety_checker: bool) -> StableDiffusionPipeline:
    """Cached copy first; then the network, but only if the hub answers within a few seconds."""
    try:
        return _from_pretrained(repo_id, dtype, safety_checker, local_files_only=True)
    except (OSError, ValueError):
        pass  # not in the local cache
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    folder = "" if "/" not in repo_id else f" (nor a local folder: {Path(repo_id).resolve()} does not exist)"
    if offline or not _hub_reachable():
        why = "HF_HUB_OFFLINE is set" if offline else "huggingface.co cannot be reached from this machine"
        raise ModelNotAvailableError(
            f"Cannot load {repo_id!r}: it is not in the local Hugging Face cache{folder} and {why}. Download it on a "
            "machine with internet (hf download ...) and pass the local folder, or use "
            f"model='toy' (the project's own trained model) or model={_twin_of(repo_id)!r} (random weights in its "
            "layout, for tests).")
    try:
        return _from_pretrained(repo_id, dtype, safety_checker, local_files_only=False)
    except (OSError, ValueError) as error:  # not found, gated, a proxy's error page, a broken download, ...
        raise ModelNotAvailableError(
            f"Cannot load {repo_id!r} from the hub{folder}: {str(error).splitlines()[0] if str(error) else error!r}. "
            "Check the id (and a token for gated models: hf auth login), or download it and pass the "
            "local folder.") from error


def _twin_of(name: str) -> str:
    from .families import family_of_name

    return FAMILIES[family_of_name(name) or "sd1"].tiny


def _from_pretrained(source, dtype, safety_checker, local_files_only) -> StableDiffusionPipeline:
    pipeline_class = _pipeline_class(source, local_files_only)
    kwargs = {} if safety_checker or pipeline_class is not StableDiffusionPipeline else \
        dict(safety_checker=None, requires_safety_checker=False)  # SDXL has no safety checker
    # diffusers renamed torch_dtype to dtype in 2026 (PR 14205); Colab images may carry an older release
    kwargs["dtype" if _diffusers_takes_dtype() else "torch_dtype"] = dtype
    return pipeline_class.from_pretrained(source, local_files_only=local_files_only, **kwargs)


def _pipeline_class(source, local_files_only):
    """StableDiffusionPipeline or StableDiffusionXLPipeline, as the checkpoint's model_index.json says."""
    from diffusers import DiffusionPipeline, StableDiffusionXLPipeline

    index = Path(source) / "model_index.json"
    config = json.loads(index.read_text()) if index.is_file() else \
        DiffusionPipeline.load_config(str(source), local_files_only=local_files_only)  # OSError when absent
    name = config.get("_class_name", "StableDiffusionPipeline")
    classes = {FAMILIES["sd1"].pipeline_class: StableDiffusionPipeline,
               FAMILIES["sdxl"].pipeline_class: StableDiffusionXLPipeline}
    if name not in classes:
        raise ModelNotAvailableError(
            f"{str(source)!r} is a {name}; sae_utils runs text-to-image StableDiffusionPipeline (SD 1.x, 2.x) and "
            "StableDiffusionXLPipeline (SDXL base) checkpoints. Pass one of those (e.g. 'sdxl', 'sd2').")
    return classes[name]


def _diffusers_takes_dtype() -> bool:
    return importlib.util.find_spec("diffusers.utils.deprecation_utils") is not None and hasattr(
        importlib.import_module("diffusers.utils.deprecation_utils"), "_resolve_dtype")


def _hub_reachable(host: str = "huggingface.co", timeout_s: float = 3.0) -> bool:
    endpoint = os.environ.get("HF_ENDPOINT", "")
    if endpoint:
        host = endpoint.split("://")[-1].split("/")[0].split(":")[0]
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False
