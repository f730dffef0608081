"""The evaluation's results: per model and per prompt, so that every figure carries a bootstrap interval.

Wall times live beside the figures but never reach the reports, so the same models give byte-identical files.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kd.config import Judge
from kd.evaluation.stats import interval, ratio
from kd.prompts import Prompt
from kd.runtime.novelty import words

TEACHER, BASELINE, CONTEXT_FREE = "teacher", "baseline", "context_free"
ROWS = (TEACHER, BASELINE, CONTEXT_FREE, "reward_model")  # names a student may not take
# A reference this short is an answer to match exactly ("56", "Au", "Merci beaucoup"); longer ones are
# model answers of their own and would only ever score 0.
EXACT_MAX_WORDS = 3
OK_RATE = 0.9  # a student distils when at least this share of its answers end properly and are not degenerate
DIGITS = 4
# The metrics.json row of the reward model's own figures (held-out pair accuracy); a student may not take it.
REWARD_ROW = "reward_model"
# Tokens of prompt + answer the reward model reads (as kd.elicit.self_knowledge); a longer answer is left out of
# the mean and counted, never cut (a score of half an answer would judge another text).
REWARD_MAX_LENGTH = 2048
SANITY_PASS = 0.9  # a judge or reward model must rank the teacher's answer first on this share of sanity pairs
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


def _flag(x: bool | None) -> tuple[float, float] | None:
    return None if x is None else (float(x), 1.0)


def _value(x: float | int | None) -> tuple[float, float] | None:
    return None if x is None else (float(x), 1.0)


METRICS: dict[str, Metric] = {
    "kl": Metric("KL(teacher‖model) ↓", False, lambda s: s.kl),
    "ok_rate": Metric("answered ↑", True,
                      lambda s: None if s.stopped is None else (float(s.stopped and s.degenerate is None), 1.0)),
    "eos_rate": Metric("EOS ↑", True, lambda s: _flag(s.stopped)),
    "judge": Metric("teacher judge ↑", True, lambda s: _value(s.judge)),
    "rouge_l": Metric("ROUGE-L vs teacher ↑", True, lambda s: _value(s.rouge)),
    "exact_match": Metric("exact ↑", True, lambda s: _flag(s.exact)),
    "contains_match": Metric("contains ↑", True, lambda s: _flag(s.contains)),
    "distinct_2": Metric("distinct-2 ↑", True, lambda s: _value(s.distinct_2)),
    "longest_run": Metric("longest run", None, lambda s: _value(s.longest_run), "{:.1f}"),
    "length": Metric("length (tokens)", None, lambda s: _value(s.length), "{:.1f}"),
    "reward": Metric("mean reward ↑", True, lambda s: _value(s.reward)),
}


@dataclass
class ModelResult:
    name: str
    kind: str  # teacher | context_free | baseline | student
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
    """How a judge or reward model ranks the teacher's own answers against degenerate ones."""

    scorer: str  # e.g. "judge (smollm2, likelihood)", "reward model `reward`"
    passed: dict[str, tuple[int, int]]  # degenerate variant -> (pairs ranked right, pairs)

    @property
    def rate(self) -> float:
        right, total = (sum(x) for x in zip(*self.passed.values(), strict=True)) if self.passed else (0, 0)
        return right / total if total else 0.0


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

    def row(self, name: str) -> ModelResult:
        return next(r for r in self.results if r.name == name)
