"""The results of finished generation runs: per-image scores, summary tables with intervals, bar charts, grids.

    summary = evaluate_run("runs/toy-sd", metrics=["toy"])      # writes scores.csv, summary.csv/.json, figures/
    compare_runs(["runs/toy-sd", "runs/toy-sepen"], "runs/comparison")   # side by side, same seeds in the grids

A run folder is what `sampling.generate` writes (images/ and metadata*.jsonl). Metrics:
- "toy": the toy world's exact evaluator (`sae_utils.toyworld.objects_present`): toy_both_present (every object
  of the prompt found), toy_objects_found (the share found), toy_object1_present, toy_object2_present, ...;
- "clip", "blip", "detection": the transformers metrics of `sae_utils.evaluation.evaluate_images` (CLIP
  scores, BLIP caption similarity, open-vocabulary detection success), models chosen by name;
- attention statistics, when the run captured them: attn_peak_min/max (per object peak), attn_peak_ratio
  (weakest / strongest peak), attn_overlap.
Summaries are per run label x prompt category, plus category "all", with 95 % bootstrap intervals over prompts
(`sae_utils.evaluation.summarise`, unit="prompt": a prompt's images share its difficulty).
"""
from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from .checkpoint import check_writable
from .sampling import prompt_slug, read_metadata

METRIC_GROUPS = ("toy", "clip", "blip", "detection")
# The columns that are summarised, in table order (a column absent from a run is left out).
METRIC_COLUMNS = ("toy_both_present", "toy_objects_found", "success", "objects_found", "blip_similarity",
                  "clip_full", "clip_min_object", "attn_peak_min", "attn_peak_max", "attn_peak_ratio", "attn_overlap")


# ----------------------------------------------------------------------------------------------------------
# Reading a run
# ----------------------------------------------------------------------------------------------------------
def load_run(output_dir: str | os.PathLike) -> list[dict]:
    """The image records of a run, in (prompt, seed) order; every image file must be there."""
    folder = Path(output_dir)
    records = read_metadata(folder)
    if not records:
        raise FileNotFoundError(f"{folder} holds no metadata.jsonl (or metadata-*.jsonl): it is not a finished "
                                "run. Generate first: sae-generate --output-dir " + str(folder) + " ...")
    missing = [r["image"] for r in records if not (folder / r["image"]).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} images listed in {folder}'s metadata are missing (e.g. "
                                f"{missing[0]}); scores without them would be biased. Run the same sae-generate "
                                "command again: it regenerates exactly the missing ones.")
    prompts = list(dict.fromkeys(r["prompt"] for r in records))
    return sorted(records, key=lambda r: (prompts.index(r["prompt"]), r["seed"]))


def check_evaluation_settings(n_boot: int = 1000, threshold: float | None = None, toy_threshold: float = 0.5,
                              batch_size: int = 16) -> None:
    """Raise ValueError naming a setting that cannot give a meaningful score (NaN thresholds, no resamples)."""
    if type(n_boot) is not int or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer (bootstrap resamples), got {n_boot!r}.")
    if type(batch_size) is not int or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    for name, value in (("threshold", threshold), ("toy_threshold", toy_threshold)):
        if value is not None and not (isinstance(value, (int, float)) and 0 <= value <= 1):
            raise ValueError(f"{name} must be a number in [0, 1] (a confidence), got {value!r}.")


def parse_metrics(metrics: str | Sequence[str]) -> list[str]:
    """'toy' or 'clip,blip,detection' (or a list) -> checked list; 'none' (or []) -> [], attention only."""
    names = [m.strip() for m in (metrics.split(",") if isinstance(metrics, str) else metrics) if m.strip()]
    if names == ["none"]:
        return []
    unknown = [m for m in names if m not in METRIC_GROUPS]
    if unknown:
        raise ValueError(f"Unknown metrics {unknown or names}; choose from {list(METRIC_GROUPS)}, e.g. 'toy' or "
                         "'clip,blip,detection'.")
    return names


# ----------------------------------------------------------------------------------------------------------
# Scores, one row per image
# ----------------------------------------------------------------------------------------------------------
def score_run(output_dir: str | os.PathLike, metrics: str | Sequence[str] = ("toy",), models=None,
              clip: str | None = None, blip: str | None = None, detector: str | None = None,
              threshold: float | None = None, toy_threshold: float = 0.5, device: str = "auto",
              batch_size: int = 16) -> pd.DataFrame:
    """One row per image: its ids (label, method, category, prompt, words, seed, image) and its metrics.

    models: loaded `MetricModels` (else loaded here from the names clip/blip/detector, defaults of
    sae_utils.evaluation.loading; a model whose weights are not here raises MetricModelNotAvailable at once).
    threshold: the detector's confidence threshold (default that module's). toy_threshold: the toy evaluator's.
    """
    folder = Path(output_dir)
    metrics = parse_metrics(metrics)
    records = load_run(folder)
    rows = [{"label": r.get("label", r["method"]), "method": r["method"], "category": r.get("category", "custom"),
             "prompt": r["prompt"], "words": "|".join(r["words"]), "seed": r["seed"], "image": r["image"]}
            for r in records]
    if "toy" in metrics:
        _add_toy_scores(folder, records, rows, toy_threshold)
    if any(m in metrics for m in ("clip", "blip", "detection")):
        _add_transformers_scores(folder, records, rows, metrics, models, clip, blip, detector, threshold, device,
                                 batch_size)
    for record, row in zip(records, rows):
        attention = record.get("attention")
        if attention:
            row.update(attn_peak_min=min(attention["peak"]), attn_peak_max=max(attention["peak"]),
                       attn_peak_ratio=attention["peak_ratio"], attn_overlap=attention["overlap"])
    return pd.DataFrame(rows)


def _add_toy_scores(folder: Path, records: list[dict], rows: list[dict], threshold: float) -> None:
    from PIL import Image

    from .toyworld import KINDS, objects_present

    strangers = sorted({w for r in records for w in r["words"] if w not in KINDS})
    if strangers:
        raise ValueError(f"The toy metric scores toy-world prompts only; {strangers[:5]} are not shapes of the toy "
                         f"world ({', '.join(KINDS)}). Use --metrics clip,blip,detection for other prompts.")
    sizes = {len(r["words"]) for r in records}
    for k in sorted(sizes):
        index = [i for i, r in enumerate(records) if len(r["words"]) == k]
        for start in range(0, len(index), 512):
            chunk = index[start:start + 512]
            images = []
            for i in chunk:
                with Image.open(folder / records[i]["image"]) as image:
                    images.append(image.convert("RGB"))
            present = objects_present(images, [records[i]["words"] for i in chunk], threshold=threshold)
            for i, found in zip(chunk, present.tolist()):
                rows[i].update(toy_both_present=all(found), toy_objects_found=float(np.mean(found)),
                               **{f"toy_object{j + 1}_present": bool(f) for j, f in enumerate(found)})


def _add_transformers_scores(folder, records, rows, metrics, models, clip, blip, detector, threshold, device,
                             batch_size) -> None:
    from .evaluation import evaluate_images, load_metric_models
    from .evaluation.loading import DEFAULT_BLIP, DEFAULT_CLIP, DEFAULT_DETECTOR

    if models is None:
        wants_clip = "clip" in metrics or "blip" in metrics  # BLIP's score compares captions in CLIP space
        models = load_metric_models(clip=(clip or DEFAULT_CLIP) if wants_clip else None,
                                    blip=(blip or DEFAULT_BLIP) if "blip" in metrics else None,
                                    detector=(detector or DEFAULT_DETECTOR) if "detection" in metrics else None,
                                    device=device)
    extra = {} if threshold is None else {"threshold": threshold}
    by_prompt: dict[str, list[int]] = {}
    for i, record in enumerate(records):
        by_prompt.setdefault(record["prompt"], []).append(i)
    for prompt, index in by_prompt.items():
        scored = evaluate_images([folder / records[i]["image"] for i in index], prompt, records[index[0]]["words"],
                                 models, batch_size=batch_size, **extra)
        for i, score in zip(index, scored):
            rows[i].update({k: v for k, v in score.items() if k not in ("prompt", "image")})


# ----------------------------------------------------------------------------------------------------------
# Summaries
# ----------------------------------------------------------------------------------------------------------
def metric_columns(scores: pd.DataFrame) -> list[str]:
    """The metric columns of a score table, in table order: the known ones, then per-object toy columns."""
    known = [c for c in METRIC_COLUMNS if c in scores.columns]
    per_object = sorted(c for c in scores.columns if c.startswith("toy_object") and c.endswith("_present"))
    return known + per_object


def summarise_scores(scores: pd.DataFrame, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> pd.DataFrame:
    """Per label x category (and category "all"): n, n_units (prompts), and each metric's mean, _low, _high.

    A metric is summarised for a label when all its images have it (a run without captured attention has no
    attention columns; its row leaves them empty).
    """
    from .evaluation import summarise

    if scores.empty:
        raise ValueError("No scores to summarise.")
    tables = []
    for _, group in scores.groupby("label", sort=False):
        metrics = [m for m in metric_columns(group) if group[m].notna().all()]
        if not metrics:
            continue
        overall = group.assign(category="all")
        for frame in (group, overall):
            tables.append(summarise(frame, by=["label", "category"], metrics=metrics, unit="prompt", n_boot=n_boot,
                                    seed=seed, level=level))
    if not tables:
        raise ValueError(f"The scores hold no metric column (columns: {list(scores.columns)}); score with "
                         "metrics='toy' or 'clip,blip,detection' first.")
    return pd.concat(tables, ignore_index=True)


def write_summary(summary: pd.DataFrame, folder: str | os.PathLike, level: float = 0.95) -> None:
    """summary.csv and summary.json (the rows, and how the intervals were made)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    summary.to_csv(folder / "summary.csv", index=False)
    about = {"interval": f"{level:.0%} percentile bootstrap over prompts (images of a prompt averaged first)",
             "rows": json.loads(summary.to_json(orient="records"))}
    (folder / "summary.json").write_text(json.dumps(about, indent=1))


# ----------------------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------------------
def plot_summary(summary: pd.DataFrame, folder: str | os.PathLike, metrics: Sequence[str] | None = None,
                 ) -> list[Path]:
    """One bar chart per metric (figures/bar_{metric}.png): a group of bars per category, a bar per label, the
    interval as error bars."""
    import matplotlib.pyplot as plt  # (no backend switch: a notebook keeps its inline figures)

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    metrics = [m for m in (metrics or metric_columns(summary)) if m in summary.columns]
    labels = list(dict.fromkeys(summary["label"]))
    categories = [c for c in dict.fromkeys(summary["category"]) if c != "all"] + ["all"]
    width = 0.8 / len(labels)
    paths = []
    for metric in metrics:
        fig, ax = plt.subplots(figsize=(max(4.0, 1.3 * len(categories) * max(1, len(labels)) ** 0.5), 3.2),
                               layout="constrained")
        for j, label in enumerate(labels):
            rows = summary[summary["label"] == label].set_index("category").reindex(categories)
            mean = rows[metric].to_numpy(dtype=float)
            error = np.stack([mean - rows[f"{metric}_low"].to_numpy(dtype=float),
                              rows[f"{metric}_high"].to_numpy(dtype=float) - mean])
            ax.bar(np.arange(len(categories)) + (j - (len(labels) - 1) / 2) * width, mean, width, yerr=error,
                   capsize=3, label=label)
        ax.set_xticks(np.arange(len(categories)), categories, rotation=20, ha="right")
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} (95 % intervals over prompts)", fontsize=9)
        ax.legend(fontsize=8)
        path = folder / f"bar_{metric}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def image_grid(cells: Sequence[Sequence[Path]], row_labels: Sequence[str], column_labels: Sequence[str],
               path: str | os.PathLike, title: str = "", size: float = 1.6) -> Path:
    """A grid of image files (rows x columns) with row and column labels, saved as PNG."""
    import matplotlib.pyplot as plt  # (no backend switch: a notebook keeps its inline figures)
    from PIL import Image

    n_rows, n_columns = len(cells), max(len(row) for row in cells)
    fig, axes = plt.subplots(n_rows, n_columns, figsize=(n_columns * size + 1.2, n_rows * size + 0.5),
                             squeeze=False, layout="constrained")
    for r, row in enumerate(cells):
        for c in range(n_columns):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(row):
                with Image.open(row[c]) as image:
                    ax.imshow(np.asarray(image.convert("RGB")), interpolation="nearest")
            if r == 0:
                ax.set_title(column_labels[c], fontsize=8)
            if c == 0:
                ax.set_ylabel(row_labels[r], fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def run_grids(runs: dict[str, tuple[Path, list[dict]]], folder: str | os.PathLike, max_prompts: int = 8,
              max_seeds: int = 8) -> list[Path]:
    """Image grids whose columns are the same seeds in every run.

    One run: figures/grid.png, a row per prompt. Several: figures/grid_{prompt}.png per prompt common to all
    runs, a row per run. runs: label -> (run folder, its records).
    """
    folder = Path(folder)
    images = {label: {(r["prompt"], r["seed"]): run_dir / r["image"] for r in records}
              for label, (run_dir, records) in runs.items()}
    keys = [set(found) for found in images.values()]
    common = set.intersection(*keys)
    first_records = next(iter(runs.values()))[1]
    prompts = [p for p in dict.fromkeys(r["prompt"] for r in first_records)
               if any(key[0] == p for key in common)][:max_prompts]
    if not prompts:
        raise ValueError(f"The runs {list(runs)} share no (prompt, seed) image; grids compare the same seeds.")
    seeds = sorted({seed for prompt, seed in common if prompt in prompts})
    if len(runs) == 1:
        (label, found), = images.items()
        shown = [s for s in seeds if all((p, s) in found for p in prompts)][:max_seeds]
        cells = [[found[(p, s)] for s in shown] for p in prompts]
        return [image_grid(cells, [_short(p) for p in prompts], [f"seed {s}" for s in shown],
                           folder / "grid.png", title=label)]
    paths = []
    for prompt in prompts:
        shown = [s for s in seeds if (prompt, s) in common][:max_seeds]
        cells = [[found[(prompt, s)] for s in shown] for found in images.values()]
        paths.append(image_grid(cells, list(images), [f"seed {s}" for s in shown],
                                folder / f"grid_{prompt_slug(prompt)}.png", title=prompt))
    return paths


def _short(text: str, width: int = 20, lines: int = 3) -> str:
    """A row label: wrapped to `width` characters, at most `lines` lines."""
    wrapped = textwrap.wrap(text, width)
    return "\n".join(wrapped[:lines]) + ("…" if len(wrapped) > lines else "")


# ----------------------------------------------------------------------------------------------------------
# Whole evaluations
# ----------------------------------------------------------------------------------------------------------
def evaluate_run(output_dir: str | os.PathLike, metrics: str | Sequence[str] = ("toy",), n_boot: int = 1000,
                 figures: bool = True, **score_options) -> pd.DataFrame:
    """Score a run and write scores.csv, summary.csv, summary.json and figures/ (bar charts, a grid) into it.
    Returns the summary. score_options: see `score_run`."""
    folder = Path(output_dir)
    check_evaluation_settings(n_boot=n_boot, **{k: score_options[k] for k in ("threshold", "toy_threshold",
                                                                              "batch_size") if k in score_options})
    load_run(folder)  # a folder that is not a finished run is refused before any model is loaded
    check_writable(folder, "the run folder")  # the scores go there: found out now, not after scoring
    scores = score_run(folder, metrics, **score_options)
    scores.to_csv(folder / "scores.csv", index=False)
    summary = summarise_scores(scores, n_boot=n_boot)
    write_summary(summary, folder)
    if figures:
        plot_summary(summary, folder / "figures")
        label = scores["label"].iloc[0]
        run_grids({label: (folder, load_run(folder))}, folder / "figures")
    return summary


def compare_runs(output_dirs: Sequence[str | os.PathLike], compare_dir: str | os.PathLike | None = None,
                 n_boot: int = 1000, figures: bool = True) -> pd.DataFrame:
    """Side by side: the scored runs' summaries in one table, bar charts with a bar per run, and grids of the
    same prompts and seeds across runs, written to `compare_dir` (default: `comparison` next to the first run).

    Each run must have been scored (scores.csv, from `evaluate_run` / sae-evaluate). Runs sharing a label are
    told apart by their folder names.
    """
    folders = [Path(d) for d in output_dirs]
    if len(folders) < 2:
        raise ValueError("compare_runs needs at least two run folders.")
    check_evaluation_settings(n_boot=n_boot)
    tables, runs = [], {}
    for folder in folders:
        if not (folder / "scores.csv").is_file():
            raise FileNotFoundError(f"{folder} has no scores.csv: score it first (sae-evaluate {folder} "
                                    "--metrics ...), or pass every folder to one sae-evaluate call.")
        tables.append(pd.read_csv(folder / "scores.csv"))
    labels = [table["label"].iloc[0] for table in tables]
    if len(set(labels)) < len(labels):
        labels = [f"{folder.name}:{label}" for folder, label in zip(folders, labels)]
    for table, label, folder in zip(tables, labels, folders):
        table["label"] = label
        runs[label] = (folder, load_run(folder))
    scores = pd.concat(tables, ignore_index=True)
    summary = summarise_scores(scores, n_boot=n_boot)
    out = Path(compare_dir) if compare_dir is not None else folders[0].parent / "comparison"
    out.mkdir(parents=True, exist_ok=True)
    scores.to_csv(out / "scores.csv", index=False)
    write_summary(summary, out)
    if figures:
        plot_summary(summary, out / "figures")
        run_grids(runs, out / "figures")
    return summary


def format_summary(summary: pd.DataFrame, digits: int = 3) -> str:
    """The summary as text: a line per label x category, each metric as mean [low, high]."""
    lines = []
    for _, row in summary.iterrows():
        parts = [f"{m} {row[m]:.{digits}f} [{row[f'{m}_low']:.{digits}f}, {row[f'{m}_high']:.{digits}f}]"
                 for m in metric_columns(summary) if pd.notna(row.get(m))]
        units = f", {row['n_units']} prompts" if "n_units" in row else ""
        lines.append(f"{row['label']} | {row['category']} | n={row['n']} images{units} | " + "; ".join(parts))
    return "\n".join(lines)
