"""The evaluation's results: per model and per prompt, so that every figure carries a bootstrap interval.

Wall times live beside the figures but never reach the reports, so the same models give byte-identical files.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from kd.config import Judge
from kd.evaluation.stats import interval, ratio
from kd.prompts import Prompt
from kd.runtime.novelty import words

TEACHER, BASELINE, CONTEXT_FREE = "teacher", "baseline", "context_free"
CHEAP = "cheap"  # metrics.json: what the cheap answers score (kd.evaluation.evaluate.cheap_answers), not a model
NOT_ROWS = ("sanity", "compare", CHEAP)  # metrics.json's keys that are not a model's row
ROWS = (TEACHER, BASELINE, CONTEXT_FREE, "reward_model", *NOT_ROWS)  # names a student may not take
# A reference this short is an answer to match exactly ("56", "Au", "Merci beaucoup"); longer ones are
# model answers of their own and would only ever score 0.
EXACT_MAX_WORDS = 3
# A student distils only when at least this share of its answers terminate cleanly (end with the end-of-turn token,
# not empty, no loop). Necessary, never sufficient: "I don't know." every time terminates cleanly.
CLEAN_RATE = 0.9
DIGITS = 4
# The metrics.json row of the reward model's own figures (held-out pair accuracy); a student may not take it.
REWARD_ROW = "reward_model"
# Tokens of prompt + answer the reward model reads (as kd.elicit.self_knowledge); a longer answer is left out of
# the mean and counted, never cut (a score of half an answer would judge another text).
REWARD_MAX_LENGTH = 2048
# A judge or reward model must rank the teacher's answer above each cheap answer of the sanity set on this share of
# prompts: ranking any one of them above (or level with) it on more than 10% flags it, and its figure is no quality
# figure.
SANITY_PASS = 0.9
CONSISTENCY_MIN = 0.75  # below this share of order-consistent verdicts, a pairwise judge's win rate is not shown


@dataclass(frozen=True)
class EvalPrompt:
    id: str
    category: str
    instruction: str
    reference: str
    messages: tuple[dict[str, str], ...]  # as the evaluation asks it: the training template's system message + user

    @property
    def exact_target(self) -> bool:
        return 0 < len(words(self.reference)) <= EXACT_MAX_WORDS


@dataclass(frozen=True)
class Output:
    """One greedy answer: new token ids (with the end-of-turn id when it stopped) and its text."""

    ids: list[int]
    stopped: bool
    text: str

    @property
    def length(self) -> int:
        return len(self.ids) - self.stopped


@dataclass
class Scores:
    """One model's figures on one prompt; None where the figure does not apply."""

    kl: tuple[float, int] | None = None  # (Σ token KL on the teacher's answer, tokens)
    judge: float | None = None  # the teacher's corrected likelihood of this answer (kd.runtime.scoring)
    rouge: float | None = None
    exact: bool | None = None  # only prompts with a short reference
    contains: bool | None = None
    stopped: bool | None = None
    degenerate: str | None = None  # kd.runtime.quality.degeneracy of the answer's tokens
    distinct_2: float | None = None
    longest_run: int | None = None
    length: int | None = None
    reward: float | None = None  # added by kd.evaluation.feedback


@dataclass(frozen=True)
class Metric:
    label: str
    higher: bool | None  # None: descriptive only
    parts: Callable[[Scores], tuple[float, float] | None]  # one prompt's (numerator, denominator)
    fmt: str = "{:.3f}"
    # quality: says how good the answers are (a judge's or reward model's only while it passes its sanity set);
    # form: how an answer ends or repeats itself, which a model that always says "I don't know." passes
    kind: Literal["quality", "form"] = "quality"


def _flag(x: bool | None) -> tuple[float, float] | None:
    return None if x is None else (float(x), 1.0)


def _value(x: float | int | None) -> tuple[float, float] | None:
    return None if x is None else (float(x), 1.0)


METRICS: dict[str, Metric] = {
    "kl": Metric("KL(teacher‖model) ↓", False, lambda s: s.kl),
    "terminates_cleanly": Metric("terminates cleanly ↑", True, lambda s: None if s.stopped is None
                                 else (float(s.stopped and s.degenerate is None), 1.0), kind="form"),
    "eos_rate": Metric("EOS ↑", True, lambda s: _flag(s.stopped), kind="form"),
    "judge": Metric("teacher judge ↑", True, lambda s: _value(s.judge)),
    "rouge_l": Metric("ROUGE-L vs teacher ↑", True, lambda s: _value(s.rouge)),
    "exact_match": Metric("exact ↑", True, lambda s: _flag(s.exact)),
    "contains_match": Metric("contains ↑", True, lambda s: _flag(s.contains)),
    "distinct_2": Metric("distinct-2 ↑", True, lambda s: _value(s.distinct_2), kind="form"),
    "longest_run": Metric("longest run", None, lambda s: _value(s.longest_run), "{:.1f}", kind="form"),
    "length": Metric("length (tokens)", None, lambda s: _value(s.length), "{:.1f}", kind="form"),
    "reward": Metric("mean reward ↑", True, lambda s: _value(s.reward)),
}


@dataclass
class ModelResult:
    name: str
    kind: str  # teacher | context_free | baseline | student | cheap (a fixed answer: the report's floor, not a row)
    about: dict[str, Any]  # where it came from: the teacher's identity, the init, or kd_model.json
    outputs: list[Output] | None  # None: the context-free row generates nothing
    scores: list[Scores]  # one per prompt, in the prompts' order
    generate_s: float = 0.0  # wall times: stdout and MLflow only, never the reports
    score_s: float = 0.0

    @property
    def seconds(self) -> float:
        return self.generate_s + self.score_s

    @property
    def tokens_generated(self) -> int:
        return sum(len(o.ids) for o in self.outputs or [])

    def parts(self, metric: str) -> list[tuple[float, float]]:
        return [p for s in self.scores if (p := METRICS[metric].parts(s)) is not None]

    def value(self, metric: str) -> float | None:
        v = ratio(self.parts(metric))
        return None if v is None else round(v, DIGITS)

    def interval(self, metric: str) -> tuple[float, float] | None:
        ci = interval(self.parts(metric))
        return None if ci is None else (round(ci[0], DIGITS), round(ci[1], DIGITS))

    def metrics(self) -> dict[str, float]:
        """metric -> value, plus `<metric>_lo` / `<metric>_hi` (95% bootstrap over prompts); unknown left out."""
        out: dict[str, float] = {}
        for m in METRICS:
            if (v := self.value(m)) is None:
                continue
            out[m] = v
            if (ci := self.interval(m)) is not None and METRICS[m].higher is not None:
                out[f"{m}_lo"], out[f"{m}_hi"] = ci
        return out


@dataclass(frozen=True)
class RewardModelInfo:
    """A reward model as its stage described it: held-out pair accuracy and how many pairs that is over."""

    name: str
    accuracy: float
    pairs_held_out: int
    accuracy_train: float | None

    def metrics(self) -> dict[str, float]:
        train = {} if self.accuracy_train is None else {"accuracy_train": round(self.accuracy_train, DIGITS)}
        return {"accuracy": round(self.accuracy, DIGITS), "pairs_held_out": self.pairs_held_out, **train}


@dataclass
class WinRate:
    """One student's pairwise record against the `against` model, one entry per prompt."""

    wins: int = 0
    ties: int = 0  # including `inconsistent` and `identical`
    losses: int = 0
    unparseable: int = 0  # not in `judged`: a failed verdict is neither a win nor a loss
    inconsistent: int = 0  # the two orders disagreed (the judge followed the position)
    identical: int = 0  # the same text: a tie, never asked
    per_prompt: list[float | None] = field(default_factory=list)  # 1 win, 0.5 tie, 0 loss, None unusable

    @property
    def judged(self) -> int:
        return self.wins + self.ties + self.losses

    @property
    def asked(self) -> int:
        return self.judged - self.identical

    @property
    def consistency(self) -> float | None:
        """Share of asked pairs whose two orders agreed: a judge that follows the position scores near 0."""
        return (self.asked - self.inconsistent) / self.asked if self.asked else None

    @property
    def rate(self) -> float | None:
        return (self.wins + 0.5 * self.ties) / self.judged if self.judged else None

    def interval(self) -> tuple[float, float] | None:
        return interval([(x, 1.0) for x in self.per_prompt if x is not None])


@dataclass(frozen=True)
class Sanity:
    """How a judge or reward model ranks the teacher's own answers against the sanity set's bad ones."""

    scorer: str  # e.g. "likelihood judge `smollm2`", "reward model `reward`"
    passed: dict[str, tuple[int, int]]  # bad answer (kd.evaluation.feedback.NEGATIVES) -> (prompts ranked right, prompts)
    figure: str | None = None  # the report's figure this scorer gives (`judge`, `reward`, `win_rate`), if any

    @property
    def rate(self) -> float:
        right, total = (sum(x) for x in zip(*self.passed.values(), strict=True)) if self.passed else (0, 0)
        return right / total if total else 0.0

    def rates(self) -> dict[str, float]:
        """Per bad answer, the share of prompts on which the teacher's answer was ranked above it."""
        return {n: right / total if total else 0.0 for n, (right, total) in self.passed.items()}

    @property
    def failing(self) -> list[str]:
        """The bad answers it ranks above (or level with) the teacher's on more than 1 − SANITY_PASS of prompts."""
        return [n for n, r in self.rates().items() if r < SANITY_PASS]

    @property
    def trusted(self) -> bool:
        return bool(self.passed) and not self.failing


@dataclass
class Feedback:
    """What the reward model and the judge added to a Run (the figures are also in each row's scores)."""

    reward_model: RewardModelInfo | None = None
    against: str | None = None  # the row name the students were judged against
    judge: Judge | None = None
    template: Prompt | None = None
    win_rates: dict[str, WinRate] = field(default_factory=dict)
    requests: dict[str, tuple[int, int]] = field(default_factory=dict)  # role -> (cached, new): stdout/MLflow only


@dataclass
class Comparison:
    """`b` against `a` (each one or several students, e.g. seeds): per metric, the difference b − a and its
    95% interval over prompts (and seeds)."""

    a: list[str]
    b: list[str]
    claim: str
    differences: dict[str, tuple[float, tuple[float, float]]]  # metric -> (b − a, (lo, hi))


@dataclass
class Run:
    prompts: list[EvalPrompt]
    prompts_path: str
    prompts_sha256: str
    template: str | None  # how the prompts were asked (the training template), or None for the bare instruction
    max_new_tokens: int
    teacher: str
    results: list[ModelResult] = field(default_factory=list)
    seconds: float = 0.0
    sanity: list[Sanity] = field(default_factory=list)  # every judge and reward model on the sanity set
    feedback: Feedback | None = None  # reward model and judge figures, with `evaluation.reward_model` / `judge`
    comparisons: list[Comparison] = field(default_factory=list)
    environment: dict[str, Any] | None = None  # where it ran (kd.runtime.environment): the figures move with it
    # fixed answers scored like a model's (an echo of the question, a constant): no row beats what they score
    # without beating them, so the report bolds no row at or below them
    cheap: list[ModelResult] = field(default_factory=list)

    def row(self, name: str) -> ModelResult:
        return next(r for r in self.results if r.name == name)

    def untrusted(self) -> set[str]:
        """The figures (`judge`, `reward`, `win_rate`) given by a scorer that failed, or never faced, its sanity
        set: they are not quality figures."""
        checked = {s.figure: s.trusted for s in self.sanity if s.figure is not None}
        return {f for f in ("judge", "reward", "win_rate") if not checked.get(f, False)}
