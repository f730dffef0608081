"""Labeling (survey §3.1.1): the teacher answers inputs from seeds or upstream datasets.

With a template whose system block asks for step-by-step reasoning this is Orca's explanation tuning; with
`keep_system` the student sees the same system message in its prompt.

References: Mukherjee et al. 2023, "Orca: Progressive Learning from Complex Explanation Traces of GPT-4".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kd.config import Labeling
from kd.elicit.common import load_inputs, provenance
from kd.prompts import load_prompt
from kd.runtime.ask import Asker, rejection, request_provenance, verdict

VARIABLES = ("instruction", "category")


def label(name: str, cfg: Labeling, root: Path, data_dir: Path,
          askers: dict[str, Asker]) -> tuple[list[dict], list[dict], dict]:
    """Return (records, rejected, templates) for the dataset `name`."""
    asker = askers["teacher"]
    prompt = load_prompt(root, cfg.template, VARIABLES)
    inputs = [x for src in cfg.inputs for x in load_inputs(root, src, data_dir)]
    calls = [(x, s, asker.call(prompt, cfg.sampling, s, instruction=x.text, category=x.category))
             for x in inputs for s in range(cfg.samples)]
    answers = asker.ask([c for _, _, c in calls])
    records: list[dict[str, Any]] = []
    rejected: list[dict[str, Any]] = []
    for x, _, call in calls:
        response = answers[call.key]
        origin = {"seeds": [x.origin], "parents": []} if x.is_seed else {"seeds": [], "parents": [x.origin]}
        if reason := verdict(response, cfg.allow_truncated):
            rejected.append(rejection(reason, call, response, input=x.origin))
            continue
        system = [m for m in call.request["messages"] if m["role"] == "system"] if cfg.keep_system else []
        record = {
            "prompt": system + [{"role": "user", "content": x.text}],
            "completion": [{"role": "assistant", "content": response["text"].strip()}],
            "category": x.category,
            "reference": x.reference,
            "provenance": provenance("labeling", name, [request_provenance(call, response)],
                                     filters=[{"name": "finish_reason", "passed": True, "detail": response["finish_reason"]}], **origin),
        }
        records.append(record)
    templates = {prompt.path: prompt.sha256, **prompt.includes}
    return records, rejected, templates
