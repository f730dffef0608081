"""ROUGE-L novelty filter: exact LCS, and the same decisions as the all-pairs definition."""

from __future__ import annotations

import random

from kd.runtime.novelty import NoveltyIndex, lcs_length, rouge_l, words


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
        added, score, _ = index.admit(text)
        assert added == expected
        if added:
            kept.append(tokens)
    assert 0 < len(kept) < len(texts)
