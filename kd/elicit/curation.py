"""Curation (survey §3.1.3): meta-information -> the teacher writes a question -> the teacher answers it.

Each question is seeded by one (topic, attribute) pair drawn without replacement, as UltraChat seeds
dialogues with topics and Phi's synthetic textbooks with topic x audience combinations.

References: Ding et al. 2023, "Enhancing Chat Language Models by Scaling High-quality Instructional
Conversations" (UltraChat); Gunasekar et al. 2023, "Textbooks Are All You Need" (phi-1).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from kd.config import Curation
from kd.elicit.common import clean_instruction, provenance
from kd.prompts import load_prompt
from kd.records import load_seeds, seed_id
from kd.runtime.ask import Asker, rejection, request_provenance, verdict

QUESTION_VARIABLES = ("topic", "domain", "attribute")
ANSWER_VARIABLES = ("question", "topic", "domain")


def curate(name: str, cfg: Curation, root: Path, data_dir: Path,
           askers: dict[str, Asker]) -> tuple[list[dict], list[dict], dict]:
    """Return (records, rejected, templates): prompt/completion records grounded in topic seeds."""
    asker = askers["teacher"]
    q_prompt = load_prompt(root, cfg.question_template, QUESTION_VARIABLES)
    a_prompt = load_prompt(root, cfg.answer_template, ANSWER_VARIABLES)
    topics = load_seeds(root, cfg.topics, ("topic",))
    attributes = load_seeds(root, cfg.attributes, ("attribute",))
    pairs = [(t, a) for t in topics for a in attributes]
    chosen = random.Random(f"{name}:{cfg.seed}").sample(pairs, min(cfg.count, len(pairs)))
    rejected: list[dict[str, Any]] = []

    q_calls = []
    for topic, attribute in chosen:
        seeds = [{"file": cfg.topics, "id": seed_id(topic)}, {"file": cfg.attributes, "id": seed_id(attribute)}]
        q_calls.append((asker.call(q_prompt, cfg.question_sampling, 0, topic=topic["topic"],
                                   domain=topic.get("domain", ""), attribute=attribute["attribute"]), topic, seeds))
    q_answers = asker.ask([c for c, _, _ in q_calls])

    a_calls = []
    for q_call, topic, seeds in q_calls:
        response = q_answers[q_call.key]
        reason = verdict(response, allow_truncated=True)
        cut = response["finish_reason"] == "length" and not cfg.allow_truncated
        question, reason = (None, reason) if reason else clean_instruction(response["text"], 3, 120, truncated=cut)
        if question is None:
            rejected.append(rejection(reason, q_call, response, seeds=seeds))
            continue
        a_call = asker.call(a_prompt, cfg.answer_sampling, 0, question=question, topic=topic["topic"],
                            domain=topic.get("domain", ""))
        a_calls.append((a_call, q_call, response, question, topic, seeds))
    a_answers = asker.ask([c[0] for c in a_calls])

    records = []
    for a_call, q_call, q_response, question, topic, seeds in a_calls:
        response = a_answers[a_call.key]
        if reason := verdict(response, cfg.allow_truncated):
            rejected.append(rejection(reason, a_call, response, seeds=seeds, question=question))
            continue
        records.append({
            "prompt": [{"role": "user", "content": question}],
            "completion": [{"role": "assistant", "content": response["text"].strip()}],
            "category": topic.get("domain", ""),
            "provenance": provenance(
                "curation", name, [request_provenance(q_call, q_response), request_provenance(a_call, response)],
                parents=[], seeds=seeds, filters=[{"name": "finish_reason", "passed": True, "detail": response["finish_reason"]}]),
        })
    templates = {q_prompt.path: q_prompt.sha256, a_prompt.path: a_prompt.sha256, **q_prompt.includes,
                 **a_prompt.includes}
    return records, rejected, templates
