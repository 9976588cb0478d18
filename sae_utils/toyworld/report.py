"""The toy study's report: a table, image grids and attention maps for the same seeds, a chart, JSON.

    write_report(study, out_dir, title)     # out_dir/report.md, results.json, *.png

Before/after comparisons use the same seeds, so a column of a grid is one seed drawn by both models.
"""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib.pyplot as plt  # headless machines get the Agg backend by themselves
import numpy as np

from ..attention import map_resolution
from ..checkpoint import atomic_write
from .evaluator import objects_present
from .study import Samples, ToyStudy, base_rate, difference, report_table

SETS = {"single": "single-object correct", "seen": "seen pairs: both present", "target": "target pairs: both present",
        "control": "control pairs: both present"}


def _select(samples: Samples, kinds: list[str], count: int) -> list[int]:
    return [i for i, k in enumerate(samples.kinds) if k == kinds][:count]


def comparison_grid(before: Samples, after: Samples, path: Path, labels=("base", "SepEn"), per_pair: int = 6) -> Path:
    """For each pair: a row of images before, a row after, the same seeds; a red frame = an object is missing."""
    pairs = list(dict.fromkeys(tuple(k) for k in after.kinds))
    fig, axes = plt.subplots(2 * len(pairs), per_pair, figsize=(per_pair * 1.1, 2 * len(pairs) * 1.2), squeeze=False)
    for row, pair in enumerate(pairs):
        for offset, (samples, label) in enumerate(zip((before, after), labels)):
            index = _select(samples, list(pair), per_pair)
            present = objects_present(samples.images[index], [list(pair)] * len(index)).all(dim=1) if index else []
            for column in range(per_pair):
                ax = axes[2 * row + offset, column]
                ax.set_xticks([]), ax.set_yticks([])
                if column < len(index):
                    ax.imshow(samples.images[index[column]], interpolation="nearest")
                    colour = "tab:green" if present[column] else "tab:red"
                    for spine in ax.spines.values():
                        spine.set_edgecolor(colour), spine.set_linewidth(2.5)
                if column == 0:
                    ax.set_ylabel(f"{label}\n{' + '.join(pair)}", fontsize=7)
    fig.suptitle("same seeds, before and after (green: both objects found, red: one missing)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def attention_grid(before: Samples, after: Samples, path: Path, labels=("base", "SepEn")) -> Path:
    """For each pair, the first seed: the two objects' maps (the model's map level) as red and blue, before and after."""
    pairs = list(dict.fromkeys(tuple(k) for k in after.kinds))
    fig, axes = plt.subplots(len(pairs), 4, figsize=(4 * 1.4, len(pairs) * 1.4), squeeze=False)
    for row, pair in enumerate(pairs):
        for offset, (samples, label) in enumerate(zip((before, after), labels)):
            i = _select(samples, list(pair), 1)[0]
            maps = samples.word_maps[i].float()  # (2, h, w)
            scale = maps.max().clamp_min(1e-12)
            colour = np.stack([maps[0] / scale, np.zeros_like(maps[0]), maps[1] / scale], axis=-1)
            axes[row, 2 * offset].imshow(samples.images[i], interpolation="nearest")
            axes[row, 2 * offset + 1].imshow(colour.clip(0, 1), interpolation="nearest")
            axes[row, 2 * offset + 1].set_title(f"{label}: peaks {maps[0].max():.2f}/{maps[1].max():.2f}", fontsize=6)
            if offset == 0:
                axes[row, 0].set_ylabel(f"red {pair[0]}\nblue {pair[1]}", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def rates_chart(results: dict, path: Path) -> Path:
    """Each condition's rates with their 95 % intervals."""
    conditions = list(results["conditions"])
    fig, ax = plt.subplots(figsize=(max(7, 1.1 * len(conditions)), 3.6))
    width = 0.8 / len(SETS)
    for k, (key, label) in enumerate(SETS.items()):
        xs, ys, errors = [], [], []
        for c, name in enumerate(conditions):
            entry = results["conditions"][name].get(key, {}).get("all_present")
            if entry:
                xs.append(c + (k - (len(SETS) - 1) / 2) * width), ys.append(entry["rate"])
                errors.append([entry["rate"] - entry["low"], entry["high"] - entry["rate"]])
        if xs:
            ax.bar(xs, ys, width, yerr=np.array(errors).T, capsize=3, label=label)
    ax.set_xticks(range(len(conditions)), conditions, fontsize=8, rotation=25, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("rate (95 % interval)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(study: ToyStudy, out: Path, title: str, notes: str = "", compare: str | None = None) -> Path:
    """report.md + results.json + figures in `out`; `compare` names the condition set against "base"."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = study.results
    resolution = map_resolution(study.pipe)
    compare = compare or [name for name in results["conditions"] if name != "base"][0]
    base, after = results["conditions"]["base"], results["conditions"][compare]
    results["differences"] = {key: difference(base_rate(results, compare, key), after[key]["all_present"])
                              for key in SETS if key in base and key in after}
    atomic_write(out / "results.json", json.dumps(results, indent=1))  # never half a results file
    figures = [rates_chart(results, out / "rates.png")]
    if "target" in study.samples.get("base", {}) and "target" in study.samples.get(compare, {}):
        before, later = study.samples["base"]["target"], study.samples[compare]["target"]
        figures += [comparison_grid(before, later, out / "target_pairs.png", ("base", compare)),
                    attention_grid(before, later, out / "attention.png", ("base", compare))]
    else:  # a resumed study kept both conditions, so the images of its earlier run still show them
        figures += [path for path in (out / "target_pairs.png", out / "attention.png") if path.exists()]
    lines = [f"# {title}", "", notes, "", report_table(results), "",
             "Rates: share of images where the toy world's evaluator finds every named shape; 95 % Wilson "
             f"intervals; n = images. Weaker peak / overlap: the two objects' {resolution}x{resolution} "
             "cross-attention maps "
             "(peak of the weaker one, soft IoU of the peak-normalised maps), averaged over images.", "",
             f"Change with `{compare}` (points, with a conservative interval):", ""]
    lines += [f"- {SETS[key]}: {d['points']:+.1f} [{d['low']:+.1f}, {d['high']:+.1f}]"
              for key, d in results["differences"].items()]
    lines += [""] + [f"![{f.stem}]({f.name})" for f in figures] + [""]
    per_pair = after.get("target", {}).get("per_prompt", {})
    if per_pair:
        lines += ["Both present, per target pair (base -> after):", "", "| pair | base | after |", "|---|---|---|"]
        lines += [f"| {pair} | {base['target']['per_prompt'].get(pair, '')} | {rate} |"
                  for pair, rate in per_pair.items()]
    atomic_write(out / "report.md", "\n".join(lines) + "\n")
    return out / "report.md"

