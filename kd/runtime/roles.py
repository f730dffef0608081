"""Who answers a dataset's requests, by role.

A method with one teacher has one role, `teacher`. Feedback and self-knowledge have a `generator` and a
`judge`; a judge is a teacher generating text (rubric, pairwise, self-judge), the teacher's log-likelihood of
a candidate (`loglik`), or a reward model's score (`reward`). The scorers (kd.runtime.scoring) implement the
teacher protocol and their answers are request-cache entries like any other, so there is one cache, one count
of cached/new, and a rerun scores nothing twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from kd.config import Judge, Params
from kd.runtime.scoring import LoglikScorer, RewardScorer, reward_identity
from kd.runtime.teachers import Teacher, make_teacher, teacher_identity


@dataclass(frozen=True)
class Role:
    """One source of answers for a dataset: a teacher key (or a reward model directory) and how it answers."""

    teacher: str | None
    kind: Literal["generate", "loglik", "reward"]
    path: str | None = None  # reward model directory, relative to the project root
    batch_size: int = 8


def roles(cfg: Any) -> dict[str, Role]:
    """Role name -> Role for a dataset config (`teacher` for the single-teacher methods)."""
    match cfg.method:
        case "feedback":
            return {"generator": Role(cfg.generator, "generate"), "judge": judge_role(cfg.judge)}
        case "self_knowledge":
            out = {"generator": Role(cfg.generator, "generate")}
            if cfg.judge is not None:
                out["judge"] = judge_role(cfg.judge)
            elif cfg.reward_model is not None:
                out["judge"] = Role(None, "reward", cfg.reward_model)
            return out
    return {"teacher": Role(cfg.teacher, "generate")}


def judge_role(judge: Judge) -> Role:
    """How a judge answers: generated text, or white-box log-probabilities (likelihood, logprob verdicts)."""
    if judge.kind == "likelihood" or judge.verdict == "logprob":  # white-box: log-probabilities, not text
        return Role(judge.teacher, "loglik", batch_size=judge.batch_size)
    return Role(judge.teacher, "generate")


def role_identity(role: Role, params: Params, root: Path) -> dict[str, Any]:
    """What the cache key and provenance record about a role, without loading any weights."""
    match role.kind:
        case "generate":
            return teacher_identity(role.teacher, params.teachers[role.teacher], root)
        case "loglik":
            # a local teacher's identity names the dtype it runs in, on which log-probabilities depend
            return teacher_identity(role.teacher, params.teachers[role.teacher], root)
        case "reward":
            return reward_identity(root / role.path)
    raise AssertionError(role.kind)


def judge_backend(judge: Any, params: Params, root: Path) -> Teacher:
    """The backend a judge asks: the teacher generating text, or its log-likelihood scorer (white-box)."""
    return make_backends({"judge": judge_role(judge)}, params, root)["judge"]


def make_backends(rs: dict[str, Role], params: Params, root: Path) -> dict[str, Teacher]:
    """A backend per role; roles on the same teacher share one instance, so its weights load once."""
    teachers: dict[str, Teacher] = {}

    def teacher(key: str) -> Teacher:
        if key not in teachers:
            teachers[key] = make_teacher(key, params.teachers[key], root)
        return teachers[key]

    out: dict[str, Teacher] = {}
    for name, role in rs.items():
        match role.kind:
            case "generate":
                out[name] = teacher(role.teacher)
            case "loglik":
                out[name] = LoglikScorer(teacher(role.teacher), role.batch_size)
            case "reward":
                out[name] = RewardScorer(root / role.path, role.batch_size)
    return out


