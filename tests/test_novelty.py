"""ROUGE-L novelty filter: exact LCS, and the same decisions as the all-pairs definition."""

from __future__ import annotations

import random

import pytest

from kd.runtime.novelty import EXACT_BELOW, NoveltyIndex, lcs_length, rouge_l, words


def lcs_dp(a: list, b: list) -> int:
    row = [0] * (len(b) + 1)
    for x in a:
        prev, row = row, [0]
        for j, y in enumerate(b):
            row.append(prev[j] + 1 if x == y else max(prev[j + 1], row[j]))
    return row[-1]


def test_bit_parallel_lcs_equals_dynamic_programming():
    rng = random.Random(0)
    for _ in range(2000):
        a = [rng.randrange(5) for _ in range(rng.randrange(0, 70))]  # > 64 tokens crosses a machine word
        b = [rng.randrange(5) for _ in range(rng.randrange(0, 70))]
        assert lcs_length(a, b) == lcs_dp(a, b)


def test_rouge_l_known_values():
    a, b = [1, 2, 3, 4], [1, 3, 4, 5, 6]
    assert rouge_l(a, b) == 2 * 3 / 9
    assert rouge_l(a, a) == 1.0 and rouge_l(a, []) == 0.0


def test_index_decisions_match_all_pairs_definition():
    rng = random.Random(1)
    vocab = [f"w{i}" for i in range(40)]
    texts = [" ".join(rng.choice(vocab) for _ in range(rng.randrange(3, 15))) for _ in range(400)]
    texts += [t + " extra" for t in texts[:50]]  # near-duplicates
    index, kept = NoveltyIndex(0.7), []
    for text in texts:
        tokens = words(text)
        expected = all(2 * lcs_dp(tokens, k) / (len(tokens) + len(k)) <= 0.7 for k in kept)
        true_max = max((2 * lcs_dp(tokens, k) / (len(tokens) + len(k)) for k in kept), default=0.0)
        added, closest = index.admit(text)
        assert added == expected
        # the recorded maximum is the measured one, or a bound at least as large: never a bound posing as a measurement
        assert closest.score == pytest.approx(true_max) if closest.exact else closest.score >= true_max - 1e-12
        if added:
            kept.append(tokens)
    assert 0 < len(kept) < len(texts)


# Bug: when the index's bound short-cut every comparison, provenance said "max ROUGE-L 0.000" and audit printed it
# as a measurement, although the closest kept instruction shared most of its words.
def test_novelty_records_a_measurement_or_a_labelled_bound():
    index = NoveltyIndex(0.7)
    index.add("gamma beta alpha delta epsilon zeta")
    closest = index.nearest("alpha beta gamma eta theta iota")  # bound 0.5 <= 0.7: no LCS was needed to admit it
    assert closest.exact and closest.score == pytest.approx(1 / 6) and closest.index == 0
    assert "0.167" in closest.describe(0.7) and "(measured)" in closest.describe(0.7)
    for i in range(EXACT_BELOW + 5):  # more near candidates than kd measures below the threshold
        index.add(f"gamma beta alpha w{i} x{i} y{i}")
    closest = index.nearest("alpha beta gamma eta theta iota")
    assert not closest.exact and closest.score == pytest.approx(0.5)
    assert "upper bound" in closest.describe(0.7) and "not measured" in closest.describe(0.7)
    assert index.nearest("nothing shared here").score == 0.0 and index.nearest("nothing shared here").exact
