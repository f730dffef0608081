"""Expansion (survey §3.1.2): Self-Instruct rounds, then Evol-Instruct operators.

Each Self-Instruct request shows the teacher a few demos, most from the seeds and some from earlier
generations, and asks for a new instruction; a ROUGE-L filter keeps only novel ones. Evol-Instruct then
rewrites chosen instructions with operator templates (deepen, add constraints, concretise, broaden).
Demo choice is seeded from the dataset name and `seed`, so a rebuild asks exactly the same requests.

References: Wang et al. 2023, "Self-Instruct"; Xu et al. 2023, "WizardLM: Empowering Large Language Models to
Follow Complex Instructions" (Evol-Instruct).
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

from kd.config import Expansion
from kd.elicit.common import clean_instruction, provenance
from kd.prompts import load_prompt
from kd.records import content_id, load_seeds, seed_id
from kd.runtime.ask import Asker, rejection, request_provenance, verdict
from kd.runtime.novelty import NoveltyIndex, words

SELF_INSTRUCT_VARIABLES = ("demos",)
EVOL_VARIABLES = ("instruction", "category")


def _record(name: str, text: str, category: str, req: dict, parents: list, seeds: list, filters: list) -> dict:
    record = {"prompt": [{"role": "user", "content": text}], "category": category}
    return {**record, "id": content_id(record),
            "provenance": provenance("expansion", name, [req], parents=parents, seeds=seeds, filters=filters)}


def expand(name: str, cfg: Expansion, root: Path, data_dir: Path,
           askers: dict[str, Asker]) -> tuple[list[dict], list[dict], dict]:
    """Return (records, rejected, templates): new instructions as TRL prompt-only records."""
    asker = askers["teacher"]
    prompt = load_prompt(root, cfg.template, SELF_INSTRUCT_VARIABLES)
    evol_prompts = [load_prompt(root, t, EVOL_VARIABLES) for t in (cfg.evol.templates if cfg.evol else [])]
    seeds = load_seeds(root, cfg.seeds, ("instruction",))
    seed_refs = [{"file": cfg.seeds, "id": seed_id(s)} for s in seeds]
    rng = random.Random(f"{name}:{cfg.seed}")
    novelty = NoveltyIndex(cfg.novelty_threshold)
    for s in seeds:  # a "new" instruction must differ from the seeds too
        novelty.add(s["instruction"])
    kept: list[dict[str, Any]] = []
    rejected: list[dict[str, Any]] = []
    asked = 0

    def judge(call: Any, response: dict, category: str, parents: list, seeds_used: list,
              original: str | None = None) -> None:
        # a long answer is fine when the instruction in its first paragraph ended before the cut
        if reason := verdict(response, allow_truncated=True):
            rejected.append(rejection(reason, call, response))
            return
        cut = response["finish_reason"] == "length" and not cfg.allow_truncated
        text, reason = clean_instruction(response["text"], cfg.min_words, cfg.max_words, truncated=cut)
        if text is not None and original is not None:
            reason = failed_evolution(original, text) or ""
            text = None if reason else text
        if text is None:
            rejected.append(rejection(reason, call, response, **({"original": original} if original else {})))
            return
        added, closest = novelty.admit(text)
        if not added:
            rejected.append(rejection("not_novel", call, response, rouge_l=round(closest.score, 4)))
            return
        kept.append(_record(name, text, category, request_provenance(call, response), parents, seeds_used,
                            [{"name": "rouge_l_novelty", "passed": True, "detail": closest.describe(cfg.novelty_threshold),
                              "max_rouge_l": round(closest.score, 4), "measured": closest.exact}]))

    for _ in range(cfg.max_rounds):
        if len(kept) >= cfg.target:
            break
        calls = []
        for _ in range(min(cfg.per_round, cfg.target - len(kept))):
            n_gen = min(cfg.generated_demos, len(kept))
            demo_seeds = rng.sample(range(len(seeds)), cfg.demos - n_gen)
            demo_gen = rng.sample(range(len(kept)), n_gen)
            demos = [seeds[i]["instruction"] for i in demo_seeds] + [user_of(kept[i]) for i in demo_gen]
            call = asker.call(prompt, cfg.sampling, asked, demos=demos)
            asked += 1
            calls.append((call, [{"dataset": name, "id": kept[i]["id"]} for i in demo_gen],
                          [seed_refs[i] for i in demo_seeds]))
        answers = asker.ask([c for c, _, _ in calls])
        for call, parents, seeds_used in calls:
            judge(call, answers[call.key], "", parents, seeds_used)

    if cfg.evol and cfg.evol.count:
        pool = [(s["instruction"], s.get("category", ""), [], [ref]) for s, ref in zip(seeds, seed_refs, strict=True)]
        pool += [(user_of(r), r["category"], [{"dataset": name, "id": r["id"]}], []) for r in kept]
        chosen = rng.sample(range(len(pool)), min(cfg.evol.count, len(pool)))
        calls, call_instruction = [], {}
        for n, i in enumerate(chosen):
            text, category, parents, seeds_used = pool[i]
            op = evol_prompts[n % len(evol_prompts)]
            call = asker.call(op, cfg.sampling, 0, instruction=text, category=category)
            call_instruction[call.key] = text
            calls.append((call, category, parents, seeds_used))
        answers = asker.ask([c for c, _, _, _ in calls])
        for call, category, parents, seeds_used in calls:
            judge(call, answers[call.key], category, parents, seeds_used, original=call_instruction[call.key])

    templates = {p.path: p.sha256 for p in [prompt, *evol_prompts]}
    for p in [prompt, *evol_prompts]:
        templates.update(p.includes)
    return kept, rejected, templates


# Phrases of the operator's own instructions that a failed rewrite copies into the new prompt (WizardLM §3.3).
_LEAK = re.compile(r"#?\s*(?:re-?written|given|original|new|created)\s+(?:prompt|instruction)\b|\bI will (?:replace|rewrite|"
                   r"add|make)\b|\bthe (?:given|original) (?:prompt|question|instruction)\b", re.IGNORECASE)
_REFUSAL = re.compile(r"^(?:I'?m sorry|I am sorry|sorry\b|I cannot|I can'?t|I'?m not able|I am not able|As an AI\b)",
                      re.IGNORECASE)


def failed_evolution(original: str, evolved: str) -> str | None:
    """Evol-Instruct's elimination step: why an evolved instruction is no evolution, or None.

    `evol_no_change`: it adds nothing (same words, or all its words already in the original);
    `evol_refusal`: the teacher refused instead of rewriting; `evol_leak`: it copies the operator's own
    instructions ("rewritten prompt", "I will replace ...") instead of being a prompt.

    References: Xu et al. 2023, "WizardLM", §3.3 Elimination Evolving.
    """
    if _REFUSAL.search(evolved.strip()):
        return "evol_refusal"
    if _LEAK.search(evolved):
        return "evol_leak"
    before, after = set(words(original)), set(words(evolved))
    if after <= before:
        return "evol_no_change"
    return None


def user_of(record: dict) -> str:
    return record["prompt"][-1]["content"]
