"""The evaluation's feedback figures: what a reward model and a pairwise judge think of each model's answers.

- Reward: the reward model `models/<evaluation.reward_model>` (a one-label sequence classifier) scores every
  model's answer to every held-out prompt, the prompt + answer read through its chat template as it was
  trained; a model's figure is the mean over its answers. How far to trust those numbers is the reward
  model's own held-out pair accuracy, read from its kd_model.json (chance = 0.5).
- Win rate: the pairwise judge (kd.runtime.judges and its template) compares each student's answer with the
  `against` model's (default: the untrained baseline) on the same prompt, asked in both orders (A/B swapped).
  Two agreeing verdicts are a win or a loss; two ties, or verdicts that follow the position, are a tie; a pair
  with any unusable verdict (unparseable, cut off) is counted apart as unparseable and is not in the rate:
  win rate = (wins + 0.5 ties) / (wins + ties + losses). Identical answers are ties without asking. The share of
  pairs whose two orders agreed is the judge's position consistency; below CONSISTENCY_MIN the report shows
  "judge unreliable" instead of a rate.
- Sanity set: every judge (the evaluation's, and each rubric, pairwise or likelihood judge a dataset uses) and
  every reward model ranks the teacher's own answer to each held-out prompt against bad answers to the same
  prompt, all made from what the evaluation already has (its prompts and the teacher's answers; no teacher
  call but the scorer's own): degenerate ones (empty, one word repeated, one sentence repeated) and the cheap
  tricks that end cleanly and never loop (the question echoed, a constant "The answer is 42.", a confident
  wrong answer, "I don't know."). One that ranks any of them above (or level with) the teacher's answer on
  more than 1 − SANITY_PASS of the prompts fails: the report flags it in its first lines and its figure is
  not a quality figure.

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
from kd.config import Feedback as FeedbackConfig
from kd.config import Judge, Params, SelfKnowledge
from kd.errors import KdError
from kd.evaluation.results import (
    BASELINE,
    REWARD_MAX_LENGTH,
    TEACHER,
    Feedback,
    RewardModelInfo,
    Run,
    Sanity,
    WinRate,
)
from kd.paths import CACHE_DIR, MODELS_DIR
from kd.prompts import Prompt
from kd.runtime import judges
from kd.runtime.ask import Asker
from kd.runtime.judges import Group, Judged, score_groups
from kd.runtime.models import INFO_FILE, read_info
from kd.runtime.quality import CONSTANT_ANSWER, REFUSAL, perturbed
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


def check(params: Params, root: Path) -> RewardModelInfo | None:
    """What can be checked before minutes of generation: `against`, and the reward model on disk (row names are
    checked by the evaluation: `reward_model` is one of its built-in rows)."""
    cfg = params.evaluation
    if cfg.judge is not None and cfg.against is not None and cfg.against not in cfg.students:
        raise KdError(f"evaluation.against: '{cfg.against}' is not in evaluation.students, so it has no answers "
                      f"to compare with; add it there")
    return None if cfg.reward_model is None else reward_model_info(params, root, cfg.reward_model)


# the sanity set's bad answers, in the report's column order
NEGATIVES = ("empty", "word_loop", "sentence_loop", "echo", "constant", "wrong_answer", "refusal")


def negatives(instruction: str, answer: str, other: str) -> dict[str, str]:
    """The sanity set's bad answers to a prompt, made from its teacher answer `answer` (and `other`, the teacher's
    answer to another prompt): what greedy decoding of an undertrained model produces, and the cheap tricks a
    model could learn to game a scorer with. The wrong answer is the teacher's own with every number one higher
    (worded like a right one, so only its content is wrong), else the other prompt's answer."""
    first = answer.split()[0] if answer.split() else "the"
    sentence = answer.replace("\n", " ").split(". ")[0].strip().rstrip(".") + "."
    return {"empty": "", "word_loop": " ".join([first] * 24), "sentence_loop": " ".join([sentence] * 6),
            "echo": instruction, "constant": CONSTANT_ANSWER, "wrong_answer": perturbed(answer) or other,
            "refusal": REFUSAL}


def sanity_groups(run: Run) -> tuple[list[Group], list[str]]:
    """Per held-out prompt whose teacher answer is sound: [teacher's answer, *bad answers]. An answer cut at
    max_new_tokens still counts: it is real text, and the bad answers are still bad. The `other` answer of a
    prompt is the next sound prompt's (the first's, for the last): deterministic, and never its own."""
    teacher = run.row(TEACHER)
    sound = [(p, o.text) for p, o, s in zip(run.prompts, teacher.outputs, teacher.scores, strict=True)
             if s.degenerate is None]
    groups = []
    for k, (p, text) in enumerate(sound):
        other = next((t for _, t in sound[k + 1:] + sound[:k] if t != text), REFUSAL)
        groups.append(Group(p.instruction, list(p.messages), [text, *negatives(p.instruction, text, other).values()],
                            {"file": run.prompts_path, "id": p.id, "sanity": True}))
    return groups, list(NEGATIVES)


def sanity_of_scores(scorer: str, groups: list[Group], names: list[str], judged: list[Judged],
                     figure: str | None = None) -> Sanity:
    """A scoring judge or reward model: the teacher's answer (candidate 0) must score above each bad answer (an
    unscored bad answer counts as ranked below, an unscored teacher answer as ranked below all)."""
    passed = {n: [0, 0] for n in names}
    for j in judged:
        good = j.scores[0]
        for n, bad in zip(names, j.scores[1:], strict=True):
            passed[n][1] += 1
            passed[n][0] += good is not None and (bad is None or good > bad)
    return Sanity(scorer, {n: (a, b) for n, (a, b) in passed.items()}, figure)


def sanity_of_pairwise(scorer: str, cfg: Judge, root: Path, asker: Asker, groups: list[Group],
                       names: list[str], figure: str | None = None) -> Sanity:
    """A pairwise judge: it must prefer the teacher's answer in both orders (a tie or a flip fails)."""
    pairs = [Group(g.instruction, g.prompt, [g.texts[0], bad], g.origin) for g in groups for bad in g.texts[1:]]
    judged, _ = judges.judge(cfg, root, asker, pairs)
    passed = {n: [0, 0] for n in names}
    for k, j in enumerate(judged):
        n = names[k % len(names)]
        passed[n][1] += 1
        passed[n][0] += j.failure is None and j.scores[0] > j.scores[1]
    return Sanity(scorer, {n: (a, b) for n, (a, b) in passed.items()}, figure)


def _judges_to_check(params: Params) -> dict[str, tuple[Judge, str | None]]:
    """Every distinct judge the project uses, with the report figure it gives: the evaluation's first (the judge
    column is the evaluation teacher's likelihood judge; win rates are its pairwise judge's), then each
    dataset's (rubric, pairwise or likelihood), whose scores became training data."""
    ev = params.evaluation
    found: dict[str, tuple[Judge, str | None]] = {
        f"likelihood judge `{ev.teacher}`": (Judge(teacher=ev.teacher, kind="likelihood"), "judge")}
    if ev.judge is not None:
        found[f"pairwise judge `{ev.judge.teacher}`"] = (ev.judge, "win_rate")
    for ds in params.datasets.values():
        judge = ds.judge if isinstance(ds, FeedbackConfig | SelfKnowledge) else None
        if judge is not None:
            found.setdefault(f"{judge.kind} judge `{judge.teacher}`", (judge, None))
    return found


def sanity(run: Run, params: Params, root: Path, cache: RequestCache) -> list[Sanity]:
    """Every judge and the reward model on the sanity set (their answers are cached like any request)."""
    groups, names = sanity_groups(run)
    if not groups:
        return []
    cfg = params.evaluation
    out = []
    for label, (judge, figure) in _judges_to_check(params).items():
        asker = Asker(judge_backend(judge, params, root), cache, f"sanity {label}")
        match judge.kind:
            case "likelihood":
                out.append(sanity_of_scores(label, groups, names,
                                            score_groups(asker, "loglik", groups, judge.max_length), figure))
            case "rubric":
                out.append(sanity_of_scores(label, groups, names, judges.judge(judge, root, asker, groups)[0], figure))
            case "pairwise":
                out.append(sanity_of_pairwise(label, judge, root, asker, groups, names, figure))
    if cfg.reward_model is not None:
        asker = Asker(RewardScorer(root / MODELS_DIR / cfg.reward_model, cfg.batch_size), cache, "sanity reward")
        out.append(sanity_of_scores(f"reward model `{cfg.reward_model}`", groups, names,
                                    score_groups(asker, "reward", groups, REWARD_MAX_LENGTH), "reward"))
    return out


def add_rewards(run: Run, asker: Asker) -> None:
    """Each model's reward for each of its answers (Scores.reward), scored as the reward model was trained."""
    rows = [r for r in run.results if r.outputs is not None]
    groups = [Group(p.instruction, list(p.messages), [r.outputs[i].text for r in rows],
                    {"file": run.prompts_path, "id": p.id}) for i, p in enumerate(run.prompts)]
    for i, j in enumerate(score_groups(asker, "reward", groups, REWARD_MAX_LENGTH)):
        for col, r in enumerate(rows):
            r.scores[i].reward = j.scores[col]


def tally(results: list[Judged | None]) -> WinRate:
    """Count a student's record from the judge's results on its pairs (student first, opponent second);
    None stands for identical answers, a tie never asked."""
    w = WinRate()
    for j in results:
        if j is None:
            w.ties += 1
            w.identical += 1
            w.per_prompt.append(0.5)
        elif j.failure is not None:  # kd.runtime.judges: some order's verdict was unusable
            w.unparseable += 1
            w.per_prompt.append(None)
        elif j.scores[0] > j.scores[1]:
            w.wins += 1
            w.per_prompt.append(1.0)
        elif j.scores[0] < j.scores[1]:
            w.losses += 1
            w.per_prompt.append(0.0)
        else:
            w.ties += 1
            w.inconsistent += j.inconsistent
            w.per_prompt.append(0.5)
    return w


def win_rates(run: Run, cfg: Judge, against: str, root: Path, asker: Asker) -> tuple[dict[str, WinRate], Prompt]:
    """Every student (but `against` itself) judged against the `against` row's answers, prompt by prompt.

    All pairs go to the judge in one request list, so a batched teacher answers them together.
    """
    opponent = run.row(against)
    plan: dict[str, list[int | None]] = {}  # student -> per prompt: index into `groups`, None if identical
    groups: list[Group] = []
    for r in run.results:
        if r.kind != "student" or r.name == against:
            continue
        plan[r.name] = []
        for p, mine, theirs in zip(run.prompts, r.outputs, opponent.outputs, strict=True):
            if mine.text == theirs.text:
                plan[r.name].append(None)
                continue
            plan[r.name].append(len(groups))
            groups.append(Group(p.instruction, list(p.messages), [mine.text, theirs.text],
                                {"file": run.prompts_path, "id": p.id, "model": r.name, "against": against}))
    judged, prompt = judges.judge(cfg, root, asker, groups)
    assert prompt is not None  # a pairwise judge always has its template
    return {name: tally([None if k is None else judged[k] for k in ks]) for name, ks in plan.items()}, prompt


def add_feedback(run: Run, params: Params, root: Path, info: RewardModelInfo | None, log: Any = print) -> None:
    """Score the run's answers with `evaluation.reward_model`, judge them with `evaluation.judge`, and put every
    judge and reward model through the sanity set; the figures go to `run.feedback`, `run.sanity` and each row's
    scores (so metrics.json and MLflow carry them)."""
    cfg = params.evaluation
    cache = RequestCache(root / CACHE_DIR)
    fb = Feedback(reward_model=info)
    if cfg.reward_model is not None:
        asker = Asker(RewardScorer(root / MODELS_DIR / cfg.reward_model, cfg.batch_size), cache, "evaluate reward")
        add_rewards(run, asker)
        fb.requests["reward"] = (asker.cached, asker.new)
    if cfg.judge is not None:
        fb.against, fb.judge = cfg.against or BASELINE, cfg.judge
        asker = Asker(judge_backend(cfg.judge, params, root), cache, "evaluate judge")
        fb.win_rates, fb.template = win_rates(run, cfg.judge, fb.against, root, asker)
        fb.requests["judge"] = (asker.cached, asker.new)
    run.sanity = sanity(run, params, root, cache)
    for role, (cached, new) in fb.requests.items():
        log(f"evaluate: {role}: {cached + new} requests ({cached} cached, {new} new)")
    for s in run.sanity:
        rates = s.rates()
        verdict = "passes" if s.trusted else "FAILS on " + ", ".join(
            f"{kind} ({rates[kind]:.0%} of prompts rank the teacher's answer first)" for kind in s.failing)
        log(f"evaluate: sanity set: {s.scorer} {verdict}; {s.rate:.0%} of all pairs")
    run.feedback = fb
