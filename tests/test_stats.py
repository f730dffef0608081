"""Bootstrap intervals: deterministic, around the point estimate, paired over prompts, pooled over seeds."""

from __future__ import annotations

import random

from kd.evaluation.stats import interval, paired_difference, ratio


def parts(seed: int, n: int = 24, shift: float = 0.0) -> list[tuple[float, float]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        tokens = rng.randint(5, 50)
        out.append((tokens * (2.0 + shift + rng.gauss(0, 0.5)), float(tokens)))
    return out


def test_interval_is_deterministic_and_contains_the_token_weighted_mean():
    p = parts(0)
    lo, hi = interval(p)
    assert interval(p) == (lo, hi)  # fixed generator: the same results give the same report bytes
    assert lo < ratio(p) < hi and hi - lo < 1.0
    assert interval([(3.0, 1.0)] * 10) == (3.0, 3.0)
    assert interval([]) is None


def test_paired_difference_sees_a_small_consistent_gap_that_unpaired_intervals_miss():
    a = parts(1)
    b = [(n - 0.05 * d, d) for n, d in a]  # b is better by 0.05 per token on every prompt
    point, (lo, hi) = paired_difference([a], [b])
    assert abs(point - (ratio(b) - ratio(a))) < 1e-12 and hi < 0
    la, ha = interval(a)
    lb, hb = interval(b)
    assert lb < ha  # the two unpaired intervals overlap: only pairing shows the difference
    same, (lo0, hi0) = paired_difference([a], [a])
    assert same == 0 and lo0 == hi0 == 0


def test_seeds_widen_the_interval():
    a = [parts(10 + s) for s in range(3)]
    b = [parts(20 + s, shift=-0.1) for s in range(3)]
    point, (lo, hi) = paired_difference(a, b)
    _, (lo1, hi1) = paired_difference(a[:1], b[:1])
    assert lo <= point <= hi
    assert hi - lo != hi1 - lo1
