"""ROUGE-L novelty filter for generated instructions, fast at 10k+ instructions.

Self-Instruct keeps a new instruction only if its ROUGE-L F1 against every kept instruction is at most a
threshold. Comparing against all n kept ones with a Python LCS is O(n * len^2) per candidate; here an
inverted index gives, with one vectorised pass, an upper bound for every kept instruction
(F1 <= 2 * |bag overlap| / (|a| + |b|)), and the exact LCS (bit-parallel, Hyyrö 2004) runs only where that
bound exceeds the threshold.

References: Wang et al. 2023, "Self-Instruct"; Lin 2004, "ROUGE"; Hyyrö 2004, "Bit-parallel LCS-length
computation revisited".
"""

from __future__ import annotations

import re
from collections import Counter
from typing import NamedTuple

import numpy as np

_WORD = re.compile(r"[a-z0-9]+")
EXACT_BELOW = 32  # kept instructions measured exactly below the threshold, so the recorded maximum is usually exact


class Closest(NamedTuple):
    """The closest kept instruction: ROUGE-L F1 (exact, or an upper bound when `exact` is False) and its index
    (-1 when none shares a word)."""

    score: float
    index: int
    exact: bool

    def describe(self, threshold: float) -> str:
        """For provenance and `kd audit`: a measurement, or the bound that proved novelty, never one for the other."""
        if self.exact:
            return f"max ROUGE-L {self.score:.3f} <= {threshold} (measured)"
        return f"max ROUGE-L <= {self.score:.3f} <= {threshold} (upper bound; not measured)"


def words(text: str) -> list[str]:
    """ROUGE's default tokenisation: lower case, runs of letters and digits."""
    return _WORD.findall(text.lower())


def lcs_length(a: list[int], b: list[int]) -> int:
    """Length of the longest common subsequence, one big-integer step per token of `b`."""
    if not a or not b:
        return 0
    masks: dict[int, int] = {}
    for i, t in enumerate(a):
        masks[t] = masks.get(t, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for t in b:
        u = v & masks.get(t, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - v.bit_count()


def rouge_l(a: list[int], b: list[int]) -> float:
    """ROUGE-L F1 (beta = 1) of two token sequences."""
    return 2.0 * lcs_length(a, b) / (len(a) + len(b)) if a and b else 0.0


class _Postings:
    __slots__ = ("docs", "counts", "size")

    def __init__(self) -> None:
        self.docs = np.empty(8, dtype=np.int32)
        self.counts = np.empty(8, dtype=np.int32)
        self.size = 0

    def append(self, doc: int, count: int) -> None:
        if self.size == len(self.docs):
            self.docs = np.resize(self.docs, 2 * self.size)
            self.counts = np.resize(self.counts, 2 * self.size)
        self.docs[self.size], self.counts[self.size] = doc, count
        self.size += 1


class NoveltyIndex:
    """The instructions kept so far, answering "is this one too close to any of them?"."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self._vocab: dict[str, int] = {}
        self._docs: list[list[int]] = []
        self._lengths = np.empty(64, dtype=np.int32)
        self._postings: dict[int, _Postings] = {}

    def __len__(self) -> int:
        return len(self._docs)

    def _ids(self, text: str) -> list[int]:
        return [self._vocab.setdefault(w, len(self._vocab)) for w in words(text)]

    def nearest(self, text: str) -> Closest:
        """The closest kept instruction: its exact ROUGE-L F1 when kd measured it, else an upper bound.

        Every kept instruction whose bound exceeds the threshold is measured exactly; below the threshold, at most
        EXACT_BELOW more are, best bound first, which usually proves the maximum exact. Otherwise the score is the
        largest bound left unmeasured and `exact` is False: novelty was proved by the bound, not by a measurement.
        """
        ids = self._ids(text)
        n = len(self._docs)
        if not ids or n == 0:
            return Closest(0.0, -1, True)
        overlap = np.zeros(n, dtype=np.int32)
        for t, c in Counter(ids).items():
            p = self._postings.get(t)
            if p is not None:
                overlap[p.docs[: p.size]] += np.minimum(p.counts[: p.size], c)
        bound = 2.0 * overlap / (len(ids) + self._lengths[:n])
        above = np.flatnonzero(bound > self.threshold)
        below = np.flatnonzero((bound <= self.threshold) & (bound > 0))
        if len(below) > EXACT_BELOW:
            below = below[np.argpartition(-bound[below], EXACT_BELOW)[: EXACT_BELOW + 1]]
        best, best_i = 0.0, -1
        for i in above[np.argsort(-bound[above], kind="stable")]:
            if bound[i] <= best:
                break  # every one left has a lower bound than the best measured
            score = rouge_l(ids, self._docs[i])
            if score > best:
                best, best_i = score, int(i)
        if best > self.threshold:
            return Closest(best, best_i, True)
        for k, i in enumerate(below[np.argsort(-bound[below], kind="stable")]):
            if bound[i] <= best:
                break
            if k == EXACT_BELOW:
                return Closest(float(bound[i]), best_i, False)  # the budget is spent: this bound is all we know
            score = rouge_l(ids, self._docs[i])
            if score > best:
                best, best_i = score, int(i)
        return Closest(best, best_i, True)

    def add(self, text: str) -> int:
        ids = self._ids(text)
        doc = len(self._docs)
        self._docs.append(ids)
        if doc == len(self._lengths):
            self._lengths = np.resize(self._lengths, 2 * doc)
        self._lengths[doc] = len(ids)
        for t, c in Counter(ids).items():
            self._postings.setdefault(t, _Postings()).append(doc, c)
        return doc

    def admit(self, text: str) -> tuple[bool, Closest]:
        """Add `text` if it is novel; return (added, the closest kept instruction)."""
        closest = self.nearest(text)
        if closest.score > self.threshold:
            return False, closest
        self.add(text)
        return True, closest
