"""Judges (survey §3.1.5): score candidate answers by rubric, by pairwise comparison, or by likelihood.

Text judges are parsed strictly: an answer that is not exactly in the declared format is a counted rejection,
never a guess (a guessed rating would put the parser's bias into the preference data). Pairwise comparisons
are asked in both orders, because LLM judges favour a position; a pair whose two verdicts disagree is a tie.

References: Cui et al. 2023, "UltraFeedback: Boosting Language Models with High-quality Feedback" (rubric
aspects); Zheng et al. 2023, "Judging LLM-as-a-Judge with MT-Bench and Chatbot Arena" (position bias, swap);
Lee et al. 2023, "RLAIF" (AI feedback for preference data).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from itertools import permutations
from pathlib import Path
from typing import Any, Literal

from kd.config import Judge
from kd.prompts import Prompt, load_prompt
from kd.runtime.ask import Asker, rejection, request_provenance, verdict
from kd.runtime.scoring import SCORE_DIGITS, choice_call, score_call

RUBRIC_VARIABLES = ("instruction", "response", "aspects", "low", "high", "allow_prose")
PAIRWISE_VARIABLES = ("instruction", "response_a", "response_b", "allow_prose")

_RATING_LINE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\s*:\s*(.*)$")
_INTEGER = re.compile(r"^[+-]?\d+$")
_VERDICT_LINE = re.compile(r"^verdict\s*:\s*(.*)$", re.IGNORECASE)


def parse_rubric(text: str, aspects: list[str] | tuple[str, ...], lo: int, hi: int,
                 allow_prose: bool = False) -> dict[str, int] | None:
    """Ratings from a judge's answer: exactly one line `aspect: N` per aspect, N an integer in [lo, hi].

    Blank lines are ignored. Any other line (markdown bullets or bold, a preamble, a verdict) is prose: it
    makes the answer unparseable unless `allow_prose`, and even then it cannot stand in for a rating line.
    A line labelled with an aspect must hold a bare integer in range; a repeated aspect is ambiguous.

    Returns:
        {aspect: rating} for every aspect, or None when the answer does not follow the format exactly.
    """
    ratings: dict[str, int] = {}
    wanted = set(aspects)
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        m = _RATING_LINE.match(line)
        if m is None or m.group(1) not in wanted:
            if not allow_prose:
                return None
            continue
        name, value = m.group(1), m.group(2).strip()
        if name in ratings or not _INTEGER.match(value) or not lo <= int(value) <= hi:
            return None
        ratings[name] = int(value)
    return ratings if set(ratings) == wanted else None


def parse_verdict(text: str, allow_prose: bool = False) -> Literal["A", "B", "tie"] | None:
    """A pairwise verdict: the whole answer is `A`, `B` or `tie` (with `allow_prose`: the last non-blank line
    is `verdict: A|B|tie` and lines before it are reasoning). Anything else is None."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return None
    if allow_prose:
        m = _VERDICT_LINE.match(lines[-1])
        value = m.group(1).strip() if m else None
    else:
        value = lines[0] if len(lines) == 1 else None
    if value in ("A", "B"):
        return value
    return "tie" if value is not None and value.lower() == "tie" else None


@dataclass(frozen=True)
class Group:
    """Candidates for one prompt: what a text judge reads (the instruction) and what a white-box judge
    scores them after (the conversation prompt)."""

    instruction: str
    prompt: list[dict[str, str]]
    texts: list[str]
    origin: dict[str, str]


@dataclass
class Judged:
    """A judge's result for one group."""

    scores: list[float | None]  # per candidate; None = not scored (its rejection is in `rejected`)
    requests: list[dict[str, Any]] = field(default_factory=list)  # provenance of every judge request, fixed order
    notes: dict[tuple[int, ...], str] = field(default_factory=dict)  # judge text by (candidate,) or (first, second)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    failure: str | None = None  # the group cannot be ranked at all (e.g. an unparseable pairwise verdict)
    inconsistent: int = 0  # pairwise: pairs whose two orders disagreed (recorded as ties)

    def rationale(self, i: int, j: int) -> str:
        """The judge's words on candidates i and j: their ratings, or both orders of their comparison."""
        texts = [self.notes[k] for k in ((i,), (j,), (i, j), (j, i)) if k in self.notes]
        return "\n\n".join(t.strip() for t in texts)


def judge(cfg: Judge, root: Path, asker: Asker, groups: list[Group]) -> tuple[list[Judged], Prompt | None]:
    """Score every group's candidates with the configured judge; returns (results, its template or None)."""
    match cfg.kind:
        case "rubric":
            prompt = load_prompt(root, cfg.template, RUBRIC_VARIABLES)
            return _rubric(cfg, prompt, asker, groups), prompt
        case "pairwise":
            prompt = load_prompt(root, cfg.template, PAIRWISE_VARIABLES)
            return _pairwise(cfg, prompt, asker, groups), prompt
        case "likelihood":
            return score_groups(asker, "loglik", groups, cfg.max_length), None
    raise AssertionError(cfg.kind)


def templates_of(*prompts: Prompt | None) -> dict[str, str]:
    """Path -> sha256 of every template used (and what they include), for the manifest."""
    return {k: v for p in prompts if p is not None for k, v in {p.path: p.sha256, **p.includes}.items()}


def _text_verdict(response: dict[str, Any], unparseable: str) -> str | None:
    """Why a judge's answer is unusable before parsing: cut off, or an error (an empty one is unparseable)."""
    reason = verdict(response, allow_truncated=False)
    if reason is None:
        return None
    return unparseable if reason == "empty" else f"judge_{reason}"


def _rubric(cfg: Judge, prompt: Prompt, asker: Asker, groups: list[Group]) -> list[Judged]:
    calls = [[asker.call(prompt, cfg.sampling, 0, instruction=g.instruction, response=t, aspects=list(cfg.aspects),
                         low=cfg.low, high=cfg.high, allow_prose=cfg.allow_prose) for t in g.texts] for g in groups]
    answers = asker.ask([c for cs in calls for c in cs])
    out = []
    for g, cs in zip(groups, calls, strict=True):
        j = Judged(scores=[])
        for i, call in enumerate(cs):
            response = answers[call.key]
            j.requests.append(request_provenance(call, response))
            reason = _text_verdict(response, "unparseable_rating")
            ratings = None if reason else parse_rubric(response["text"], cfg.aspects, cfg.low, cfg.high,
                                                       cfg.allow_prose)
            if ratings is None:
                j.rejected.append(rejection(reason or "unparseable_rating", call, response, input=g.origin,
                                            candidate=i))
                j.scores.append(None)
                continue
            j.notes[(i,)] = response["text"]
            j.scores.append(round(sum(ratings.values()) / len(ratings), SCORE_DIGITS))
        out.append(j)
    return out


_WINNER = {"A": 0, "B": 1}


OPTIONS = ("A", "B", "tie")  # a logprob verdict is whichever of these answers the judge finds most likely


def _pairwise(cfg: Judge, prompt: Prompt, asker: Asker, groups: list[Group]) -> list[Judged]:
    orders = [list(permutations(range(len(g.texts)), 2)) for g in groups]
    verdicts = (_logprob_verdicts if cfg.verdict == "logprob" else _text_verdicts)(cfg, prompt, asker, groups, orders)
    out = []
    for g, order, vs in zip(groups, orders, verdicts, strict=True):
        n = len(g.texts)
        j = Judged(scores=[None] * n)
        winner: dict[tuple[int, int], int | None] = {}
        for (a, b), (v, note, requests, rejected) in zip(order, vs, strict=True):
            j.requests += requests
            if v is None:
                j.rejected.append(rejected)
                continue
            j.notes[(a, b)] = note
            winner[(a, b)] = None if v == "tie" else (a, b)[_WINNER[v]]
        if len(winner) < len(order):
            # rankings by wins need every comparison; a missing one would favour whoever it left out
            j.failure = "unranked"
            out.append(j)
            continue
        points = [0.0] * n
        for a in range(n):
            for b in range(a + 1, n):
                first, second = winner[(a, b)], winner[(b, a)]
                if first is not None and first == second:
                    points[first] += 1.0
                else:  # a tie both times, or the verdict followed the position: a tie
                    j.inconsistent += first != second
                    points[a] += 0.5
                    points[b] += 0.5
        j.scores = [round(p / (n - 1), SCORE_DIGITS) for p in points]
        out.append(j)
    return out


Verdicts = list[list[tuple[str | None, str, list[dict[str, Any]], dict[str, Any] | None]]]


def _text_verdicts(cfg: Judge, prompt: Prompt, asker: Asker, groups: list[Group], orders: list) -> Verdicts:
    """Per group, per order (a, b): (verdict or None, the judge's words, request provenance, rejection)."""
    calls = [[asker.call(prompt, cfg.sampling, 0, instruction=g.instruction, response_a=g.texts[a],
                         response_b=g.texts[b], allow_prose=cfg.allow_prose) for a, b in order]
             for g, order in zip(groups, orders, strict=True)]
    answers = asker.ask([c for cs in calls for c in cs])
    out = []
    for g, order, cs in zip(groups, orders, calls, strict=True):
        row = []
        for (a, b), call in zip(order, cs, strict=True):
            response = answers[call.key]
            reason = _text_verdict(response, "unparseable_verdict")
            v = None if reason else parse_verdict(response["text"], cfg.allow_prose)
            rejected = None if v else rejection(reason or "unparseable_verdict", call, response, input=g.origin,
                                                order=[a, b])
            row.append((v, response["text"], [request_provenance(call, response)], rejected))
        out.append(row)
    return out


def _logprob_verdicts(cfg: Judge, prompt: Prompt, asker: Asker, groups: list[Group], orders: list) -> Verdicts:
    """White-box verdicts: the judge prompt rendered as for a text verdict, then one `choice` request (cached like
    any answer): the teacher's log-probability of beginning its answer with A, B or tie. The likeliest is the
    verdict (an exact tie between the best two is a tie)."""
    calls = [[choice_call(asker, prompt.render(instruction=g.instruction, response_a=g.texts[a],
                                               response_b=g.texts[b], allow_prose=False), OPTIONS, cfg.max_length)
              for a, b in order] for g, order in zip(groups, orders, strict=True)]
    answers = asker.ask([c for cs in calls for c in cs])
    out = []
    for g, order, cs in zip(groups, orders, calls, strict=True):
        row = []
        for (a, b), call in zip(order, cs, strict=True):
            response = answers[call.key]
            scores = response.get("scores")  # absent in a forecast's placeholder answers
            if response["finish_reason"] != "stop" or not isinstance(scores, list):
                reason = "too_long_to_score" if response["finish_reason"] == "length" else "no_score"
                row.append((None, "", [request_provenance(call, response)],
                            rejection(reason, None, None, input=g.origin, order=[a, b])))
                continue
            ranked = sorted(zip(scores, OPTIONS, strict=True), reverse=True)
            v = "tie" if ranked[0][0] == ranked[1][0] else ranked[0][1]
            note = " ".join(f"{o}: {s:.4f}" for o, s in zip(OPTIONS, scores, strict=True))
            row.append((v, f"log-prob {note}", [request_provenance(call, response)], None))
        out.append(row)
    return out


def score_groups(asker: Asker, kind: str, groups: list[Group], max_length: int) -> list[Judged]:
    """White-box scores (`loglik`: the judge's mean token log-probability; `reward`: a reward model)."""
    calls = [[score_call(asker, kind, g.prompt, t, max_length) for t in g.texts] for g in groups]
    answers = asker.ask([c for cs in calls for c in cs])
    out = []
    for g, cs in zip(groups, calls, strict=True):
        j = Judged(scores=[])
        for i, call in enumerate(cs):
            response = answers[call.key]
            j.requests.append(request_provenance(call, response))
            score = response.get("score")  # absent only in a forecast's placeholder answers
            if response["finish_reason"] != "stop" or not isinstance(score, (int, float)):
                j.rejected.append(rejection("too_long_to_score" if response["finish_reason"] == "length"
                                            else "no_score", call, None, input=g.origin, candidate=i))
                j.scores.append(None)
                continue
            j.scores.append(float(score))
        out.append(j)
    return out
