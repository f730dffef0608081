"""What counts as degenerate, how the likelihood judge scores loops, and Evol-Instruct's elimination step."""

from __future__ import annotations

import pytest

from kd.elicit.expansion import failed_evolution
from kd.runtime.quality import (
    degeneracy,
    distinct_n,
    final_answer,
    items,
    longest_run,
    repeats,
    text_degeneracy,
)
from kd.runtime.scoring import REPEAT_FLOOR, judge_score


@pytest.mark.parametrize(("text", "why"), [
    ("", "empty"),
    ("   \n\n  ", "empty"),
    ("the the the the the the the", "repetition"),
    ("I am sure. " * 6, "repetition"),
    ("1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12 and then 13.", None),  # long but never repeating
    ("7 multiplied by 8 equals 56.", None),
    ("Results\n----------------\n**Bold**, then a rule:\n****************", None),  # layout, not a loop
    ("!!!!!! " * 6, "repetition"),
    ("Take a break. Take a walk. Take a nap. Then go back to work and finish the report today.", None),
])
def test_degeneracy_of_texts(text: str, why: str | None) -> None:
    assert text_degeneracy(text) == why


def test_degeneracy_of_token_ids() -> None:
    # what an undertrained student emitted on every held-out prompt: 96 newline tokens
    assert degeneracy([198] * 96) == "repetition"
    assert degeneracy([]) == "empty"
    assert degeneracy(list(range(40))) is None
    assert longest_run([1, 2, 2, 2, 3]) == 3 and distinct_n([1, 2, 1, 2, 1, 2], 2) == 2 / 5


def test_repeats_marks_items_completing_a_4gram_seen_before() -> None:
    seq = [1, 2, 3, 4, 1, 2, 3, 4, 5]
    assert repeats(seq) == [False] * 7 + [True, False]
    assert not any(repeats(items("The cat sat on the mat, and the dog sat on a log.")))


def test_judge_score_floors_loops_and_empty_answers() -> None:
    # regression: the plain mean token log-probability scored blank lines -2.54 and real answers -7.85
    assert judge_score([], []) == REPEAT_FLOOR
    assert judge_score([-1.0, -2.0, -3.0], [5, 6, 7]) == pytest.approx(-2.0)
    loop = [7, 8, 9, 10] * 6
    likely = [-0.1] * len(loop)  # each repetition is very likely once the model is in the loop
    assert judge_score(likely, loop) < -7.0
    answer = list(range(100, 124))
    assert judge_score([-2.5] * len(answer), answer) > judge_score(likely, loop)


@pytest.mark.parametrize(("text", "how", "want"), [
    ("So 7 x 8 = 56.", "last_number", "56"),
    ("The answer is Au.", "stated", "au"),
    ("Final answer: Paris\n", "stated", "paris"),
    ("Let me think.\nParis", "stated", "paris"),
    ("no digits", "last_number", None),
    ("15% of 240 is 0.15 x 240 = 36.", "last_number", "36"),
    ("It costs 1,250 dollars", "last_number", "1250"),
    ("x = -3", "last_number", "-3"),
    ("5-3 gives 2", "last_number", "2"),
    ("so 7-4", "last_number", "4"),  # a minus after a digit is subtraction, not a sign
    ("36.0 exactly", "last_number", "36"),
    ("about 2.50", "last_number", "2.5"),
    ("The items are 1,2,3", "last_number", "3"),
    ("no digits here", "last_number", None),
    ("Reasoning...\n\nFinal answer: Paris.", "last_line", "paris"),
    ("**Answer:** Blue  whale", "last_line", "blue whale"),
    ("line one\n  \n", "last_line", "line one"),
    ("", "last_line", None),
])
def test_final_answer(text: str, how: str, want: str | None) -> None:
    assert final_answer(text, how) == want


@pytest.mark.parametrize(("evolved", "why"), [
    ("Explain why the sky is blue.", "evol_no_change"),
    ("Why is the sky blue? Explain.", "evol_no_change"),  # its words are all the original's
    ("I'm sorry, but I cannot rewrite this prompt.", "evol_refusal"),
    ("#Rewritten Prompt#: Explain why the sky is blue.", "evol_leak"),
    ("I will replace the general concept with a specific one: Explain Rayleigh scattering.", "evol_leak"),
    ("Explain, with the physics of Rayleigh scattering, why the sky is blue at noon but red at sunset.", None),
])
def test_evol_instruct_elimination(evolved: str, why: str | None) -> None:
    assert failed_evolution("Explain why the sky is blue.", evolved) == why
