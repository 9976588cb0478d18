"""Sampling: the sampler settings each model is evaluated with, and images for prompts x seeds at scale.

Real Stable Diffusion is sampled as the SepEn evaluation does (50 steps, guidance 6.0); the toy model ships
its own defaults in its folder (toy_model.json); `tiny` has no meaningful images and uses SD's settings.

    config = GenerationConfig(model="toy", prompt_set="toy/held-out", num_seeds=16, output_dir="runs/toy-sd")
    generate(config)     # runs/toy-sd/images/{prompt_slug}/{seed:04d}.png and metadata.jsonl; resumable

One output folder holds one run: one model, delta, method and sampler setting (recorded in run.json with the
first image, so a command that fails before any image leaves the folder free; a second `generate` into it with
other settings is refused). Every image is a pure function of (prompt, seed): its
initial noise comes from its own `torch.Generator().manual_seed(seed)`, whatever batch it is drawn in. Under
`accelerate launch` (GPUs) or `torchrun` (CPUs: accelerate's --cpu launcher starts one process) each process
takes every N-th (prompt, seed) and writes its own `metadata-{rank}.jsonl`; `read_metadata` merges the shards.
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import math
import os
import re
import time
import uuid
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import torch

from .checkpoint import check_writable, fault_point, remove_orphans
from .models import DEFAULT_MODEL, model_info

SD_SAMPLING = {"num_inference_steps": 50, "guidance_scale": 6.0}  # the SepEn evaluation settings [ref]
METHODS = ("sd", "attend-and-excite", "sepen-test-time")
TEST_TIME_METHODS = METHODS[1:]
RUN_FILE = "run.json"
RECORD_START = '{"prompt": '  # every record is written with "prompt" first (see generate)
logger = logging.getLogger(__name__)


def sampler_defaults(pipe) -> dict:
    """`num_inference_steps` and `guidance_scale` for this pipeline (a fresh dict: change it freely)."""
    return dict(model_info(pipe).get("sampling") or SD_SAMPLING)


def method_sampler_defaults(pipe, method: str) -> dict:
    """The sampler settings a method runs with when none are given.

    "sd": `sampler_defaults` (SD: 50 steps, guidance 6.0). The test-time methods: Attend-and-Excite's public
    configuration (50 steps, guidance 7.5) on SD and `tiny`; a model that ships its own defaults (the toy) keeps
    them for every method, since its sampler is what it was trained to be sampled with.
    """
    from .baselines import AAE_SAMPLING

    check_method(method)
    if method == "sd" or model_info(pipe).get("sampling"):
        return sampler_defaults(pipe)
    return dict(AAE_SAMPLING)


def check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; choose from {list(METHODS)} (a finetuned model is 'sd' "
                         "with a delta).")


# ----------------------------------------------------------------------------------------------------------
# The configuration
# ----------------------------------------------------------------------------------------------------------
@dataclass
class GenerationConfig:
    """Everything a generation run depends on; every field is also a flag of `sae-generate`."""

    model: str = DEFAULT_MODEL  # "tiny", "toy", a diffusers folder or a hub id
    delta: str | None = None  # a delta file (sae_utils.delta) applied for the run and undone after
    method: str = "sd"  # "sd", "attend-and-excite", "sepen-test-time"
    label: str | None = None  # the run's name in tables and plots; default: method, plus "+" and the delta's name
    prompts: list[str] | None = None
    # a named set, "attend-and-excite[/animals|/animals_objects|/objects]" (276), "multi-concept[/seen-seen|
    # /seen-unseen|/unseen-unseen]" (200), "toy[/seen|/held-out]" (28), or a text file of prompts, one a line
    prompt_set: str | None = None
    seeds: list[int] | None = None  # default: 0 .. num_seeds - 1
    num_seeds: int = 64  # images per prompt, as in the paper
    num_inference_steps: int | None = None  # None: the method's default (method_sampler_defaults)
    guidance_scale: float | None = None
    batch_size: int = 4  # images of one prompt drawn at once
    height: int | None = None  # pixels; None: the model's own (512 for SD v1)
    width: int | None = None
    output_dir: str = "runs/generate"
    capture_attention: bool = False  # save each image's word maps (maps/...safetensors) and attention stats
    map_resolution: int | None = None  # the maps captured and optimised; None: the model's (SD v1 16x16, toy 8x8)
    # the test-time methods (baselines.py)
    max_iter_to_alter: int | None = None  # None: A&E's schedule placed for the step count (25 of 50)
    scale_factor: float = 20.0
    max_refinement_steps: int = 20
    step_size_schedule: str = "sqrt"  # "sqrt" (the public A&E code) or "linear"
    lambda_sep: float = 1.0  # sepen-test-time only
    lambda_en: float = 0.5
    # machinery
    device: str = "auto"
    dtype: str | None = None  # None: float16 on a GPU, float32 on the CPU
    progress: bool = True

    def validate(self) -> None:
        from .cli import check_field_types

        check_field_types(self)
        check_method(self.method)
        if self.prompts is None and self.prompt_set is None:
            raise ValueError("Give prompts (e.g. ['a cat and a dog']) or a prompt_set (e.g. 'attend-and-excite').")
        for name in ("num_seeds", "batch_size", "max_refinement_steps"):
            if getattr(self, name) < (0 if name == "max_refinement_steps" else 1):
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}.")
        if self.seeds is not None and (not self.seeds or len(set(self.seeds)) != len(self.seeds)
                                       or min(self.seeds) < 0):
            raise ValueError(f"seeds must be distinct non-negative integers, got {self.seeds}.")
        for name in ("num_inference_steps", "height", "width", "map_resolution"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer (or None), got {getattr(self, name)}.")
        if self.max_iter_to_alter is not None and self.max_iter_to_alter < 0:
            raise ValueError(f"max_iter_to_alter must be >= 0 (or None), got {self.max_iter_to_alter}.")
        for name in ("guidance_scale", "scale_factor", "lambda_sep", "lambda_en"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}.")
        if self.step_size_schedule not in ("sqrt", "linear"):
            raise ValueError(f"step_size_schedule={self.step_size_schedule!r}: use 'sqrt' or 'linear'.")
        if self.prompts is not None and any(not p.strip() for p in self.prompts):
            raise ValueError("An empty prompt was given; every prompt names the objects to draw.")

    def seed_list(self) -> list[int]:
        return list(self.seeds) if self.seeds is not None else list(range(self.num_seeds))


@dataclass
class GenerationSummary:
    output_dir: Path
    generated: int  # images made by this process now
    skipped: int  # of this process's share, already there
    seconds: float


# ----------------------------------------------------------------------------------------------------------
# Prompts, words, categories
# ----------------------------------------------------------------------------------------------------------
def prompt_set(name: str) -> list[str]:
    """A named prompt set (276 Attend-and-Excite prompts, 200 multi-concept prompts, 28 toy prompts, or a part
    of one after a '/'), or the prompts of a text file (one per line; blank lines and '#' comments skipped)."""
    from .prompts import attend_and_excite_prompts, multi_concept_eval_prompts

    base, _, part = name.partition("/")
    if base == "attend-and-excite":
        return attend_and_excite_prompts(part or None)
    if base == "multi-concept":
        prompts = multi_concept_eval_prompts()
        parts = ("seen-seen", "seen-unseen", "unseen-unseen")
        if part and part not in parts:
            raise ValueError(f"Unknown multi-concept part {part!r}; choose from {list(parts)}.")
        return [p for p in prompts if not part or prompt_category(p, object_words(p)) == part]
    if base == "toy":
        from .toyworld import ALL_PAIRS, HELD_OUT_PAIRS, SEEN_PAIRS, prompt_for

        pairs = {"": ALL_PAIRS, "seen": SEEN_PAIRS, "held-out": HELD_OUT_PAIRS}
        if part not in pairs:
            raise ValueError(f"Unknown toy part {part!r}; choose from 'toy', 'toy/seen', 'toy/held-out'.")
        return [prompt_for(pair) for pair in pairs[part]]
    path = Path(name).expanduser()
    if not path.is_file():
        raise ValueError(f"{name!r} is neither a named prompt set ('attend-and-excite[/CATEGORY]', 'multi-concept"
                         "[/seen-seen|/seen-unseen|/unseen-unseen]', 'toy[/seen|/held-out]') nor a text file.")
    lines = [line.strip() for line in path.read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def resolve_prompts(config: GenerationConfig) -> list[str]:
    prompts = list(config.prompts or []) + (prompt_set(config.prompt_set) if config.prompt_set else [])
    repeated = sorted({p for p in prompts if prompts.count(p) > 1})
    if repeated:
        raise ValueError(f"Prompts given more than once: {repeated[:3]}. Each (prompt, seed) is one image; list "
                         "a prompt once and ask for more seeds instead.")
    if not prompts:
        raise ValueError(f"No prompts: the prompt set {config.prompt_set!r} is empty.")
    return prompts


def object_words(prompt: str) -> list[str]:
    """The object words of a prompt: the benchmark's nouns for Attend-and-Excite prompts, else the last word on
    each side of "and"/"with" (one word for a single-object prompt such as "a photo of a cat")."""
    return [word for word, _ in object_word_specs(prompt)]


def object_word_specs(prompt: str) -> list[tuple[str, int]]:
    """`object_words` with each word's occurrence in the prompt, as maps and the test-time methods read them: in
    "a photo of a teddy bear and a bear" the two objects are ('bear', 0) and ('bear', 1), not one token twice."""
    from .prompts import attend_and_excite_words, prompt_object_specs
    from .tokens import occurrence_at

    if prompt not in _benchmark_prompts():
        return prompt_object_specs(prompt)
    specs, words = [], list(attend_and_excite_words(prompt))
    for match in re.finditer(r"[^\s,]+", prompt):  # the benchmark's own split: on spaces and commas
        if words and match.group() == words[0]:
            specs.append((words.pop(0), occurrence_at(prompt, match.group(), match.start())))
    return specs


def prompt_category(prompt: str, words: Sequence[str]) -> str:
    """The prompt's category in the tables: the Attend-and-Excite set it is from ('animals', 'animals_objects',
    'objects'), the multi-concept split of its two concepts ('seen-seen', 'seen-unseen', 'unseen-unseen'), the
    toy split of its two shapes ('toy-seen', 'toy-held-out'), else 'custom'."""
    from .prompts import multi_concept_split

    benchmark = _benchmark_prompts()
    if prompt in benchmark:
        return benchmark[prompt]
    split = multi_concept_split()
    if len(words) == 2 and all(w in split["seen"] or w in split["unseen"] for w in words):
        seen = sorted(("seen" if w in split["seen"] else "unseen") for w in words)
        return "-".join(seen)
    from .toyworld import HELD_OUT_PAIRS, KINDS

    if len(words) == 2 and all(w in KINDS for w in words) and words[0] != words[1]:
        held_out = any({*pair} == {*words} for pair in HELD_OUT_PAIRS)
        return "toy-held-out" if held_out else "toy-seen"
    return "custom"


def _benchmark_prompts() -> dict[str, str]:
    from .prompts import concept_data

    sets = concept_data()["attend_and_excite"]["prompts"]
    return {prompt: category for category, prompts in sets.items() for prompt in prompts}


def prompt_slug(prompt: str) -> str:
    """A folder name for a prompt: 'a cat and a dog' -> 'a_cat_and_a_dog'. A short hash of the prompt is added
    when the name would not give the prompt back (punctuation, capitals, underscores, length), so two prompts
    never share a folder."""
    slug = re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_")[:80] or "prompt"
    if slug.replace("_", " ") != prompt:
        slug += "-" + hashlib.sha1(prompt.encode()).hexdigest()[:8]
    return slug


def image_relpath(prompt: str, seed: int) -> str:
    return f"images/{prompt_slug(prompt)}/{seed:04d}.png"


def maps_relpath(prompt: str, seed: int) -> str:
    return f"maps/{prompt_slug(prompt)}/{seed:04d}.safetensors"


# ----------------------------------------------------------------------------------------------------------
# Metadata on disk
# ----------------------------------------------------------------------------------------------------------
def metadata_files(output_dir: str | os.PathLike) -> list[Path]:
    """metadata.jsonl (one process) and metadata-{rank}.jsonl (one per process of a multi-process run)."""
    folder = Path(output_dir)
    return sorted(p for p in [folder / "metadata.jsonl", *folder.glob("metadata-*.jsonl")] if p.is_file())


def read_metadata(output_dir: str | os.PathLike) -> list[dict]:
    """Every image record of a run, merged over the shards; a later record of the same (prompt, seed, method)
    replaces an earlier one (an image regenerated after its file was lost). A truncated last line (a process
    killed while writing) is skipped with a warning, and so is the cut-off start of a line that an older version
    appended a record to (the record itself is kept); any other broken line is an error."""
    records: dict[tuple, dict] = {}
    for path in metadata_files(output_dir):
        lines = path.read_text(errors="replace").splitlines()
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = _parse_record(line)
            except (json.JSONDecodeError, ValueError) as error:
                if number == len(lines):
                    warnings.warn(f"{path}: the last line is cut off (an interrupted write); its image will be "
                                  "generated again on resume.")
                    continue
                raise ValueError(f"{path}, line {number}, is not an image record ({error}): the file was edited or "
                                 "corrupted. Delete that line; its image is then generated again on resume.") from error
            records[(record["prompt"], record["seed"], record["method"])] = record
    return list(records.values())


def _parse_record(line: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        # a cut-off line with a whole record appended to it (what a kill mid-line left before append_records
        # repaired cut lines): the record is the line's last well-formed tail
        for start in _record_starts(line):
            try:
                record = json.loads(line[start:])
            except json.JSONDecodeError:
                continue
            warnings.warn(f"A record was appended to a cut-off line ({line[:40]!r}...): the cut record is dropped "
                          "(its image is generated again on resume), the appended one kept.")
            break
        else:
            raise
    if not (isinstance(record, dict) and isinstance(record.get("prompt"), str) and type(record.get("seed")) is int
            and isinstance(record.get("method"), str) and isinstance(record.get("image"), str)):
        raise ValueError("a record needs a prompt, a seed, a method and an image")
    return record


def _record_starts(line: str) -> list[int]:
    starts, at = [], line.find(RECORD_START, 1)
    while at != -1:
        starts.append(at)
        at = line.find(RECORD_START, at + 1)
    return starts


def append_records(path: str | os.PathLike, records: Sequence[dict]) -> None:
    """Append JSON lines and flush them to disk (a crash loses at most the line being written). A last line cut
    off by an earlier crash or a full disk is removed first (its image is generated again), so a new record never
    lands on the end of a broken one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab+") as f:
        _drop_cut_last_line(f)
        for record in records:
            if next(iter(record), None) != "prompt":
                raise ValueError("An image record must start with its prompt (read_metadata finds records by it).")
            f.write((json.dumps(record) + "\n").encode())
            fault_point("metadata:record-written")
        f.flush()
        os.fsync(f.fileno())


def _drop_cut_last_line(f) -> None:
    """Truncate an open (binary, append) file after its last newline, if it does not end with one."""
    end = f.seek(0, os.SEEK_END)
    if end == 0:
        return
    f.seek(end - 1)
    if f.read(1) == b"\n":
        return
    position = end
    while position > 0:  # back to the last newline, a block at a time (the file may be large)
        start = max(0, position - 65536)
        f.seek(start)
        block = f.read(position - start)
        newline = block.rfind(b"\n")
        if newline != -1:
            position = start + newline + 1
            break
        position = start
    logger.warning("%s ended in a cut-off line (%d bytes, an interrupted write): removed; its image is generated "
                   "again.", f.name, end - position)
    f.truncate(position)


def _write_atomically(path: Path, write) -> None:
    """`write(tmp_path)` then rename: a killed process never leaves half a file under the final name (only a
    temporary, which the next `generate` removes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}{path.suffix}")
    try:
        write(tmp)
        fault_point("generate:file-written")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def file_digest(path: str | os.PathLike) -> str:
    """16 hex characters of the file's sha256."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------
# One batch: images of one prompt for some seeds
# ----------------------------------------------------------------------------------------------------------
def sample_batch(pipe, method: str, prompt: str, words: Sequence[str], seeds: Sequence[int], settings: dict,
                 method_settings: dict, capture_attention: bool = False, map_resolution: int | None = None) -> dict:
    """Images of `prompt` for `seeds`, drawn as one batch; each from `torch.Generator().manual_seed(seed)`.

    settings: num_inference_steps, guidance_scale, height, width. method_settings: the test-time method's
    keywords (see baselines). Returns {"images": [PIL], "word_maps": (B, K, h, w) or None, "per_image": [dict]}
    where per_image holds what each image's metadata record adds (test-time losses, nsfw flag).
    """
    from .attention import capture_cross_attention, map_resolution as model_map_resolution
    from .baselines import attend_and_excite, sepen_test_time

    map_resolution = map_resolution or model_map_resolution(pipe, settings["height"] // pipe.vae_scale_factor)

    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    per_image = [{} for _ in seeds]
    if method == "sd":
        capture = capture_cross_attention(pipe, resolution=map_resolution, keep="mean",
                                          latent_size=settings["height"] // pipe.vae_scale_factor) \
            if capture_attention else contextlib.nullcontext()
        with capture as store:
            output = pipe(prompt, num_images_per_prompt=len(seeds), generator=generators, **settings)
        word_maps = store.word_maps(prompt, list(words)).float().cpu() if capture_attention else None
        nsfw = getattr(output, "nsfw_content_detected", None)  # SDXL has no safety checker
        for record, flagged in zip(per_image, nsfw or [None] * len(seeds)):
            record["nsfw"] = None if flagged is None else bool(flagged)
        return {"images": output.images, "word_maps": word_maps, "per_image": per_image}
    run = attend_and_excite if method == "attend-and-excite" else sepen_test_time
    output = run(pipe, prompt, list(words), generators, **settings, **method_settings, resolution=map_resolution,
                 capture_attention=capture_attention)
    altered = [entry for entry in output.log if "loss" in entry]
    for b, record in enumerate(per_image):
        record["nsfw"] = None if output.nsfw is None else output.nsfw[b]
        record["test_time"] = {
            "loss": [entry["loss"][b] for entry in altered],
            "loss_refined": [entry["loss_refined"][b] for entry in altered],
            "refinement_iterations": {str(e["step"]): e["refinement_iterations"][b] for e in altered
                                      if e["refinement"]},
        }
    return {"images": output.images, "word_maps": output.word_maps, "per_image": per_image}


def test_time_settings(config: GenerationConfig, num_inference_steps: int) -> dict:
    """The keywords of the test-time method for this config (empty for "sd")."""
    from .baselines import attend_and_excite_schedule

    if config.method == "sd":
        return {}
    max_iter, thresholds = attend_and_excite_schedule(num_inference_steps)
    if config.max_iter_to_alter is not None:
        max_iter = config.max_iter_to_alter
        thresholds = {step: value for step, value in thresholds.items() if step < max_iter}
    settings = dict(max_iter_to_alter=max_iter, scale_factor=config.scale_factor,
                    max_refinement_steps=config.max_refinement_steps, step_size_schedule=config.step_size_schedule)
    if config.method == "attend-and-excite":
        settings["thresholds"] = thresholds
    else:
        settings.update(lambda_sep=config.lambda_sep, lambda_en=config.lambda_en)
    return settings


# ----------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------
def generate(config: GenerationConfig, pipe=None) -> GenerationSummary:
    """Generate every (prompt, seed) image of the config not already in `output_dir`; see the module docstring.

    pipe: an already loaded pipeline (notebooks, tests); default: load `config.model`. A delta is applied for
    the run and undone after, even on error.
    """
    from accelerate import PartialState

    from .delta import apply_delta, load_delta
    from .maps import attention_stats
    from .models import load_pipeline

    config.validate()
    start = time.perf_counter()
    state = PartialState(cpu=config.device == "cpu" or not torch.cuda.is_available())
    rank, world = state.process_index, state.num_processes
    prompts, seeds = resolve_prompts(config), config.seed_list()
    words = {prompt: object_words(prompt) for prompt in prompts}
    specs = {prompt: object_word_specs(prompt) for prompt in prompts}
    output_dir = check_writable(config.output_dir)  # before the model loads: a folder that cannot take images
    delta = load_delta(config.delta) if config.delta else None
    if pipe is None:
        device = state.device if config.device in ("auto", "cuda") else torch.device(config.device)
        pipe = load_pipeline(config.model, device=device, dtype=config.dtype)
    check_prompts(pipe, prompts, specs)
    settings, method_settings, run = run_settings(config, pipe, delta)
    records_so_far = read_metadata(output_dir)
    _check_run(output_dir, run, records_so_far)

    done = {(r["prompt"], r["seed"]) for r in records_so_far
            if r["method"] == config.method and (output_dir / r["image"]).is_file()}
    mine = list(itertools.product(prompts, seeds))[rank::world]
    todo = [item for item in mine if item not in done]
    _remove_orphans(output_dir, todo)
    shard = output_dir / ("metadata.jsonl" if world == 1 else f"metadata-{rank}.jsonl")
    from tqdm.auto import tqdm

    bar = tqdm(total=len(todo), desc=f"generate [{rank}/{world}]" if world > 1 else "generate", unit="image",
               disable=not config.progress, position=rank if world > 1 else None)
    handle = apply_delta(pipe, delta) if delta is not None else contextlib.nullcontext()
    with handle:
        for prompt, group in itertools.groupby(todo, key=lambda item: item[0]):
            group_seeds = [seed for _, seed in group]
            for i in range(0, len(group_seeds), config.batch_size):
                batch_seeds = group_seeds[i:i + config.batch_size]
                batch_start = time.perf_counter()
                out = sample_batch(pipe, config.method, prompt, specs[prompt], batch_seeds, settings,
                                   method_settings, config.capture_attention, config.map_resolution)
                seconds = (time.perf_counter() - batch_start) / len(batch_seeds)
                records = []
                for b, seed in enumerate(batch_seeds):
                    record = {"prompt": prompt, "words": words[prompt], "seed": seed,
                              "category": prompt_category(prompt, words[prompt]), **run,
                              "image": image_relpath(prompt, seed), **out["per_image"][b],
                              "seconds": round(seconds, 3), "process": rank,
                              "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
                    if out["word_maps"] is not None:
                        record["attention"] = _save_maps(output_dir, prompt, seed, out["word_maps"][b],
                                                         words[prompt], attention_stats)
                    _write_atomically(output_dir / record["image"],
                                      lambda tmp, image=out["images"][b]: image.save(tmp, format="PNG"))
                    records.append(record)
                _write_run(output_dir, run)  # with the first image: a command that failed before left nothing
                append_records(shard, records)
                bar.update(len(batch_seeds))
    bar.close()
    return GenerationSummary(output_dir, len(todo), len(mine) - len(todo), time.perf_counter() - start)


def run_settings(config: GenerationConfig, pipe, delta=None) -> tuple[dict, dict, dict]:
    """(sampler settings, test-time method keywords, the run's description for run.json and every record)."""
    from .attention import map_resolution

    settings = {**method_sampler_defaults(pipe, config.method),
                **{k: getattr(config, k) for k in ("num_inference_steps", "guidance_scale")
                   if getattr(config, k) is not None}}
    default_side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    settings.update(height=config.height or default_side, width=config.width or default_side)
    multiple = math.lcm(8, pipe.vae_scale_factor)  # diffusers' own rule, and whole latent pixels
    for side in ("height", "width"):
        if settings[side] % multiple:
            raise ValueError(f"{side}={settings[side]} is not a multiple of {multiple}; use e.g. "
                             f"{max(multiple, settings[side] // multiple * multiple)}.")
    method_settings = test_time_settings(config, settings["num_inference_steps"])
    delta_info = None if delta is None else {
        "path": str(Path(config.delta).resolve()), "sha256": file_digest(config.delta),
        "fingerprint": delta.metadata.get("fingerprint"), "base_model": delta.metadata.get("base_model")}
    run = {"model": config.model, "delta": delta_info, "method": config.method, "label": run_label(config),
           "sampler": {**settings, "scheduler": type(pipe.scheduler).__name__},
           "method_settings": _jsonable(method_settings), "capture_attention": config.capture_attention,
           "map_resolution": config.map_resolution or map_resolution(pipe, settings["height"] // pipe.vae_scale_factor)}
    return settings, method_settings, run


def run_label(config: GenerationConfig) -> str:
    """The run's name in tables: `config.label`, else the method, plus "+" and the delta's name (its file name,
    or its folder's for a file called delta.safetensors, as finetuning writes it)."""
    if config.label:
        return config.label
    if not config.delta:
        return config.method
    path = Path(config.delta)
    return f"{config.method}+{path.parent.name if path.stem == 'delta' and path.parent.name else path.stem}"


def check_prompts(pipe, prompts: Sequence[str], specs: dict[str, list]) -> None:
    """Every prompt fits the text encoder (the pipeline would cut a longer one silently, and its records would
    name words the model never read) and its object words have tokens of their own; checked before any image."""
    from .tokens import check_prompt_length, word_token_positions

    for prompt in prompts:
        check_prompt_length(pipe.tokenizer, prompt)
        word_token_positions(pipe.tokenizer, prompt, specs[prompt])


def _check_run(output_dir: Path, run: dict, records: list[dict]) -> None:
    """A folder holds one run: the settings must be those of its run.json, or (a folder whose run.json was lost)
    those its image records carry."""
    path = output_dir / RUN_FILE
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"{path} is not readable JSON ({error}): the folder was edited or corrupted. Delete "
                             "run.json if the images are this run's (it is written again), or use another "
                             "output_dir.") from error
    elif records:
        saved = records[-1]
    else:
        return
    differ = {key: (saved.get(key), run[key]) for key in run if saved.get(key) != _jsonable(run[key])}
    if differ:
        raise ValueError(f"{output_dir} holds a run with other settings {differ} (saved, asked). One folder "
                         "holds one run: use another output_dir, and compare runs with sae-evaluate A B.")


def _write_run(output_dir: Path, run: dict) -> None:
    path = output_dir / RUN_FILE
    if not path.is_file():  # every process may write it: the same content, each write atomic
        _write_atomically(path, lambda tmp: tmp.write_text(json.dumps(_jsonable(run), indent=1)))


def _remove_orphans(output_dir: Path, todo: Sequence[tuple[str, int]]) -> None:
    """Temporaries of this process's images and maps that a killed write left (`.0003.png.tmp-*`); only of the
    images still to draw, which no other process touches."""
    names: dict[Path, list[str]] = {}
    for prompt, seed in todo:
        for relpath in (image_relpath(prompt, seed), maps_relpath(prompt, seed)):
            names.setdefault((output_dir / relpath).parent, []).append(Path(relpath).name)
    for folder, files in names.items():
        remove_orphans(folder, files)


def _save_maps(output_dir: Path, prompt: str, seed: int, maps: torch.Tensor, words: Sequence[str],
               attention_stats) -> dict:
    """maps: (K, h, w). Writes them as safetensors; returns the image's attention stats and the file."""
    from safetensors.torch import save_file

    relpath = maps_relpath(prompt, seed)
    tensor = maps.detach().float().cpu().contiguous()
    _write_atomically(output_dir / relpath, lambda tmp: save_file(
        {"word_maps": tensor}, str(tmp), metadata={"words": json.dumps(list(words)), "prompt": prompt}))
    stats = attention_stats(tensor[None], words)
    return {"peak": stats["peak"][0], "peak_ratio": stats["peak_ratio"][0], "overlap": stats["overlap"][0],
            "maps": relpath}


def _jsonable(value):
    """JSON round trip: tuples -> lists, int dict keys -> strings (what run.json holds)."""
    return json.loads(json.dumps(value))
