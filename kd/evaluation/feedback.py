"""The evaluation's feedback figures: what a reward model and a pairwise judge think of each model's answers.

- Reward: the reward model `models/<evaluation.reward_model>` (a one-label sequence classifier) scores every
  model's answer to every held-out prompt, the prompt + answer read through its chat template as it was
  trained; a model's figure is the mean over its answers. How far to trust those numbers is the reward
  model's own held-out pair accuracy, read from its kd_model.json (chance = 0.5).
- Win rate: the pairwise judge (kd.runtime.judges and its template) compares each student's answer with the
  `against` model's (default: the untrained baseline) on the same prompt, asked in both orders (A/B swapped).
  Two agreeing verdicts are a win or a loss; two ties, or verdicts that follow the position, are a tie; a pair
  with any unusable verdict (unparseable, cut off) is counted apart as unparseable and is not in the rate:
  win rate = (wins + 0.5 ties) / (wins + ties + losses). Identical answers are ties without asking.

Both go through the request cache like kd.elicit (scores are cache entries too, though cheap), so rerunning
the evaluate stage asks the judge and the reward model nothing new.

References: Zheng et al. 2023, "Judging LLM-as-a-Judge with MT-Bench and Chatbot Arena" (pairwise judges,
position swap); Ouyang et al. 2022, "Training language models to follow instructions with human feedback"
(reward models; held-out pair accuracy); Dubois et al. 2023, "AlpacaFarm" (win rate against a reference).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kd.cache.store import RequestCache
from kd.config import Judge, Params
from kd.errors import KdError
from kd.evaluation.results import (
    BASELINE,
    DIGITS,
    REWARD_MAX_LENGTH,
    REWARD_ROW,
    Feedback,
    RewardModelInfo,
    Run,
    WinRate,
)
from kd.paths import CACHE_DIR, MODELS_DIR
from kd.prompts import Prompt
from kd.runtime import judges
from kd.runtime.ask import Asker
from kd.runtime.judges import Group, Judged, score_groups
from kd.runtime.models import INFO_FILE, read_info
from kd.runtime.roles import judge_backend
from kd.runtime.scoring import RewardScorer


def reward_model_info(params: Params, root: Path, name: str) -> RewardModelInfo:
    """The reward model's kd_model.json figures; checked before any generation, so a missing model fails fast.

    Raises:
        KdError: the model is not built, or its kd_model.json lacks the held-out accuracy.
    """
    path = root / MODELS_DIR / name / INFO_FILE
    if not path.is_file():
        raise KdError(f"evaluation.reward_model: models/{name} is not built (no {INFO_FILE}); "
                      f"build it first: `dvc repro {name}`")
    m = read_info(path.parent).metrics
    if not isinstance(m.get("accuracy"), (int, float)) or not isinstance(m.get("pairs_held_out"), int):
        raise KdError(f"evaluation.reward_model: {path} has no metrics.accuracy / metrics.pairs_held_out "
                      f"(rebuild it: `dvc repro {name}`)")
    train = m.get("accuracy_train")
    return RewardModelInfo(name, float(m["accuracy"]), m["pairs_held_out"],
                           float(train) if isinstance(train, (int, float)) else None)


def check(params: Params, root: Path, rows: set[str]) -> RewardModelInfo | None:
    """What can be checked before minutes of generation: row names, `against`, the reward model on disk.

    Args:
        rows: the names the report's rows take (teacher, baseline and the students).
    """
    cfg = params.evaluation
    if cfg.reward_model is not None and REWARD_ROW in rows:
        raise KdError(f"evaluation.students: '{REWARD_ROW}' is the name of the reward model's row of the report; "
                      f"rename the student")
    if cfg.judge is not None and cfg.against is not None and cfg.against not in cfg.students:
        raise KdError(f"evaluation.against: '{cfg.against}' is not in evaluation.students, so it has no answers "
                      f"to compare with; add it there")
    return None if cfg.reward_model is None else reward_model_info(params, root, cfg.reward_model)


def mean_rewards(run: Run, asker: Asker) -> dict[str, tuple[float | None, int]]:
    """Each model's mean reward over its answers (rounded), and how many answers were scored."""
    groups = [Group(p.instruction, p.messages, [r.outputs[i].text for r in run.results],
                    {"file": run.prompts_path, "id": p.id}) for i, p in enumerate(run.prompts)]
    judged = score_groups(asker, "reward", groups, REWARD_MAX_LENGTH)
    out = {}
    for col, r in enumerate(run.results):
        scores = [s for j in judged if (s := j.scores[col]) is not None]
        out[r.name] = (round(sum(scores) / len(scores), DIGITS) if scores else None, len(scores))
    return out


def tally(results: list[Judged | None]) -> WinRate:
    """Count a student's record from the judge's results on its pairs (student first, opponent second);
    None stands for identical answers, a tie never asked."""
    w = WinRate()
    for j in results:
        if j is None:
            w.ties += 1
            w.identical += 1
        elif j.failure is not None:  # kd.runtime.judges: some order's verdict was unusable
            w.unparseable += 1
        elif j.scores[0] > j.scores[1]:
            w.wins += 1
        elif j.scores[0] < j.scores[1]:
            w.losses += 1
        else:
            w.ties += 1
            w.inconsistent += j.inconsistent
    return w


def win_rates(run: Run, cfg: Judge, against: str, root: Path, asker: Asker) -> tuple[dict[str, WinRate], Prompt]:
    """Every student (but `against` itself) judged against the `against` row's answers, prompt by prompt.

    All pairs go to the judge in one request list, so a batched teacher answers them together.
    """
    opponent = next(r for r in run.results if r.name == against)
    plan: dict[str, list[int | None]] = {}  # student -> per prompt: index into `groups`, None if identical
    groups: list[judges.Group] = []
    for r in run.results:
        if r.kind != "student" or r.name == against:
            continue
        plan[r.name] = []
        for p, mine, theirs in zip(run.prompts, r.outputs, opponent.outputs, strict=True):
            if mine.text == theirs.text:
                plan[r.name].append(None)
                continue
            plan[r.name].append(len(groups))
            groups.append(judges.Group(p.instruction, p.messages, [mine.text, theirs.text],
                                       {"file": run.prompts_path, "id": p.id, "model": r.name, "against": against}))
    judged, prompt = judges.judge(cfg, root, asker, groups)
    assert prompt is not None  # a pairwise judge always has its template
    return {name: tally([None if k is None else judged[k] for k in ks]) for name, ks in plan.items()}, prompt


def add_feedback(run: Run, params: Params, root: Path, info: RewardModelInfo | None, log: Any = print) -> None:
    """Score the run's answers with `evaluation.reward_model` and judge them with `evaluation.judge`; the
    figures go to `run.feedback` and into each row's metrics (so metrics.json and MLflow carry them)."""
    cfg = params.evaluation
    cache = RequestCache(root / CACHE_DIR)
    fb = Feedback(reward_model=info)
    if cfg.reward_model is not None:
        asker = Asker(RewardScorer(root / MODELS_DIR / cfg.reward_model, cfg.batch_size), cache, "evaluate reward")
        fb.rewards = mean_rewards(run, asker)
        fb.requests["reward"] = (asker.cached, asker.new)
        for r in run.results:
            r.metrics["reward"] = fb.rewards[r.name][0]
    if cfg.judge is not None:
        fb.against, fb.judge = cfg.against or BASELINE, cfg.judge
        asker = Asker(judge_backend(cfg.judge, params, root), cache, "evaluate judge")
        fb.win_rates, fb.template = win_rates(run, cfg.judge, fb.against, root, asker)
        fb.requests["judge"] = (asker.cached, asker.new)
        for r in run.results:
            if r.name in fb.win_rates:
                r.metrics |= fb.win_rates[r.name].metrics()
    for role, (cached, new) in fb.requests.items():
        log(f"evaluate: {role}: {cached + new} requests ({cached} cached, {new} new)")
    run.feedback = fb
