"""SepEn measured on a toy model: base rates, single-pair and multi-pair finetuning, and the ablation.

    python -m sae_utils.toyworld.study --out outputs/toy_study          # the full protocol (about an hour, 2 cores)
    python -m sae_utils.toyworld.study --quick                           # 8 seeds per prompt (a few minutes)

The toy world's evaluator says exactly which shapes an image shows, so every number here is a rate with a
confidence interval (Wilson, 95 %), measured on seeds that finetuning never sees:
- single-object accuracy: "a photo of a star" shows a star (and, with a delta, is not damaged by it);
- both-present rate on two-object prompts: seen pairs (shown together in training), held-out target pairs (never
  shown together, look-alike shapes: the compositional failure SepEn addresses) and held-out control pairs (never
  shown together, unlike shapes: a fluent model composes them; a delta must not damage them);
- attention statistics of the two objects' maps at the model's map resolution: the weaker peak, the overlap.
The pairs are the model's own (toy_model.json; `world.model_split`). Protocols: single-pair (one delta per target
pair, evaluated on that pair, and on single shapes and control pairs against the base on the same seeds, as in
the paper) and multi-pair (one delta trained on the seen pairs with the norm loss, evaluated on every set).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..attention import capture_cross_attention, map_resolution
from ..delta import Delta, apply_delta, extract_delta
from ..evaluation.stats import wilson_interval
from ..finetune import FinetuneConfig, Finetuner
from ..maps import overlap, peak_activation
from ..models import load_pipeline
from ..sampling import sampler_defaults
from .evaluator import objects_present
from ..models import model_info
from .world import KINDS, PairSplit, model_split, prompt_for

EVAL_SEED = 100_000  # evaluation seeds start here; finetuning draws its own latents from its own seed


@dataclass
class Samples:
    kinds: list[list[str]]  # the object words of each image
    seeds: list[int]
    images: np.ndarray  # (N, 32, 32, 3) uint8
    word_maps: torch.Tensor | None  # (N, K, h, w): the objects' cross-attention at the map level, mean over steps


def sample(pipe, kinds: Sequence[Sequence[str]], seeds: Sequence[int], batch_size: int = 64,
           capture: bool = True, progress: bool = False, **sampling) -> Samples:
    """One image per (kinds[i], seeds[i]): the prompt "a photo of a {a} [and a {b}]", its own seed.

    An image depends only on its prompt and seed, not on the batch it was drawn in.
    """
    settings = {**sampler_defaults(pipe), **sampling}
    images, maps = [], []
    for start in tqdm(range(0, len(kinds), batch_size), desc="sampling", disable=not progress, leave=False):
        chunk = [list(k) for k in kinds[start:start + batch_size]]
        prompts = [prompt_for(k) for k in chunk]
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds[start:start + batch_size]]
        with capture_cross_attention(pipe, keep="mean") if capture else contextlib.nullcontext() as store:
            out = pipe(prompts, generator=generators, output_type="np", **settings).images
        images.append((out * 255).round().astype(np.uint8))
        if capture:
            maps.append(store.word_maps(prompts, chunk))
    word_maps = torch.cat(maps) if capture and maps and all(m.shape[1] == maps[0].shape[1] for m in maps) else None
    return Samples([list(k) for k in kinds], list(seeds), np.concatenate(images), word_maps)


def rate(successes: np.ndarray) -> dict:
    """{"rate", "low", "high", "n"} of a boolean array."""
    successes = np.asarray(successes, dtype=bool)
    value, low, high = wilson_interval(int(successes.sum()), len(successes))
    return {"rate": round(value, 4), "low": round(low, 4), "high": round(high, 4), "n": int(len(successes))}


def score(samples: Samples) -> dict:
    """The evaluator's verdicts, as rates, and the attention statistics of two-object images."""
    present = objects_present(samples.images, samples.kinds).numpy()  # (N, K)
    result = {"all_present": rate(present.all(axis=1))}
    if present.shape[1] == 2:
        result["first_present"], result["second_present"] = rate(present[:, 0]), rate(present[:, 1])
        result["only_one"] = rate(present.sum(axis=1) == 1)
        if samples.word_maps is not None:
            peaks = peak_activation(samples.word_maps.float())  # (N, 2)
            result["attention"] = {
                "weaker_peak": round(peaks.amin(1).mean().item(), 4),
                "stronger_peak": round(peaks.amax(1).mean().item(), 4),
                "peak_ratio": round((peaks.amin(1) / peaks.amax(1).clamp_min(1e-12)).mean().item(), 4),
                "overlap": round(overlap(samples.word_maps.float()).mean().item(), 4)}
    per_prompt = {}
    for kinds, ok in zip(samples.kinds, present.all(axis=1)):
        per_prompt.setdefault(" + ".join(kinds), []).append(bool(ok))
    result["per_prompt"] = {k: round(float(np.mean(v)), 3) for k, v in per_prompt.items()}
    return result


SETS = ("single", "seen", "target", "control")


def set_prompts(which: str, split: PairSplit) -> list[list[str]]:
    """The prompts (object words) of an evaluation set: "single" (each kind), "seen", "target" or "control" pairs."""
    prompts = {"single": [(k,) for k in KINDS], "seen": split.seen, "target": split.held_out_target,
               "control": split.held_out_control}.get(which)
    if prompts is None:
        raise ValueError(f"Unknown evaluation set {which!r}: use one of {SETS}.")
    return [list(p) for p in prompts]


def eval_set(which: str, per_prompt: int, pairs: Sequence[Sequence[str]] | None = None,
             seed: int = EVAL_SEED, split: PairSplit | None = None) -> tuple[list[list[str]], list[int]]:
    """(kinds, seeds) of an evaluation set of `split` (see `set_prompts`), or of the given `pairs`."""
    from .world import DEFAULT_SPLIT

    prompts = set_prompts(which, split or DEFAULT_SPLIT) if pairs is None else [list(p) for p in pairs]
    kinds = [p for p in prompts for _ in range(per_prompt)]
    seeds = [seed + i for _ in prompts for i in range(per_prompt)]
    return kinds, seeds


@dataclass
class StudySettings:
    single_per_kind: int = 32  # 8 kinds -> 256 images
    pair_per_prompt: int = 64  # 4 target pairs -> 256 images
    control_per_prompt: int = 32  # 4 control pairs -> 128 images
    seen_per_prompt: int = 12  # 20 seen pairs -> 240 images
    batch_size: int = 64
    seed: int = EVAL_SEED  # the first evaluation seed (tuning uses another range: benchmarks/toy_lr_sweep.py)
    sampling: dict = field(default_factory=dict)  # overrides of the model's sampler defaults
    finetune: dict = field(default_factory=lambda: dict(steps=200, learning_rate=2.5e-5))
    multi_pair: dict = field(default_factory=lambda: dict(steps=400, learning_rate=2.5e-5, norm_loss_weight=0.5))
    ablation: dict = field(default_factory=dict)  # name -> FinetuneConfig overrides, single-pair protocol


class ToyStudy:
    """Holds the pipeline and the original weights; each condition is measured from the same base model.

    The pairs are the model's own (`world.model_split` of its toy_model.json)."""

    def __init__(self, pipe, settings: StudySettings, progress: bool = True):
        self.pipe, self.settings, self.progress = pipe, settings, progress
        self.split = model_split(model_info(pipe))
        self.results: dict = {"settings": dataclasses.asdict(settings), "conditions": {}}
        self.samples: dict[str, dict[str, Samples]] = {}  # condition -> evaluation set -> the images and maps
        self._base_checks: dict | None = None

    def sets(self) -> list[str]:
        """The evaluation sets this model has (a model without control pairs has no "control" set)."""
        return [which for which in SETS if set_prompts(which, self.split)]

    def eval_set(self, which: str, per_prompt: int | None = None, pairs=None) -> tuple[list[list[str]], list[int]]:
        s = self.settings
        per = {"single": s.single_per_kind, "seen": s.seen_per_prompt, "target": s.pair_per_prompt,
               "control": s.control_per_prompt}
        return eval_set(which, per_prompt or per[which], pairs=pairs, seed=s.seed, split=self.split)

    def measure(self, name: str = "base", sets: Sequence[str] | None = None) -> dict:
        """Measure the pipeline as it is now, on the chosen evaluation sets; recorded as condition `name`."""
        s = self.settings
        self.samples[name] = {which: sample(self.pipe, *self.eval_set(which), batch_size=s.batch_size,
                                            progress=self.progress, capture=which != "single", **s.sampling)
                              for which in (sets or self.sets())}
        condition = {which: score(samples) for which, samples in self.samples[name].items()}
        self.results["conditions"][name] = condition
        return condition

    def train_delta(self, pairs=None, concepts=None, **overrides) -> Delta:
        """Finetune from the base weights and return the delta; the pipeline is left as it was."""
        config = FinetuneConfig(model="toy", pairs=pairs, concepts=concepts, device="cpu", seed=0,
                                **{**self.settings.finetune, **overrides})
        finetuner = Finetuner(config, pipeline=self.pipe, resume=False)
        base = extract_delta(self.pipe.unet, finetuner.trainable_names)
        result = finetuner.train(progress=self.progress)
        apply_delta(self.pipe, base)  # back to the base weights (the handle is not kept: this is the base)
        return result.delta

    def check_seeds(self) -> dict[str, tuple[list[list[str]], list[int]]]:
        """The single shapes and control pairs every single-pair delta is also checked on (a few seeds each, so
        that all deltas together see about as many images as the base's own sets)."""
        deltas = len(self.split.held_out_target)
        checks = {"single": self.eval_set("single", max(1, self.settings.single_per_kind // deltas))}
        if self.split.held_out_control:
            checks["control"] = self.eval_set("control", max(1, self.settings.control_per_prompt // deltas))
        return checks

    def base_on_check_seeds(self) -> dict:
        """The base model's rates on exactly those seeds: what a delta's rates are compared with (the base's own
        sets have more seeds, hence other rates). Call it with the base weights in place."""
        if self._base_checks is None:
            self._base_checks = {which: score(sample(self.pipe, *seeds, batch_size=self.settings.batch_size,
                                                     capture=False, **self.settings.sampling))["all_present"]
                                 for which, seeds in self.check_seeds().items()}
        return self._base_checks

    def single_pair(self, name: str = "sepen", **overrides) -> dict:
        """One delta per target pair, each measured on its own pair, on single shapes and on control pairs."""
        s = self.settings
        parts: dict[str, list[Samples]] = {"target": []}
        seconds = 0.0
        checks, base = self.check_seeds(), self.base_on_check_seeds()
        for pair in self.split.held_out_target:
            start = time.perf_counter()
            delta = self.train_delta(pairs=[tuple(pair)], **overrides)
            seconds += time.perf_counter() - start
            with apply_delta(self.pipe, delta):
                parts["target"].append(sample(self.pipe, *self.eval_set("target", pairs=[pair]),
                                              batch_size=s.batch_size, **s.sampling))
                for which, seeds in checks.items():
                    parts.setdefault(which, []).append(sample(self.pipe, *seeds, batch_size=s.batch_size,
                                                              capture=False, **s.sampling))
        self.samples[name] = {which: _concat(samples) for which, samples in parts.items()}
        condition = {which: score(samples) for which, samples in self.samples[name].items()}
        condition |= {f"{which}_base": rate for which, rate in base.items()}  # the base on the same seeds
        condition["finetune"] = {**s.finetune, **overrides, "protocol": "single-pair", "train_seconds": round(seconds)}
        self.results["conditions"][name] = condition
        return condition

    def multi_pair(self, name: str = "sepen-multi", **overrides) -> dict:
        """One delta trained on the seen pairs (with the norm loss), measured on every set."""
        start = time.perf_counter()
        delta = self.train_delta(pairs=[tuple(p) for p in self.split.seen],
                                 **{**self.settings.multi_pair, "shuffle_order": True, **overrides})
        seconds = time.perf_counter() - start
        with apply_delta(self.pipe, delta):
            condition = self.measure(name)
        condition["finetune"] = {**self.settings.multi_pair, **overrides, "protocol": "multi-pair",
                                 "train_seconds": round(seconds)}
        return condition


def _concat(parts: Sequence[Samples]) -> Samples:
    maps = [p.word_maps for p in parts]
    return Samples([k for p in parts for k in p.kinds], [s for p in parts for s in p.seeds],
                   np.concatenate([p.images for p in parts]),
                   torch.cat(maps) if all(m is not None for m in maps) else None)


def difference(base: dict, after: dict) -> dict:
    """after - base of a rate, in points, with a conservative interval (the difference of the two intervals)."""
    return {"points": round(100 * (after["rate"] - base["rate"]), 1),
            "low": round(100 * (after["low"] - base["high"]), 1), "high": round(100 * (after["high"] - base["low"]), 1)}


def base_rate(results: dict, name: str, which: str) -> dict | None:
    """The base model's rate that condition `name` is compared with on set `which`: on the same seeds."""
    own = results["conditions"][name].get(f"{which}_base")
    return own or results["conditions"].get("base", {}).get(which, {}).get("all_present")


SET_LABELS = {"single": "single shapes", "seen": "seen pairs", "target": "target pairs", "control": "control pairs"}


def report_table(results: dict) -> str:
    """A markdown table: one row per condition (rates: all named shapes present), then its changes from "base"
    in points, against the base on the same seeds."""
    def cell(entry, key="all_present"):
        if not entry or key not in entry:
            return ""
        r = entry[key]
        return f"{r['rate']:.3f} [{r['low']:.3f}, {r['high']:.3f}] (n={r['n']})"

    def change(name, which):
        base = base_rate(results, name, which)
        after = results["conditions"][name].get(which)
        if name == "base" or not base or not after:
            return ""
        d = difference(base, after["all_present"])
        return f"{d['points']:+.1f} [{d['low']:+.1f}, {d['high']:+.1f}]"

    sets = [w for w in SETS if any(w in c for c in results["conditions"].values())]
    changed = [w for w in ("target", "single", "control") if w in sets]
    lines = ["| condition | " + " | ".join(SET_LABELS[w] for w in sets) + " | "
             + " | ".join(f"{SET_LABELS[w]}: change" for w in changed) + " | weaker peak / overlap (target) |",
             "|---|" + "---|" * (len(sets) + len(changed) + 1)]
    for name, c in results["conditions"].items():
        attention = c.get("target", {}).get("attention", {})
        lines.append(f"| {name} | " + " | ".join(cell(c.get(w)) for w in sets) + " | "
                     + " | ".join(change(name, w) for w in changed)
                     + f" | {attention.get('weaker_peak', '')} / {attention.get('overlap', '')} |")
    return "\n".join(lines)


# The ablation of the full protocol (single-pair, each against the same base): the paper's (Separate only, Enhance
# only, K+V) and the two knobs that matter most on a new model, the learning rate and the number of steps.
ABLATION = {"separate only": dict(lambda_en=0.0), "enhance only": dict(lambda_sep=0.0), "sepen (K+V)": dict(trainable="kv"),
            "lr 1e-05": dict(learning_rate=1e-5), "lr 1e-04": dict(learning_rate=1e-4),
            "100 steps": dict(steps=100), "400 steps": dict(steps=400),
            # a variant, not the paper's recipe: the losses on the model's own sampling path (random latents are
            # far from what the toy model sees when it samples)
            "sepen (K), trajectory latents": dict(latent_source="trajectory"),
            # the released code's readings: of the maps (per-head slices of half the batch; FinetuneConfig.map_reading)
            # and of the prompt (train_individual.py: "a photo of {} and {}", no articles: outside the toy's grammar)
            "sepen (K), released map reading": dict(map_reading="released"),
            "sepen (K), released template": dict(template="a photo of {a} {connector} {b}")}
MULTI_PAIR = {"sepen multi-pair (K, norm loss)": {},
              # the released train_large.py: the norm loss as a second AdamW update (FinetuneConfig.norm_update)
              "sepen multi-pair (K, norm loss as a second update)": dict(norm_update="separate")}
COMMAND = "python -m sae_utils.toyworld.study --out benchmarks/results/toy_study"


def _as_json(value):
    return json.loads(json.dumps(value))  # tuples become lists, as in a results.json read back


def run_study(pipe, settings: StudySettings, out: str | Path, ablation: dict | None = None,
              progress: bool = True, multi_pair: Sequence[str] | None = None, command: str = COMMAND) -> Path:
    """The full protocol: base, single-pair SepEn, multi-pair SepEn, the ablation; report.md + results.json.

    Resumable: results.json is rewritten after every condition, and a rerun into the same folder keeps the
    conditions already measured with the same settings (the numbers are deterministic, so a condition measured
    again would give the same), measuring only the rest: an interrupted hour is not lost, and a condition added
    to the ablation costs only itself.
    """
    from ..checkpoint import atomic_write
    from .report import write_report

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    study = ToyStudy(pipe, settings, progress=progress)
    saved, done, minutes_before = out / "results.json", {}, 0.0
    if saved.exists():
        previous = json.loads(saved.read_text())
        if previous.get("settings") != _as_json(study.results["settings"]):
            raise ValueError(f"{saved} was measured with other settings ({previous.get('settings')}); use another "
                             "--out folder, or delete it to start again.")
        done, minutes_before = previous["conditions"], previous.get("protocol", {}).get("minutes", 0.0)
    # (condition, the finetuning it records, how to measure it), in the order of the report
    single = {"sepen (K)": {}, **(ABLATION if ablation is None else ablation)}
    plan = [("base", None, lambda: study.measure("base"))]
    plan += [(name, {**settings.finetune, **overrides, "protocol": "single-pair"},
              lambda name=name, overrides=overrides: study.single_pair(name, **overrides))
             for name, overrides in single.items()]
    multi = dict(MULTI_PAIR)
    if multi_pair is not None:  # the chosen multi-pair conditions only (an unknown name is refused by main)
        multi = {name: overrides for name, overrides in multi.items() if name in multi_pair}
    elif ablation is not None:
        multi = dict(list(multi.items())[:1])
    plan += [(name, {**settings.multi_pair, **overrides, "protocol": "multi-pair"},
              lambda name=name, overrides=overrides: study.multi_pair(name, **overrides))
             for name, overrides in multi.items()]
    for name, finetune, measure in plan:
        kept = done.get(name)
        recorded = {k: v for k, v in (kept or {}).get("finetune", {}).items() if k != "train_seconds"}
        if kept is not None and (finetune is None or recorded == _as_json(finetune)):
            study.results["conditions"][name] = kept
        else:
            measure()
        atomic_write(saved, json.dumps(study.results, indent=1))
    minutes = minutes_before + (time.perf_counter() - start) / 60
    threads = torch.get_num_threads()
    study.results["protocol"] = {"command": command, "minutes": round(minutes, 1), "threads": threads,
                                 "torch": torch.__version__}
    split = study.split
    checks = " and ".join(f"{len(kinds)} {CHECK_LABELS[which]}" for which, (kinds, _) in study.check_seeds().items())
    notes = (f"The toy model `{display_name(pipe)}` (pair split {split.name!r}, maps at "
             f"{map_resolution(pipe)}x{map_resolution(pipe)}); evaluation seeds from {settings.seed} (never used by "
             f"finetuning). Single-pair protocol: one delta per target pair ({len(split.held_out_target)} pairs), "
             f"{settings.pair_per_prompt} seeds each on its own pair, and each delta also on {checks}, compared "
             f"with the base on the same seeds (so a delta's single-shape and control change is against the base on "
             f"those seeds, not against the base row above). Multi-pair: one delta on the "
             f"{len(split.seen)} seen pairs with the norm loss, measured like the base. "
             f"Finetuning: {settings.finetune}; multi-pair {settings.multi_pair}. `{command}` took {minutes:.0f} "
             f"minutes of {threads} CPU thread{'s' if threads != 1 else ''} in all.")
    title = f"Separate-and-Enhance on the toy model: {protocol_title(settings, ablation, multi_pair)}"
    return write_report(study, out, title, notes, compare="sepen (K)")


CHECK_LABELS = {"single": "images of single shapes", "control": "images of control pairs"}


def protocol_title(settings: StudySettings, ablation: dict | None, multi_pair: Sequence[str] | None) -> str:
    """"the full protocol" only for the committed protocol (default sizes, every condition); otherwise what was
    left out, so a quick run is never read as the full one."""
    full = StudySettings()
    differences = []
    sizes = ("single_per_kind", "pair_per_prompt", "control_per_prompt", "seen_per_prompt")
    if any(getattr(settings, k) != getattr(full, k) for k in sizes):
        differences.append("images per shape / target pair / control pair / seen pair "
                           + "/".join(str(getattr(settings, k)) for k in sizes)
                           + " (the full protocol: " + "/".join(str(getattr(full, k)) for k in sizes) + ")")
    if (settings.sampling, settings.finetune, settings.multi_pair) != (full.sampling, full.finetune, full.multi_pair):
        differences.append("other sampling or finetuning settings")
    if ablation is not None or multi_pair is not None:
        differences.append("some conditions only")
    return "the full protocol" if not differences else "a partial run (" + "; ".join(differences) + ")"


def display_name(pipe) -> str:
    """The model's name as a reader can use it: a folder inside the working directory relative to it (an
    absolute path names the machine it ran on, not the model)."""
    name = str(getattr(pipe, "name_or_path", "") or "")
    try:
        return str(Path(name).resolve().relative_to(Path.cwd().resolve())) if Path(name).is_absolute() else name
    except ValueError:
        return name


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/toy_study")
    parser.add_argument("--model", default="toy")
    parser.add_argument("--quick", action="store_true", help="a small version (8 images per prompt)")
    parser.add_argument("--per-pair", type=int, help="images per pair and per single shape (default: the full "
                        "protocol's 64 per target pair, 32 per control pair and shape; seen pairs get half)")
    parser.add_argument("--learning-rate", type=float, help="SepEn's learning rate per sample (default "
                        f"{StudySettings().finetune['learning_rate']:g}; tune it on other seeds: benchmarks/toy_lr_sweep.py)")
    parser.add_argument("--conditions", nargs="+", metavar="NAME", help="only these ablation and multi-pair conditions, "
                        "each quoted (base and 'sepen (K)' always run); a rerun into the same folder adds the others")
    args = parser.parse_args(argv)
    settings = StudySettings()
    if args.quick:
        settings = StudySettings(single_per_kind=8, pair_per_prompt=8, control_per_prompt=8, seen_per_prompt=4)
    if args.per_pair:
        n = args.per_pair
        settings = StudySettings(single_per_kind=n, pair_per_prompt=n, control_per_prompt=n, seen_per_prompt=max(1, n // 2))
    if args.learning_rate is not None:
        settings.finetune = {**settings.finetune, "learning_rate": args.learning_rate}
        settings.multi_pair = {**settings.multi_pair, "learning_rate": args.learning_rate}
    ablation = multi = None
    if args.conditions:
        chosen = args.conditions
        known = list(ABLATION) + list(MULTI_PAIR)
        unknown = [c for c in chosen if c not in known]
        if unknown:
            parser.error(f"unknown condition(s) {unknown}; choose from {known}")
        ablation = {c: ABLATION[c] for c in chosen if c in ABLATION}
        multi = [c for c in chosen if c in MULTI_PAIR]
    command = "python -m sae_utils.toyworld.study " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    report = run_study(load_pipeline(args.model, device="cpu"), settings, args.out, ablation=ablation,
                       multi_pair=multi, command=command)
    print(report.read_text())


if __name__ == "__main__":
    main()
