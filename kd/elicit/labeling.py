"""Labeling (survey §3.1.1): the teacher answers inputs from seeds or upstream datasets.

With a template whose system block asks for step-by-step reasoning this is Orca's explanation tuning; with
`keep_system` the student sees the same system message in its prompt. Every request is known before any answer,
so labeling is built in one streamed pass (kd.elicit.common.Streamed): a million inputs in bounded memory.

References: Mukherjee et al. 2023, "Orca: Progressive Learning from Complex Explanation Traces of GPT-4".
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kd.config import Labeling
from kd.elicit.common import Input, Streamed, iter_inputs, provenance
from kd.prompts import Prompt
from kd.runtime.ask import Asker, Call, rejection, request_provenance, verdict

VARIABLES = ("instruction", "category")
Item = tuple[Input, int]  # an input and its sample index


def _items(cfg: Labeling, root: Path, data_dir: Path) -> Iterator[Item]:
    for src in cfg.inputs:
        for x in iter_inputs(root, src, data_dir):
            for s in range(cfg.samples):
                yield x, s


def _render(asker: Asker, prompt: Prompt, cfg: Labeling, item: Item) -> Call:
    x, s = item
    return asker.call(prompt, cfg.sampling, s, instruction=x.text, category=x.category)


def _values(item: Item) -> tuple[int, tuple[str, ...]]:
    x, s = item
    return s, (x.text, x.category)  # what _render passes to the template, in VARIABLES order


def _assemble(name: str, cfg: Labeling, prompt: Prompt, identity: dict[str, Any], item: Item, key: str,
              response: dict[str, Any], request: dict[str, Any] | None) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """`request`: as cached with the answer (None for a refusal, which is never cached)."""
    x, s = item
    if request is None:  # what provenance needs of the request (a refusal only becomes a rejection)
        request = {"teacher": identity, "sampling": cfg.sampling.model_dump(), "sample_index": s, "messages": []}
    call = Call(key, request, prompt)
    if reason := verdict(response, cfg.allow_truncated):
        return None, rejection(reason, call, response, input=x.origin)
    origin = {"seeds": [x.origin], "parents": []} if x.is_seed else {"seeds": [], "parents": [x.origin]}
    system = [m for m in request["messages"] if m["role"] == "system"] if cfg.keep_system else []
    record = {
        "prompt": system + [{"role": "user", "content": x.text}],
        "completion": [{"role": "assistant", "content": response["text"].strip()}],
        "category": x.category,
        "reference": x.reference,
        "provenance": provenance("labeling", name, [request_provenance(call, response)],
                                 filters=[{"name": "finish_reason", "passed": True, "detail": response["finish_reason"]}],
                                 **origin),
    }
    return record, None


label = Streamed(VARIABLES, _items, _render, _values, _assemble)
