"""Means with bootstrap confidence intervals, and per-method / per-category tables of them.

    bootstrap_ci([0.31, 0.29, 0.35])                     # (mean, low, high), 95 % percentile bootstrap
    summarise(records, by=["method", "category"], unit="prompt")

Images of one prompt are not independent samples (they share the prompt's difficulty). With `unit="prompt"`
the table first averages each prompt's images, then resamples prompts: wider, honest intervals. With the same
number of images per prompt (64 in the paper), the mean is unchanged.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import pandas as pd

ID_COLUMNS = ("image", "seed", "threshold")  # numeric, but labels or settings: never averaged by default
_CHUNK = 200  # bootstrap resamples drawn at once: bounds memory at _CHUNK * n indices


def wilson_interval(successes: int, n: int, level: float = 0.95) -> tuple[float, float, float]:
    """(rate, low, high): a success rate and its Wilson score interval.

    For rates of yes/no outcomes (both objects present, or not): unlike the normal approximation it stays
    inside [0, 1] and is honest near 0 and 1 and for small n.
    """
    if n <= 0 or not 0 <= successes <= n:
        raise ValueError(f"Need 0 <= successes <= n and n > 0; got {successes} of {n}.")
    if not 0 < level < 1:
        raise ValueError(f"level is a coverage probability in (0, 1), e.g. 0.95; got {level}.")
    from statistics import NormalDist

    z = NormalDist().inv_cdf(0.5 + level / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    low = 0.0 if successes == 0 else float(max(0.0, centre - half))  # exact ends, not round-off
    high = 1.0 if successes == n else float(min(1.0, centre + half))
    return p, low, high


def bootstrap_ci(values: Iterable[float], n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the sample mean and the percentile bootstrap interval of the mean.

    Deterministic for a seed. A constant sample gives (c, c, c) exactly.
    """
    x = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=np.float64)
    if x.ndim != 1 or len(x) == 0:
        raise ValueError(f"Expected a non-empty 1-D list of values; got shape {x.shape}.")
    if not np.isfinite(x).all():
        raise ValueError(f"{int((~np.isfinite(x)).sum())} values are NaN or infinite; drop or fix them first.")
    if not 0 < level < 1:
        raise ValueError(f"level is a coverage probability in (0, 1), e.g. 0.95; got {level}.")
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1; got {n_boot}.")
    mean = float(x.mean())
    if np.ptp(x) == 0:  # every resample has the same mean; skip round-off in summing it
        return float(x[0]), float(x[0]), float(x[0])
    rng = np.random.default_rng(seed)
    means = np.concatenate([x[rng.integers(0, len(x), size=(min(_CHUNK, n_boot - start), len(x)))].mean(axis=1)
                            for start in range(0, n_boot, _CHUNK)])
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return mean, float(low), float(high)


def summarise(records: Sequence[dict] | pd.DataFrame, by: Sequence[str] = ("method",),
              metrics: Sequence[str] | None = None, unit: str | None = None, n_boot: int = 1000, seed: int = 0,
              level: float = 0.95) -> pd.DataFrame:
    """One row per group of `by`: n, and for each metric its mean, `<metric>_low` and `<metric>_high`.

    records: one record per image, e.g. {"method": "sepen", "category": "animals", "prompt": ..., "clip_full":
    0.31, "success": True}. metrics: default, every numeric or bool column not in `by`, `unit` or ID_COLUMNS (a
    bool is averaged into a rate). unit: a column whose groups are averaged first and resampled as wholes.
    """
    frame = pd.DataFrame(records)
    by = [by] if isinstance(by, str) else list(by)
    missing = [c for c in by + ([unit] if unit else []) if c not in frame.columns]
    if frame.empty or missing:
        raise ValueError(f"Columns {missing} are not in the records (columns: {list(frame.columns)})."
                         if missing else "No records to summarise.")
    if metrics is None:
        metrics = [c for c in frame.columns if c not in by and c != unit and c not in ID_COLUMNS
                   and (pd.api.types.is_numeric_dtype(frame[c]) or pd.api.types.is_bool_dtype(frame[c]))]
    gaps = {m: int(frame[m].isna().sum()) for m in metrics if m not in frame or frame[m].isna().any()}
    if gaps:
        raise ValueError(f"Metrics missing from some records {gaps}: summarise the records that have them, or "
                         "name the metrics to summarise with metrics=[...].")
    rows = []
    for key, group in frame.groupby(by, sort=True):
        row = dict(zip(by, key if isinstance(key, tuple) else (key,)), n=len(group))
        if unit is not None:
            row["n_units"] = group[unit].nunique()
        for m in metrics:
            values = group[m].astype(float)
            if unit is not None:
                values = values.groupby(group[unit]).mean()
            row[m], row[f"{m}_low"], row[f"{m}_high"] = bootstrap_ci(values.to_numpy(), n_boot, seed, level)
        rows.append(row)
    return pd.DataFrame(rows)
