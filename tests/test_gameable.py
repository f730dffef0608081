"""Issue 20: figures that cheap tricks cannot game. Fake "models" whose answers are constant, an echo of the
question or a refusal go through the report-building code (kd.evaluation.evaluate.scores_of, feedback's sanity
set, report.md) with a gameable fake judge; none of them may come out looking good on a quality figure."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kd.evaluation.evaluate import cheap_answers, exact_match, scores_of
from kd.evaluation.feedback import NEGATIVES, negatives, sanity_groups, sanity_of_scores
from kd.evaluation.outputs import metrics_json
from kd.evaluation.report import report_md
from kd.evaluation.results import METRICS, Comparison, EvalPrompt, ModelResult, Output, Run
from kd.runtime.judges import Judged
from kd.runtime.quality import CONSTANT_ANSWER, REFUSAL, perturbed, text_degeneracy, without_echo

SYSTEM = {"role": "system", "content": "Explain briefly."}
QA = [  # (instruction, reference, the teacher's answer, a decent student's answer)
    ("What is 7 multiplied by 8? Reply with just the number.", "56", "7 multiplied by 8 equals 56.", "56"),
    ("What is 144 divided by 12? Reply with just the number.", "12", "144 divided by 12 is 12.", "It is 12."),
    ("What is the chemical symbol for gold? Reply with just the symbol.", "Au", "The chemical symbol for gold is Au.",
     "Gold is Au."),
    ("Which planet is closest to the Sun? Reply with just the name.", "Mercury",
     "The planet closest to the Sun is Mercury.", "Venus."),
    ("Write a one-sentence apology to a customer whose order arrived late.",
     "We are sorry your order arrived late, and we thank you for your patience.",
     "We are sorry that your order arrived late.", "Sorry your order was late."),
]
PROMPTS = [EvalPrompt(f"p{i}", "math", q, ref, (SYSTEM, {"role": "user", "content": q}))
           for i, (q, ref, _, _) in enumerate(QA)]


def gameable_judge(instruction: str, text: str) -> float:
    """A likelihood-like judge with the biases measured on the 135M teacher: it likes the question's own words
    and short answers (an echo scores above the teacher's answers, a constant above the students')."""
    words = text.lower().replace(".", " ").replace("?", " ").split()
    if not words:
        return -10.0
    asked = set(instruction.lower().replace(".", " ").replace("?", " ").split())
    return -4.0 + 3.0 * sum(w in asked for w in words) / len(words) + (1.5 if len(words) <= 4 else 0.0)


def output(text: str, stopped: bool = True) -> Output:
    return Output(list(range(len(text.split()))) + [999] * stopped, stopped, text)


def model(name: str, kind: str, texts: list[str], teacher: list[Output], stopped: bool = True) -> ModelResult:
    outs = [output(t, stopped) for t in texts]
    judge = [gameable_judge(p.instruction, t) for p, t in zip(PROMPTS, texts, strict=True)]
    degenerate = [text_degeneracy(t) if t else "empty" for t in texts]
    about = {"teacher": "fake", "path": "models/fake", "dtype": "float32", "digest": "0" * 64,
             "student": "student", "init": {"kind": "random"}}
    return ModelResult(name, kind, about, outs, scores_of(PROMPTS, outs, None, judge, degenerate, teacher))


def gamed_run() -> Run:
    teacher = [output(t) for _, _, t, _ in QA]
    run = Run(PROMPTS, "seeds/eval.jsonl", "0" * 64, "prompts/x.jinja", 64, "fake")
    run.results = [model("teacher", "teacher", [t for _, _, t, _ in QA], teacher),
                   model("baseline", "baseline", ["the " * 30] * len(QA), teacher, stopped=False),
                   model("student", "student", [s for *_, s in QA], teacher),
                   model("constant", "student", [CONSTANT_ANSWER] * len(QA), teacher),
                   model("echo", "student", [p.instruction for p in PROMPTS], teacher),
                   model("refusal", "student", [REFUSAL] * len(QA), teacher)]
    run.cheap = cheap_answers(PROMPTS, teacher)
    groups, names = sanity_groups(run)
    judged = [Judged(scores=[gameable_judge(g.instruction, t) for t in g.texts]) for g in groups]
    run.sanity = [sanity_of_scores("likelihood judge `fake`", groups, names, judged, "judge")]
    run.comparisons = [Comparison(["student"], ["echo"], "echoing helps",
                                  {"judge": (0.76, (0.1, 1.4)), "terminates_cleanly": (0.0, (0.0, 0.0))})]
    return run


def _table_rows(section: str) -> dict[str, list[str]]:
    """`model` -> its cells, from the first markdown table of a report section."""
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return {r.split("|")[1].strip(" `"): [c.strip() for c in r.split("|")[2:-1]] for r in rows}


def test_constant_echo_and_refusal_models_fail_every_quality_figure(tmp_path: Path) -> None:
    # issue 20: "I don't know." every time scored 100% answered, an echo of the question topped the judge column
    # and matched "12" in "144 divided by 12"; the report called these quality and bolded them
    run = gamed_run()
    text = report_md(run, tmp_path, [])
    first, rest = text.split("## Results")
    quality, form = rest.split("### Form, not quality")
    form = form.split("## ")[0]
    # the judge prefers the echo and the constant to the teacher: flagged first, and its column is no quality figure
    assert "likelihood judge `fake` FAILS its sanity set" in first and "echo on" in first and "constant on" in first
    assert "teacher judge" not in quality.splitlines()[2] and "teacher judge ↑ — fails its sanity set" in form
    rows = _table_rows(quality)
    header = [c.strip() for c in quality.splitlines()[2].split("|")[2:-1]]
    assert set(header) == {METRICS[m].label + n for m, n in (("kl", ""), ("rouge_l", ""), ("exact_match", " (4)"),
                                                             ("contains_match", " (4)"))}
    for cheat in ("constant", "echo", "refusal"):
        assert not any("**" in c for c in rows[cheat]), (cheat, rows[cheat])  # best in no quality column
        r = run.row(cheat)
        assert r.value("exact_match") == r.value("contains_match") == 0.0
        assert r.value("rouge_l") < run.row("student").value("rouge_l")
        # they still terminate cleanly: that is form, shown apart and never called quality
        assert r.value("terminates_cleanly") == 1.0 and cheat in _table_rows(form)
    assert run.row("teacher").value("exact_match") == 1.0  # the references are matched: exact says something
    assert "answered" not in text.lower() and "✓" not in text
    assert run.row("echo").value("rouge_l") == 0.0  # an echo adds nothing to the question
    # a comparison that the echo "wins" on the judge says which figures are no quality figures
    assert "| teacher judge ↑ (fails its sanity set) | +0.7600 |" in text
    assert "| terminates cleanly ↑ (form, not quality) |" in text
    m = metrics_json(run)
    assert '"terminates_cleanly"' in m and "ok_rate" not in m and '"trusted": 0' in m


def test_a_column_where_every_row_ties_is_not_bolded(tmp_path: Path) -> None:
    # issue 20: exact match was 0/13 for every row and the report bolded 0.000 as best
    run = gamed_run()
    run.results = [r for r in run.results if r.name in ("baseline", "constant", "refusal")]
    quality = report_md(run, tmp_path, []).split("## Results")[1].split("### Form")[0]
    assert "**" not in quality.split("\n\n")[1]


@pytest.mark.parametrize(("bad_prompts", "trusted"), [(2, True), (3, False)])
def test_a_scorer_ranking_a_cheap_answer_first_on_over_10_percent_of_prompts_is_flagged(bad_prompts, trusted):
    # issue 20: the sanity set had empty and looping answers only, and a judge was judged on all pairs pooled
    prompts = [EvalPrompt(f"q{i}", "x", f"Question number {i}?", "", ()) for i in range(20)]
    teacher = [output(f"Answer {i} is {i + 1}.") for i in range(20)]
    run = Run(prompts, "p.jsonl", "0" * 64, None, 8, "fake")
    run.results = [ModelResult("teacher", "teacher", {}, teacher,
                               scores_of(prompts, teacher, None, [0.0] * 20, [None] * 20, teacher))]
    groups, names = sanity_groups(run)
    assert names == list(NEGATIVES) and len(groups) == 20
    refusal = names.index("refusal") + 1
    judged = [Judged(scores=[-1.0] + [(0.0 if k < bad_prompts and c == refusal else -5.0)
                                      for c in range(1, len(names) + 1)]) for k in range(20)]
    s = sanity_of_scores("judge", groups, names, judged, "judge")
    assert s.rate > 0.95 and s.trusted is trusted and s.failing == ([] if trusted else ["refusal"])
    run.sanity = [s]
    assert ("judge" in run.untrusted()) is not trusted


def test_the_sanity_sets_bad_answers_are_made_from_the_evaluations_own_data():
    bad = negatives("What is 7 x 8?", "7 x 8 = 56. Done.", "Paris is the capital.")
    assert bad == {"empty": "", "word_loop": " ".join(["7"] * 24), "sentence_loop": " ".join(["7 x 8 = 56."] * 6),
                   "echo": "What is 7 x 8?", "constant": "The answer is 42.", "wrong_answer": "8 x 9 = 57. Done.",
                   "refusal": "I don't know."}
    assert negatives("Name a city.", "Lyon.", "Paris.")["wrong_answer"] == "Paris."  # no number: another answer
    assert perturbed("1,250 and -3 and 2.5") == "1251 and -2 and 3.5" and perturbed("none") is None


@pytest.mark.parametrize(("answer", "reference", "question", "exact"), [
    # the 135M teacher's own answers under the evaluation's "explain" system message (bf16, 2026-12)
    ("7 multiplied by 8 equals 56.", "56", "What is 7 multiplied by 8? Reply with just the number.", True),
    ("The chemical symbol for gold is Au.", "Au", "What is the chemical symbol for gold? Reply with just the symbol.",
     True),
    ("The planet closest to the Sun is Venus.", "Mercury", "Which planet is closest to the Sun?", False),
    ("Anna has 2 * 2 = 4 sisters.\n\nThe answer is 4.", "1", "How many sisters does Anna have?", False),
    ("The answer is 1. She has 2 brothers, 3 sisters.", "1", "How many sisters does Anna have?", True),
    # an echo of the question states the reference's number without answering it
    ("What is 144 divided by 12? Reply with just the number.", "12",
     "What is 144 divided by 12? Reply with just the number.", False),
    ("144 divided by 12 is 12.", "12", "What is 144 divided by 12? Reply with just the number.", True),
])
def test_exact_match_reads_the_stated_final_answer_not_the_echo(answer, reference, question, exact):
    # issue 20: the teacher's exact match was 0/13: explanations put their answer before other numbers or words
    assert exact_match(answer, reference, question) is exact


def test_without_echo_keeps_what_the_answer_adds():
    q = "What is 144 divided by 12? Reply with just the number."
    assert without_echo(q, q) == "" and without_echo("So 144 divided by 12 is 12.\nDone", q) == "So is 12.\nDone"
    assert re.fullmatch(r"\s*", without_echo("", q))
