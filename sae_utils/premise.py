"""Does a model fail the way Separate-and-Enhance repairs? Four gates, measured on fixed seeds before any training.

    python -m sae_utils.premise --model toy                        # the shipped toy model and its own pairs
    python -m sae_utils.premise --model outputs/toy_model --out outputs/premise
    python -m sae_utils.premise --model CompVis/stable-diffusion-v1-4 --pairs cat,frog --control-pairs cat,dog

SepEn trains only the cross-attention keys, so it can repair a missing object only if the object went missing in
where the words are attended. Check that before training (every threshold is a rate of images):

- G1 competence: the model draws what it is asked when nothing competes: single objects >= 0.90, seen pairs
  (pairs it saw together in training, when known) >= 0.85.
- G2 room to improve: the target pairs fail (both present <= 0.50), the control pairs do not (>= 0.75).
- G3 predictive: in target images that show one object of the two, the missing word had the lower attention mass
  (>= 75 % of them); and the weaker word's peak, or the maps' overlap, tells the images with both objects from the
  rest (AUC >= 0.70).
- G4 causal: +1 on the missing word's attention logits (the model's map level, the first half of the steps), same
  seed: both objects in >= 50 % of those images, one swapped for the other in <= 25 %; the same boost on the word
  that was present (a control) gives both in <= 10 %.

Rates carry Wilson 95 % intervals, AUCs bootstrap ones. A gate passes on its point estimates; the intervals say
how sure that is. On a toy model the pairs come from its toy_model.json and the exact toy evaluator judges; on
any other model give the pairs, and an open-vocabulary detector judges (`sae_utils.evaluation`, OWLv2).
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .attention import boost_tokens, capture_cross_attention, cross_attention_layers, map_resolution
from .evaluation.stats import wilson_interval
from .maps import overlap, peak_activation
from .models import model_info
from .sampling import sampler_defaults
from .tokens import word_token_positions

PREMISE_COMMAND = "python -m sae_utils.premise --model sae_utils/toyworld/model --write"
EVAL_SEED = 100_000  # the toy study's evaluation seeds: finetuning never draws them
THRESHOLDS = {"single": 0.90, "seen": 0.85, "target": 0.50, "control": 0.75, "missing_lower_mass": 0.75,
              "auc": 0.70, "boost_both": 0.50, "boost_swap": 0.25, "control_boost_both": 0.10}
Judge = Callable[[np.ndarray, Sequence[Sequence[str]]], np.ndarray]  # (N,H,W,3) uint8, N word lists -> (N,K) bool


@dataclass
class PremiseSets:
    """What is asked of the model: single words, and pairs seen together in training, targets and controls."""
    single: list[str]
    seen: list[tuple[str, str]]  # may be empty (a real model's training pairs are unknown)
    target: list[tuple[str, str]]  # the pairs SepEn would be trained on: expected to fail
    control: list[tuple[str, str]]  # pairs expected to succeed; may be empty


@dataclass
class PremiseSettings:
    single_per_word: int = 32
    seen_per_pair: int = 12
    pair_per_prompt: int = 32  # target and control pairs
    boost: float = 1.0  # logits added to one word's tokens
    boost_fraction: float = 0.5  # of the sampling steps, from the first
    early_steps: int = 5  # the attention mass is also read over only the first steps
    batch_size: int = 64
    seed: int = EVAL_SEED
    resolution: int | None = None  # None: the model's map resolution
    # "all": also read G3 at every other cross-attention level, to compare (memory: SD's 64x64 maps, kept per
    # step, take about 1 GB per 4 images), "model": only at the model's own level
    levels: str = "all"
    sampling: dict = field(default_factory=dict)  # overrides of the model's sampler defaults


# ---------------------------------------------------------------------------------------------- what is asked
def toy_sets(pipe) -> PremiseSets:
    """A toy model's own words and pairs (its toy_model.json says which pairs it saw together)."""
    from .toyworld.world import KINDS, model_split

    split = model_split(model_info(pipe))
    return PremiseSets(list(KINDS), list(split.seen), list(split.held_out_target), list(split.held_out_control))


def is_toy(pipe) -> bool:
    return bool(model_info(pipe).get("vocabulary"))


def default_prompt(words: Sequence[str]) -> str:
    """'a cat and a frog' (Attend-and-Excite's prompt form), 'an owl'."""
    return " and ".join(f"{'an' if w[0].lower() in 'aeiou' else 'a'} {w}" for w in words)


def prompt_function(pipe) -> Callable[[Sequence[str]], str]:
    if is_toy(pipe):
        from .toyworld.world import prompt_for

        return prompt_for
    return default_prompt


def toy_judge(images: np.ndarray, kinds: Sequence[Sequence[str]]) -> np.ndarray:
    from .toyworld.evaluator import objects_present

    return objects_present(images, [list(k) for k in kinds]).numpy()


def detector_judge(detector: str | None = None, device: str = "auto", threshold: float | None = None) -> Judge:
    """An open-vocabulary detector as the judge (real models); its weights must be available."""
    from .evaluation import DEFAULT_DETECTOR, DEFAULT_THRESHOLD, detect_objects, load_detector

    model, processor = load_detector(detector or DEFAULT_DETECTOR, device)

    def judge(images: np.ndarray, kinds: Sequence[Sequence[str]]) -> np.ndarray:
        present = np.zeros((len(images), len(kinds[0])), bool)
        for words in dict.fromkeys(tuple(k) for k in kinds):
            index = [i for i, k in enumerate(kinds) if tuple(k) == words]
            _, found = detect_objects(images[index], list(words), model, processor,
                                      threshold=DEFAULT_THRESHOLD if threshold is None else threshold)
            present[index] = found.numpy()
        return present

    return judge


# ---------------------------------------------------------------------------------------------- sampling
@dataclass
class Drawn:
    words: list[list[str]]
    seeds: list[int]
    images: np.ndarray  # (N, H, W, 3) uint8
    # resolution -> (N, K, h, w) word maps: mean over all steps, and over the first `early_steps` steps
    maps_by_resolution: dict[int, torch.Tensor] = field(default_factory=dict)
    early_by_resolution: dict[int, torch.Tensor] = field(default_factory=dict)


def draw(pipe, words: Sequence[Sequence[str]], seeds: Sequence[int], settings: PremiseSettings,
         capture: bool = False, boost_word: Sequence[int] | None = None, progress: bool = False) -> Drawn:
    """One image per (words[i], seeds[i]), its own seed, optionally with the words' maps or a boost.

    capture: keep the words' maps at every cross-attention resolution (the premise is read at the model's own, the
    others show why that one). boost_word: for each image, the index (into its words) of the word whose logits get `settings.boost` during
    the first `boost_fraction` of the steps.
    """
    prompt_of = prompt_function(pipe)
    sampling = {**sampler_defaults(pipe), **settings.sampling}
    steps = sampling["num_inference_steps"]
    resolution = settings.resolution or map_resolution(pipe)
    images, maps, early = [], {}, {}
    for start in tqdm(range(0, len(words), settings.batch_size), desc="sampling", disable=not progress, leave=False):
        chunk = [list(w) for w in words[start:start + settings.batch_size]]
        prompts = [prompt_of(w) for w in chunk]
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds[start:start + settings.batch_size]]
        with _intervention(pipe, prompts, chunk, boost_word, start, settings, steps, resolution, capture) as store:
            out = pipe(prompts, generator=generators, output_type="np", **sampling).images
        images.append((out * 255).round().astype(np.uint8))
        if capture:
            latent = pipe.unet.config.sample_size
            for level in sorted({latent // f for f in store.layers.values()}, reverse=True):
                layers = [name for name, f in store.layers.items() if latent // f == level]
                per_step = torch.stack([store.word_maps(prompts, chunk, step=i, layers=layers)
                                        for i in range(store.num_steps)])
                maps.setdefault(level, []).append(per_step.mean(0))
                early.setdefault(level, []).append(per_step[:settings.early_steps].mean(0))
    return Drawn([list(w) for w in words], list(seeds), np.concatenate(images),
                 {r: torch.cat(m) for r, m in maps.items()}, {r: torch.cat(m) for r, m in early.items()})


def _intervention(pipe, prompts, chunk, boost_word, start, settings, steps, resolution, capture):
    import contextlib

    if capture:
        layers = list(cross_attention_layers(pipe.unet)) if settings.levels == "all" else None
        return capture_cross_attention(pipe, resolution=resolution, layers=layers, keep="steps")
    if boost_word is None:
        return contextlib.nullcontext()
    bias = torch.zeros(len(prompts), pipe.tokenizer.model_max_length)
    for b, (prompt, words) in enumerate(zip(prompts, chunk)):
        positions = word_token_positions(pipe.tokenizer, prompt, words)[boost_word[start + b]]
        bias[b, positions] = settings.boost
    return boost_tokens(pipe, bias, steps=range(round(steps * settings.boost_fraction)), resolution=resolution)


# ---------------------------------------------------------------------------------------------- statistics
def rate(successes) -> dict:
    """{"rate", "low", "high", "n"}: a Wilson 95 % interval ({"n": 0} for no images)."""
    successes = np.asarray(successes, dtype=bool)
    if successes.size == 0:
        return {"rate": None, "low": None, "high": None, "n": 0}
    value, low, high = wilson_interval(int(successes.sum()), len(successes))
    return {"rate": round(value, 4), "low": round(low, 4), "high": round(high, 4), "n": int(len(successes))}


def auc(score: np.ndarray, label: np.ndarray) -> float | None:
    """P(score of a positive > score of a negative), ties counted half; None without both classes."""
    pos, neg = score[label], score[~label]
    if len(pos) == 0 or len(neg) == 0:
        return None
    return float((pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean())


def auc_interval(score: np.ndarray, label: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict:
    """{"auc", "low", "high", "n"}: the AUC and its 95 % percentile bootstrap interval over images."""
    value = auc(score, label)
    if value is None:
        return {"auc": None, "low": None, "high": None, "n": int(len(score))}
    rng = np.random.default_rng(seed)
    boots = [a for a in (auc(score[i], label[i]) for i in rng.integers(len(score), size=(n_boot, len(score))))
             if a is not None]
    low, high = np.percentile(boots, [2.5, 97.5])
    return {"auc": round(value, 4), "low": round(float(low), 4), "high": round(float(high), 4), "n": int(len(score))}


# ---------------------------------------------------------------------------------------------- the check
def check_premise(pipe, sets: PremiseSets | None = None, settings: PremiseSettings | None = None,
                  judge: Judge | None = None, progress: bool = True) -> dict:
    """Measure G1-G4 on `pipe`; returns the report (every figure, every gate, how it was measured).

    sets: default the toy model's own (a toy model folder), required for other models. judge: default the toy
    evaluator for toy models; for other models pass `detector_judge()`.
    """
    toy = is_toy(pipe)
    if sets is None:
        if not toy:
            raise ValueError("This model has no toy_model.json: say which pairs to test, e.g. "
                             "PremiseSets(single=['cat', 'frog'], seen=[], target=[('cat', 'frog')], control=[]).")
        sets = toy_sets(pipe)
    if not sets.target:
        raise ValueError("No target pairs: the premise is about the pairs that fail; give at least one.")
    judge = judge or (toy_judge if toy else None)
    if judge is None:
        raise ValueError("No judge for this model's images: pass judge=detector_judge() (an open-vocabulary "
                         "detector; its weights must be available), or your own function.")
    s = settings or PremiseSettings()
    if s.levels not in ("all", "model"):
        raise ValueError(f"levels={s.levels!r}: use 'all' (compare every cross-attention level) or 'model'.")
    report: dict = {"model": str(getattr(pipe, "name_or_path", "") or ""), "settings": asdict(s),
                    "sets": {k: [list(p) if isinstance(p, tuple) else p for p in v] for k, v in asdict(sets).items()},
                    "map_resolution": s.resolution or map_resolution(pipe),
                    "sampling": {**sampler_defaults(pipe), **s.sampling}, "thresholds": THRESHOLDS}

    def asked(pairs, per):
        words = [list(p) for p in pairs for _ in range(per)]
        return words, [s.seed + i for _ in pairs for i in range(per)]

    rates, drawn = {}, {}
    for name, pairs, per in (("single", [(w,) for w in sets.single], s.single_per_word),
                             ("seen", sets.seen, s.seen_per_pair), ("target", sets.target, s.pair_per_prompt),
                             ("control", sets.control, s.pair_per_prompt)):
        if not pairs:
            rates[name] = rate([])
            continue
        d = draw(pipe, *asked(pairs, per), s, capture=name == "target", progress=progress)
        present = judge(d.images, d.words)
        drawn[name] = (d, present)
        rates[name] = {**rate(present.all(1)), "per_prompt": _per_prompt(d.words, present.all(1))}
    report["rates"] = rates

    # G3: does attention predict which object goes missing? (at the model's level; the others for comparison)
    d, present = drawn["target"]
    one = present.sum(1) == 1
    missing = np.where(present[:, 0], 1, 0)  # index of the missing word where exactly one is present
    by_level = {level: attention_statistics(maps, d.early_by_resolution[level], present)
                for level, maps in d.maps_by_resolution.items()}
    level = report["map_resolution"]
    if level not in by_level:
        raise ValueError(f"No cross-attention layer has {level}x{level} maps; this model has {sorted(by_level)}.")
    report["attention"] = {**by_level[level],  # which word goes missing (SD's neglect tends to hit the second)
                           "missing_word": {"first": int((one & (missing == 0)).sum()),
                                            "second": int((one & (missing == 1)).sum())}}
    report["attention_by_resolution"] = {str(k): v for k, v in by_level.items()}
    report["verdicts"] = {name: _verdicts(p) for name, (_, p) in drawn.items()}

    # G4: does raising the missing word's attention bring it back, without losing the other?
    index = np.flatnonzero(one)
    words, seeds = [d.words[i] for i in index], [d.seeds[i] for i in index]
    report["boost"] = {}
    for name, boosted in (("missing_word", missing[index]), ("present_word", 1 - missing[index])):
        if len(index) == 0:
            report["boost"][name] = {}
            continue
        after = judge(draw(pipe, words, seeds, s, boost_word=list(boosted), progress=progress).images, words)
        now_missing = after[np.arange(len(index)), missing[index]]
        now_other = after[np.arange(len(index)), 1 - missing[index]]
        report["boost"][name] = {"both": rate(now_missing & now_other), "swap": rate(now_missing & ~now_other),
                                 "unchanged": rate(~now_missing & now_other), "neither": rate(~now_missing & ~now_other),
                                 "per_prompt": _per_prompt(words, now_missing & now_other)}
        report["verdicts"][f"boost_{name}"] = dict(zip(map(str, index.tolist()), _verdicts(after)))
    report["gates"] = gates(report)
    report["passed"] = all(g["passed"] for g in report["gates"].values())
    return report


def attention_statistics(maps: torch.Tensor, early: torch.Tensor, present: np.ndarray) -> dict:
    """What the two words' maps (N, 2, h, w) say about which images show both objects (present: (N, 2) bool)."""
    both, one = present.all(1), present.sum(1) == 1
    missing = np.where(present[:, 0], 1, 0)
    rows = np.arange(len(present))
    mass, early_mass = maps.flatten(2).sum(-1).numpy(), early.flatten(2).sum(-1).numpy()
    peaks = peak_activation(maps.float()).numpy()
    lower = lambda values: values[rows, missing] < values[rows, 1 - missing]  # noqa: E731
    return {"one_missing": int(one.sum()),
            "missing_lower_mass": rate(lower(mass)[one]),
            "missing_lower_mass_early_steps": rate(lower(early_mass)[one]),
            "missing_lower_peak": rate(lower(peaks)[one]),
            "auc_weaker_peak": auc_interval(peaks.min(1), both),
            "auc_minus_overlap": auc_interval(-overlap(maps.float()).numpy(), both),
            "mean_mass": {"present": float(mass[rows, 1 - missing][one].mean()) if one.any() else None,
                          "missing": float(mass[rows, missing][one].mean()) if one.any() else None}}


def _verdicts(present: np.ndarray) -> list[str]:
    """Each image's verdict as a string of 0/1, one digit per word: small enough to commit, exact to compare."""
    return ["".join(str(int(v)) for v in row) for row in present]


def _per_prompt(words, ok) -> dict:
    groups: dict[str, list[bool]] = {}
    for w, o in zip(words, ok):
        groups.setdefault(" + ".join(w), []).append(bool(o))
    return {k: round(float(np.mean(v)), 3) for k, v in groups.items()}


def gates(report: dict) -> dict:
    """G1-G4: each with its checks (value, interval, threshold, whether met) and whether the gate passed.
    A check that could not be measured (no seen pairs, no one-missing images) is reported and fails its gate,
    except seen pairs, which a real model cannot name (then G1 rests on single objects, and says so)."""
    t, r, a, b = THRESHOLDS, report["rates"], report["attention"], report["boost"]

    def check(value, low, high, threshold, at_least, n=None, note=""):
        met = value is not None and (value >= threshold if at_least else value <= threshold)
        return {"value": value, "low": low, "high": high, "threshold": (">= " if at_least else "<= ") + str(threshold),
                "n": n, "met": bool(met), **({"note": note} if note else {})}

    def rate_check(entry, key, at_least):
        return check(entry.get("rate"), entry.get("low"), entry.get("high"), t[key], at_least, entry.get("n"))

    def auc_check(entry):
        return check(entry["auc"], entry["low"], entry["high"], t["auc"], True, entry["n"])

    seen = rate_check(r["seen"], "seen", True) if r["seen"]["n"] else \
        {**check(None, None, None, t["seen"], True, 0), "met": True, "note": "no seen pairs given: not measured"}
    g1 = {"single objects": rate_check(r["single"], "single", True), "seen pairs": seen}
    g2 = {"target pairs": rate_check(r["target"], "target", False),
          "control pairs": rate_check(r["control"], "control", True)}
    auc_peak, auc_overlap = auc_check(a["auc_weaker_peak"]), auc_check(a["auc_minus_overlap"])
    g3 = {"missing word has the lower attention mass": rate_check(a["missing_lower_mass"], "missing_lower_mass", True),
          "AUC of the weaker peak": auc_peak, "AUC of -overlap": auc_overlap}
    boost, control = b.get("missing_word") or {}, b.get("present_word") or {}
    empty = {"rate": None, "low": None, "high": None, "n": 0}
    g4 = {"boost on the missing word: both present": rate_check(boost.get("both", empty), "boost_both", True),
          "boost on the missing word: swapped": rate_check(boost.get("swap", empty), "boost_swap", False),
          "boost on the present word: both present": rate_check(control.get("both", empty), "control_boost_both", False)}
    result = {}
    for name, checks, rule in (("G1 competence", g1, all), ("G2 room to improve", g2, all)):
        result[name] = {"checks": checks, "passed": rule(c["met"] for c in checks.values())}
    result["G3 predictive"] = {"checks": g3, "passed": g3["missing word has the lower attention mass"]["met"]
                               and (auc_peak["met"] or auc_overlap["met"])}
    result["G4 causal"] = {"checks": g4, "passed": all(c["met"] for c in g4.values())}
    return result


def report_table(report: dict) -> str:
    """The gates as a markdown table."""
    def fmt(v):
        return "n/a" if v is None else f"{v:.3f}"

    lines = [f"Model `{report['model']}`, maps at {report['map_resolution']}x{report['map_resolution']}, sampler "
             f"{report['sampling']}.", "",
             "| gate | check | value [95 % interval] | n | threshold | met |", "|---|---|---|---|---|---|"]
    for gate, entry in report["gates"].items():
        for i, (name, c) in enumerate(entry["checks"].items()):
            label = f"**{gate}: {'pass' if entry['passed'] else 'FAIL'}**" if i == 0 else ""
            interval = f" [{fmt(c['low'])}, {fmt(c['high'])}]" if c["low"] is not None else ""
            note = f" ({c['note']})" if c.get("note") else ""
            lines.append(f"| {label} | {name}{note} | {fmt(c['value'])}{interval} | {c['n']} | {c['threshold']} | "
                         f"{'yes' if c['met'] else 'no'} |")
    a = report["attention"]
    which = (f" (the first word missing in {a['missing_word']['first']}, the second in "
             f"{a['missing_word']['second']})") if "missing_word" in a else ""  # reports before 2026-12-02 lack it
    early = fmt(a['missing_lower_mass_early_steps']['rate'])
    lines += ["", f"One-missing target images: {a['one_missing']}{which}. The missing word had the lower mass in "
              f"the first {report['settings']['early_steps']} steps already: {early}; "
              f"the lower peak: {fmt(a['missing_lower_peak']['rate'])}.",
              f"Premise {'holds' if report['passed'] else 'does not hold'} (all four gates "
              f"{'pass' if report['passed'] else 'must pass'})."]
    return "\n".join(lines)


def main(argv=None) -> None:
    from .checkpoint import atomic_write
    from .models import load_pipeline

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="toy", help="'toy', a model folder, or a hub id")
    parser.add_argument("--pairs", nargs="*", default=None, help="target pairs as a,b (default: a toy model's own)")
    parser.add_argument("--control-pairs", nargs="*", default=[], help="control pairs as a,b")
    parser.add_argument("--seen-pairs", nargs="*", default=[], help="pairs the model saw together, as a,b")
    parser.add_argument("--per-pair", type=int, help="images per pair (default 32; single words 32, seen pairs 12)")
    parser.add_argument("--resolution", type=int, help="map resolution (default: the model's own)")
    parser.add_argument("--detector", help="the judge for a real model (default: sae_utils.evaluation's OWLv2)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--out", help="write premise.json and premise.md here")
    parser.add_argument("--write", action="store_true",
                        help="a toy model folder: store the gates in its toy_model.json (what notebook 01 shows)")
    args = parser.parse_args(argv)
    pipe = load_pipeline(args.model, device=args.device)
    settings = PremiseSettings(resolution=args.resolution)
    if args.per_pair:
        settings.pair_per_prompt = settings.single_per_word = args.per_pair
        settings.seen_per_pair = max(1, args.per_pair * 3 // 8)
    if args.batch_size:
        settings.batch_size = args.batch_size
    elif not is_toy(pipe):
        settings.batch_size = 4
    if not is_toy(pipe):
        settings.levels = "model"  # 64x64 maps per step would not fit a T4
    parse = lambda items: [tuple(p.split(",")) for p in items]  # noqa: E731
    sets, judge = None, None
    if args.pairs is not None or not is_toy(pipe):
        if not args.pairs:
            parser.error("give --pairs (e.g. --pairs cat,frog): this model has no toy_model.json naming its pairs")
        target = parse(args.pairs)
        sets = PremiseSets(sorted({w for p in target + parse(args.control_pairs) for w in p}),
                           parse(args.seen_pairs), target, parse(args.control_pairs))
    if not is_toy(pipe):
        judge = detector_judge(args.detector, args.device)
    report = check_premise(pipe, sets, settings, judge)
    table = report_table(report)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "premise.json", json.dumps(report, indent=1) + "\n")
        atomic_write(out / "premise.md", f"# The premise check\n\n{table}\n")
        print(f"written to {out}")
    if args.write:
        print(f"gates written to {write_premise(pipe.name_or_path, report)}")


def summary(report: dict) -> dict:
    """The gates and the figures behind them, without the per-image verdicts: what a model folder keeps."""
    keep = ("model", "settings", "map_resolution", "sampling", "rates", "attention", "attention_by_resolution", "boost",
            "gates", "passed")
    return {k: report[k] for k in keep if k in report} | {"command": PREMISE_COMMAND}


def write_premise(model_folder, report: dict) -> Path:
    """Store `summary(report)` as the "premise" field of a toy model folder's toy_model.json (atomically)."""
    from .checkpoint import atomic_write

    path = Path(model_folder) / "toy_model.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: --write stores the gates in a toy model folder.")
    info = json.loads(path.read_text())
    info["premise"] = summary(report)
    return atomic_write(path, json.dumps(info, indent=1) + "\n")


if __name__ == "__main__":
    main()
