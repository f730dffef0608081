"""Intervals for the evaluation's figures: percentile bootstrap over prompts (and over seeds where a comparison
has several), with a fixed generator, so the same results always give the same interval.

A figure is a ratio of sums over prompts (a token-weighted mean KL is Σ KL / Σ tokens; a rate is Σ hits / Σ
counts), so each prompt contributes a (numerator, denominator) pair and a resample recomputes the ratio.

References: Efron & Tibshirani 1993, "An Introduction to the Bootstrap" (percentile intervals); Dror et al. 2018,
"The Hitchhiker's Guide to Testing Statistical Significance in NLP" (paired bootstrap over test items).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95
SEED = 0

Parts = Sequence[tuple[float, float]]  # per prompt: (numerator, denominator)


def ratio(parts: Parts) -> float | None:
    den = sum(d for _, d in parts)
    return sum(n for n, _ in parts) / den if den else None


def _bounds(stats: np.ndarray) -> tuple[float, float]:
    lo, hi = np.nanpercentile(stats, [100 * (1 - LEVEL) / 2, 100 * (1 + LEVEL) / 2])
    return float(lo), float(hi)


def interval(parts: Parts) -> tuple[float, float] | None:
    """95% percentile-bootstrap interval of `ratio(parts)`, resampling prompts."""
    if not parts:
        return None
    num = np.array([n for n, _ in parts], dtype=np.float64)
    den = np.array([d for _, d in parts], dtype=np.float64)
    idx = np.random.default_rng(SEED).integers(0, len(parts), size=(RESAMPLES, len(parts)))
    d = den[idx].sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        stats = np.where(d > 0, num[idx].sum(1) / d, np.nan)
    return _bounds(stats)


def paired_difference(a: Sequence[Parts], b: Sequence[Parts]) -> tuple[float, tuple[float, float]]:
    """ratio(b) − ratio(a), averaged over seeds, with a 95% interval from resampling seeds and prompts together.

    Args:
        a, b: per seed (one entry per trained model of that side), per prompt (numerator, denominator); every
            entry covers the same prompts in the same order, so prompt i is resampled on both sides at once.
    """
    arrays = [[np.array(p, dtype=np.float64) for p in side] for side in (a, b)]
    n_prompts = len(arrays[0][0])
    rng = np.random.default_rng(SEED)

    def value(side: list[np.ndarray], seeds: np.ndarray, prompts: np.ndarray) -> np.ndarray:
        # mean over the resampled seeds of each seed's ratio over the resampled prompts
        per_seed = [side[s][prompts] for s in seeds]
        return np.mean([p[..., 0].sum(-1) / p[..., 1].sum(-1) for p in per_seed], axis=0)

    point = float(value(arrays[1], np.arange(len(arrays[1])), np.arange(n_prompts)[None])[0]
                  - value(arrays[0], np.arange(len(arrays[0])), np.arange(n_prompts)[None])[0])
    prompts = rng.integers(0, n_prompts, size=(RESAMPLES, n_prompts))
    stats = np.empty(RESAMPLES)
    for r in range(RESAMPLES):
        sa = rng.integers(0, len(arrays[0]), size=len(arrays[0]))
        sb = rng.integers(0, len(arrays[1]), size=len(arrays[1]))
        stats[r] = value(arrays[1], sb, prompts[r][None])[0] - value(arrays[0], sa, prompts[r][None])[0]
    return point, _bounds(stats)
