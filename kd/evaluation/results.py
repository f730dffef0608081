"""The evaluation's results: what evaluate computes, feedback adds, and report writes.

Wall times live beside the figures but never reach the reports, so the same models give byte-identical files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kd.config import Judge
from kd.prompts import Prompt
from kd.runtime.novelty import words

TEACHER, BASELINE = "teacher", "baseline"
# A reference this short is an answer to match exactly ("56", "Au", "Merci beaucoup"); longer ones are
# model answers of their own and would only ever score 0.
EXACT_MAX_WORDS = 3
# Metric keys in metrics.json, and whether higher is better (None: neither; lengths are only descriptive).
METRICS: dict[str, bool | None] = {
    "kl": False,
    "teacher_logprob": True,
    "rouge_l": True,
    "exact_match": True,
    "contains_match": True,
    "length": None,
}


@dataclass(frozen=True)
class EvalPrompt:
    id: str
    category: str
    instruction: str
    reference: str

    @property
    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.instruction}]

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
class ModelResult:
    name: str
    kind: str  # teacher | baseline | student
    about: dict[str, Any]  # where it came from: the teacher's identity, the init, or kd_model.json
    outputs: list[Output]
    metrics: dict[str, float | None]
    generate_s: float = 0.0  # wall times: stdout and MLflow only, never the reports
    score_s: float = 0.0
    tokens_generated: int = 0

    @property
    def seconds(self) -> float:
        return self.generate_s + self.score_s


@dataclass
class Run:
    prompts: list[EvalPrompt]
    prompts_path: str
    prompts_sha256: str
    max_new_tokens: int
    teacher: str
    results: list[ModelResult] = field(default_factory=list)
    seconds: float = 0.0
    feedback: Feedback | None = None  # reward model and judge figures, with `evaluation.reward_model` / `judge`


# The metrics.json row of the reward model's own figures (held-out pair accuracy); a student may not take it.
REWARD_ROW = "reward_model"
# Tokens of prompt + answer the reward model reads (as kd.elicit.self_knowledge); a longer answer is left out of
# the mean and counted, never cut (a score of half an answer would judge another text).
REWARD_MAX_LENGTH = 2048
DIGITS = 4  # as the other metrics


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

    @property
    def judged(self) -> int:
        return self.wins + self.ties + self.losses

    @property
    def rate(self) -> float | None:
        return (self.wins + 0.5 * self.ties) / self.judged if self.judged else None

    def metrics(self) -> dict[str, float | int]:
        rate = {} if self.rate is None else {"win_rate": round(self.rate, DIGITS)}
        return {**rate, "wins": self.wins, "ties": self.ties, "losses": self.losses,
                "unparseable": self.unparseable, "inconsistent": self.inconsistent}


@dataclass
class Feedback:
    """Everything the reward model and the judge added to a Run (the figures are also in each row's metrics)."""

    reward_model: RewardModelInfo | None = None
    rewards: dict[str, tuple[float | None, int]] = field(default_factory=dict)  # model -> (mean, answers scored)
    against: str | None = None  # the row name the students were judged against
    judge: Judge | None = None
    template: Prompt | None = None
    win_rates: dict[str, WinRate] = field(default_factory=dict)
    requests: dict[str, tuple[int, int]] = field(default_factory=dict)  # role -> (cached, new): stdout/MLflow only


