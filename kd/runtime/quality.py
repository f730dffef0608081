"""Is an answer degenerate? Empty, or stuck repeating itself: what a judge must never reward and no dataset
should keep. Also how a final answer is read out of a longer one, and the cheap tricks (a constant answer, a
refusal, an echo of the question, a confident wrong answer) that no scorer may rank above a real answer.

Works on any sequence of items: token ids (the evaluation) or words and punctuation of a text (elicitation), so
one definition serves both.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

RUN = 6  # the same item this many times in a row ("\n\n\n\n\n\n", "the the the ...") is a loop
MIN_ITEMS = 16  # below this, an answer is too short for its distinct-2 to mean anything
MIN_DISTINCT_2 = 0.4  # fewer distinct bigrams than this share is a phrase on repeat
REPEAT_N = 4  # an item that completes a 4-gram seen earlier in the same answer repeats it

# a run of one punctuation mark is one item: markdown rules ("----", "****") are layout, not a loop
_ITEM = re.compile(r"\w+|([^\w\s])\1*")
_NUMBER = re.compile(r"(?<![\d.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_ANSWER_PREFIX = re.compile(r"^(?:final\s+answer|answer)\s*[:=-]\s*", re.IGNORECASE)
# The cheap answers every judge and reward model must rank below the teacher's (kd.evaluation.feedback's sanity
# set): a model that always gives one of them ends cleanly and never loops, so only a scorer can tell.
CONSTANT_ANSWER = "The answer is 42."
REFUSAL = "I don't know."
ECHO_N = 3  # words copied from the question in runs of this many or more are an echo, not an answer
_ANSWER_IS = re.compile(r"(?:final answer|the answer|answer)\s*(?:is|:|=)\s*\**\s*([^\n.]+)", re.IGNORECASE)


def items(text: str) -> list[str]:
    """Words and punctuation marks of a text (what degeneracy is measured on when there are no token ids)."""
    return [m.group(0) for m in _ITEM.finditer(text)]


def distinct_n(seq: Sequence[Any], n: int = 2) -> float:
    """Share of distinct n-grams among all n-grams (1.0 when there are none)."""
    grams = [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def longest_run(seq: Sequence[Any]) -> int:
    """The longest run of one item repeated back to back."""
    best = run = 0
    for i, x in enumerate(seq):
        run = run + 1 if i and x == seq[i - 1] else 1
        best = max(best, run)
    return best


def repeats(seq: Sequence[Any], n: int = REPEAT_N) -> list[bool]:
    """Per item: does it complete an n-gram that already occurred earlier in the sequence?"""
    seen: set[tuple[Any, ...]] = set()
    out = []
    for i in range(len(seq)):
        gram = tuple(seq[max(0, i - n + 1):i + 1])
        out.append(len(gram) == n and gram in seen)
        if len(gram) == n:
            seen.add(gram)
    return out


def degeneracy(seq: Sequence[Any]) -> str | None:
    """Why an answer is degenerate (`empty`, `repetition`), or None."""
    if not seq:
        return "empty"
    if longest_run(seq) >= RUN or (len(seq) >= MIN_ITEMS and distinct_n(seq, 2) < MIN_DISTINCT_2):
        return "repetition"
    return None


def text_degeneracy(text: str) -> str | None:
    """`degeneracy` of a text's words and punctuation."""
    return degeneracy(items(text))


def final_answer(text: str, how: str = "last_number") -> str | None:
    """The normalised final answer of a text, or None when it has none.

    `last_number` — the last number (thousands commas removed, trailing decimal zeros dropped, a sign kept only
    when not preceded by a digit: "2 - 3 = -1" reads -1, "5-3" reads 3); `last_line` — the last non-blank line,
    lower-cased, whitespace collapsed, a leading "answer:" or "final answer:" and surrounding quotes, asterisks
    and full stops removed; `stated` — what follows "the answer is" / "final answer:" if the text says so,
    else its last line.
    """
    match how:
        case "last_number":
            numbers = _NUMBER.findall(text)
            if not numbers:
                return None
            n = numbers[-1].replace(",", "")
            if "." in n:
                n = n.rstrip("0").rstrip(".")
            return "0" if n in ("-0", "") else n
        case "last_line":
            lines = [line for line in text.splitlines() if line.strip()]
            if not lines:
                return None
            line = " ".join(lines[-1].split()).strip(" *_`")
            line = _ANSWER_PREFIX.sub("", line).strip(" .*_`\"'").lower()
            return line or None
        case "stated":
            found = _ANSWER_IS.findall(text)
            if found:
                return " ".join(found[-1].split()).strip(" .*_`\"'").lower() or None
            return final_answer(text, "last_line")
    raise AssertionError(how)


def _word_key(word: str) -> str:
    return "".join(c for c in word.lower() if c.isalnum())


def without_echo(answer: str, question: str, n: int = ECHO_N) -> str:
    """The answer without the words it copies from the question in runs of `n` or more (compared lower-case,
    punctuation aside), the rest kept as written: an echo of the question is left with nothing, "144 divided by
    12 is 12" (to "What is 144 divided by 12?") with "is 12". What a figure reads so an echo earns nothing."""
    spans = list(re.finditer(r"\S+", answer))
    said = [_word_key(m.group(0)) for m in spans]
    asked = [w for w in map(_word_key, question.split()) if w]
    grams = {tuple(asked[i:i + n]) for i in range(len(asked) - n + 1)}
    copied = [False] * len(said)
    for i in range(len(said) - n + 1):
        if tuple(said[i:i + n]) in grams:
            copied[i:i + n] = [True] * n
    ends = [m.start() for m in spans[1:]] + [len(answer)] if spans else []
    return "".join(answer[m.start():end] for m, end, c in zip(spans, ends, copied, strict=True) if not c).strip()


def perturbed(text: str) -> str | None:
    """The text with every number one higher ("7 x 8 = 56" -> "8 x 9 = 57"): a confident wrong answer made from a
    right one, worded the same; None when the text has no number."""
    out = _NUMBER.sub(lambda m: str(Decimal(m.group(0).replace(",", "")) + 1), text)
    return None if out == text else out
