"""Feedback (survey §3.1.5): a generator samples candidates, a judge ranks them, and the best and worst
distinct candidates become a preference pair in TRL's DPO format.

Each record is `prompt` (the conversation the generator saw), `chosen`, `rejected` (assistant turns),
`score_chosen`, `score_rejected`, `rationale` (the judge's words; "" for the likelihood judge) and
`candidates` (every scored candidate, best first, for RRHF/PRO). Its provenance lists every candidate's
generator request (candidate order), then every judge request (fixed order), the judge's identity and
template, and which candidates were paired. Since candidates and judgments are separate cached requests,
an edit to the judge template re-asks only the judge.

References: Cui et al. 2023, "UltraFeedback"; Tunstall et al. 2023, "Zephyr: Direct Distillation of LM
Alignment" (best vs. a worse candidate as DPO pairs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kd.config import Feedback
from kd.elicit.common import load_inputs, provenance
from kd.prompts import load_prompt
from kd.runtime import judges
from kd.runtime.ask import Asker, Call, rejection, request_provenance, verdict
from kd.runtime.quality import text_degeneracy

VARIABLES = ("instruction", "category")  # the generator's template, as labeling's


def sample_candidates(asker: Asker, cfg: Any, prompt: Any, inputs: list, count: int,
                      rejected: list[dict[str, Any]], dedupe: bool) -> list[tuple[Any, list[tuple[Call, dict, str]]]]:
    """`count` samples per input (sample index = candidate number); unusable ones become rejections.

    Returns:
        per input, its usable (call, response, text) samples in sample order. Empty or repetitive samples are
        rejected (`empty`, `repetition`: kd.runtime.quality); with `dedupe`, a text equal to an earlier
        sample's is a `duplicate_candidate` rejection (it would only pair with itself).
    """
    plan = [(x, [asker.call(prompt, cfg.sampling, s, instruction=x.text, category=x.category) for s in range(count)])
            for x in inputs]
    answers = asker.ask([c for _, cs in plan for c in cs])
    out = []
    for x, calls in plan:
        usable, seen = [], set()
        for call in calls:
            response = answers[call.key]
            reason = verdict(response, cfg.allow_truncated)
            text = response["text"].strip()
            if reason is None and (why := text_degeneracy(text)):
                reason = why  # a degenerate candidate is never judged: a judge's bias for it would become data
            if reason is None and dedupe and text in seen:
                reason = "duplicate_candidate"
            if reason:
                rejected.append(rejection(reason, call, response, input=x.origin))
                continue
            seen.add(text)
            usable.append((call, response, text))
        out.append((x, usable))
    return out


def prompt_messages(call: Call, text: str, keep_system: bool) -> list[dict[str, str]]:
    """The records' prompt: the template's system message (if kept) and the input as the user turn."""
    system = [m for m in call.request["messages"] if m["role"] == "system"] if keep_system else []
    return system + [{"role": "user", "content": text}]


def origin_of(x: Any) -> dict[str, list[dict[str, str]]]:
    return {"seeds": [x.origin], "parents": []} if x.is_seed else {"seeds": [], "parents": [x.origin]}


def assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def feedback(name: str, cfg: Feedback, root: Path, data_dir: Path,
             askers: dict[str, Asker]) -> tuple[list[dict], list[dict], dict]:
    """Return (records, rejected, templates) for the preference dataset `name`."""
    generator, judge_asker = askers["generator"], askers["judge"]
    prompt = load_prompt(root, cfg.template, VARIABLES)
    inputs = [x for src in cfg.inputs for x in load_inputs(root, src, data_dir)]
    rejected: list[dict[str, Any]] = []
    sampled = sample_candidates(generator, cfg, prompt, inputs, cfg.candidates, rejected, dedupe=True)

    todo = []
    for x, usable in sampled:
        if len(usable) < 2:
            rejected.append(rejection("too_few_candidates", None, None, input=x.origin, usable=len(usable)))
            continue
        group = judges.Group(x.text, prompt_messages(usable[0][0], x.text, cfg.keep_system),
                             [t for _, _, t in usable], x.origin)
        todo.append((x, usable, group))
    results, judge_prompt = judges.judge(cfg.judge, root, judge_asker, [g for _, _, g in todo])
    judge_info = {"kind": cfg.judge.kind, "teacher": judge_asker.teacher.identity,
                  "template": judge_prompt.provenance() if judge_prompt else None}

    records = []
    for (x, usable, group), j in zip(todo, results, strict=True):
        rejected.extend(j.rejected)
        scored = sorted(((s, i) for i, s in enumerate(j.scores) if s is not None), key=lambda t: (-t[0], t[1]))
        if j.failure or len(scored) < 2:
            rejected.append(rejection(j.failure or "too_few_candidates", None, None, input=x.origin,
                                      scores=j.scores))
            continue
        (best, b), (worst, w) = scored[0], scored[-1]
        if best == worst:
            rejected.append(rejection("tie", None, None, input=x.origin, scores=j.scores,
                                      inconsistent=j.inconsistent))
            continue
        prov = provenance(
            "feedback", name, [request_provenance(c, r) for c, r, _ in usable] + j.requests,
            filters=[{"name": "judge", "passed": True,
                      "detail": {"kind": cfg.judge.kind, "scores": j.scores, "inconsistent": j.inconsistent}}],
            **origin_of(x))
        sample = [c.request["sample_index"] for c, _, _ in usable]
        records.append({
            "prompt": group.prompt,
            "chosen": assistant(group.texts[b]),
            "rejected": assistant(group.texts[w]),
            "score_chosen": best,
            "score_rejected": worst,
            "rationale": j.rationale(b, w),
            "candidates": [{"completion": assistant(group.texts[i]), "score": s} for s, i in scored],
            "category": x.category,
            "provenance": {**prov, "judge": judge_info,
                           "pair": {"chosen": sample[b], "rejected": sample[w]}},
        })
    return records, rejected, judges.templates_of(prompt, judge_prompt)
