"""Self-knowledge (survey §3.1.6): the student samples K answers per prompt and keeps the ones a filter
trusts; the kept prompt/completion records train the next round's student.

Filters (a closed choice, `filter:` in params):
- `self_consistency` (LMSI): read each sample's final answer with a normaliser (`last_number`, `last_line`:
  kd.runtime.quality.final_answer), keep the samples that give the majority answer when it has at least
  `min_share` of the K votes. A tie for the most votes keeps nothing (`no_majority`): there is no majority to
  trust.
- `reward_threshold` (ReST grow/improve): score each sample with the teacher's likelihood judge or a reward
  model; keep scores >= `threshold`. Raise the threshold in later rounds for ReST's improve steps.
- `self_judge` (Self-Rewarding): the student rates its own samples with the rubric judge; keep the mean
  rating >= `threshold`.

Each round is a separate dataset (and DVC stage) whose provenance records `round`; round 2's generator is
a teacher entry pointing at the student trained on round 1.

References: Huang et al. 2022, "Large Language Models Can Self-Improve" (LMSI); Gulcehre et al. 2023,
"Reinforced Self-Training (ReST) for Language Modeling"; Yuan et al. 2024, "Self-Rewarding Language Models".
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from kd.config import SelfKnowledge
from kd.elicit.common import load_inputs, provenance
from kd.elicit.feedback import assistant, origin_of, prompt_messages, sample_candidates
from kd.prompts import load_prompt
from kd.runtime import judges
from kd.runtime.ask import Asker, rejection, request_provenance
from kd.runtime.quality import final_answer

VARIABLES = ("instruction", "category")
REWARD_MAX_LENGTH = 2048  # tokens of prompt + sample a reward model scores; longer samples are rejected



def self_knowledge(name: str, cfg: SelfKnowledge, root: Path, data_dir: Path,
                   askers: dict[str, Asker]) -> tuple[list[dict], list[dict], dict]:
    """Return (records, rejected, templates) for the round dataset `name`."""
    prompt = load_prompt(root, cfg.template, VARIABLES)
    inputs = [x for src in cfg.inputs for x in load_inputs(root, src, data_dir)]
    rejected: list[dict[str, Any]] = []
    # identical samples are separate votes, so no deduplication here (write_dataset drops duplicate records)
    sampled = sample_candidates(askers["generator"], cfg, prompt, inputs, cfg.samples, rejected, dedupe=False)
    judge_prompt = None
    kept: list[tuple[Any, list[Any], dict[str, Any]]] = []  # (input, [(call, response, text, fields, requests)])
    match cfg.filter:
        case "self_consistency":
            for x, usable in sampled:
                kept.append((x, _vote(cfg, x, usable, rejected)))
        case "reward_threshold" | "self_judge":
            groups = [judges.Group(x.text, prompt_messages(u[0][0], x.text, cfg.keep_system), [t for _, _, t in u],
                                   x.origin) for x, u in sampled if u]
            if cfg.judge is not None:
                results, judge_prompt = judges.judge(cfg.judge, root, askers["judge"], groups)
            else:
                results = judges.score_groups(askers["judge"], "reward", groups, REWARD_MAX_LENGTH)
            for (x, usable), j in zip([s for s in sampled if s[1]], results, strict=True):
                kept.append((x, _threshold(cfg, x, usable, j, rejected)))

    records = []
    for x, samples in kept:
        for call, response, text, fields, judge_requests in samples:
            prov = provenance("self_knowledge", name, [request_provenance(call, response)] + judge_requests,
                              filters=[{"name": cfg.filter, "passed": True, "detail": fields}], **origin_of(x))
            records.append({
                "prompt": prompt_messages(call, x.text, cfg.keep_system),
                "completion": assistant(text),
                "category": x.category,
                "reference": x.reference,
                **fields,
                "provenance": {**prov, "round": cfg.round},
            })
    return records, rejected, judges.templates_of(prompt, judge_prompt)


def _vote(cfg: SelfKnowledge, x: Any, usable: list, rejected: list[dict[str, Any]]) -> list:
    """The majority-answer samples of one prompt (LMSI), each with its answer and the vote share."""
    answers = [final_answer(text, cfg.answer) for _, _, text in usable]
    votes = Counter(a for a in answers if a is not None)
    top = votes.most_common(2)
    share = top[0][1] / cfg.samples if top else 0.0  # samples that were cut off or gave no answer are not votes
    if not top or (len(top) == 2 and top[0][1] == top[1][1]):
        reason, majority = "no_majority", None
    elif share < cfg.min_share:
        reason, majority = "low_agreement", None
    else:
        reason, majority = "", top[0][0]
    out = []
    for (call, response, text), answer in zip(usable, answers, strict=True):
        why = reason or ("no_final_answer" if answer is None else "" if answer == majority else "minority_answer")
        if why:
            rejected.append(rejection(why, call, response, input=x.origin, answer=answer,
                                      votes=dict(sorted(votes.items()))))
            continue
        out.append((call, response, text, {"answer": answer, "vote_share": round(share, 6)}, []))
    return out


def _threshold(cfg: SelfKnowledge, x: Any, usable: list, j: judges.Judged, rejected: list[dict[str, Any]]) -> list:
    """The samples of one prompt scored at or above the threshold, each with its score and judge requests."""
    rejected.extend(j.rejected)
    out = []
    for i, ((call, response, text), score) in enumerate(zip(usable, j.scores, strict=True)):
        if score is None:
            continue  # its judge rejection is already counted
        if score < cfg.threshold:
            rejected.append(rejection("below_threshold", call, response, input=x.origin, score=score,
                                      threshold=cfg.threshold))
            continue
        out.append((call, response, text, {"score": score}, [j.requests[i]]))  # one judge request each
    return out
