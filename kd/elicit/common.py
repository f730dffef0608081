"""What the elicitation methods share: inputs from seeds or datasets, record provenance, the closing summary,
and reading one instruction out of a teacher's answer."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kd.config import Source
from kd.errors import KdError
from kd.prompts import Prompt
from kd.records import iter_dataset, iter_seeds, seed_id
from kd.runtime.ask import Asker, Call, Totals


def provenance(method: str, dataset: str, requests: list[dict[str, Any]], parents: list[dict[str, str]],
               seeds: list[dict[str, str]], filters: list[dict[str, Any]]) -> dict[str, Any]:
    return {"method": method, "stage": dataset, "requests": requests, "parents": parents, "seeds": seeds,
            "filters": filters}


@dataclass(frozen=True)
class Input:
    """One input to answer: its text and where it came from."""

    text: str
    origin: dict[str, str]  # {"file": ..., "id": ...} for a seed, {"dataset": ..., "id": ...} for a record
    is_seed: bool
    category: str = ""
    reference: str = ""


def user_text(record: dict[str, Any]) -> str:
    """The instruction of a TRL-shaped record: its prompt string or its last user message."""
    prompt = record.get("prompt", record.get("messages"))
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        users = [m["content"] for m in prompt if m.get("role") == "user"]
        if users:
            return users[-1]
    raise KdError(f"record {record.get('id', '?')}: no prompt or user message to take an instruction from")


def iter_inputs(root: Path, source: Source, data_dir: Path) -> Iterator[Input]:
    """The inputs a source names, one at a time (a dataset is checked against its manifest as it is read)."""
    if source.seeds is not None:
        inputs: Iterator[Input] = (Input(r["instruction"], {"file": source.seeds, "id": seed_id(r)}, True,
                                         str(r.get("category", "")), str(r.get("reference", "")))
                                   for r in iter_seeds(root, source.seeds, ("instruction",)))
    else:
        inputs = (Input(user_text(r), {"dataset": source.dataset, "id": r["id"]}, False, str(r.get("category", "")))
                  for r in iter_dataset(data_dir / source.dataset))
    return _first(inputs, source.limit) if source.limit else inputs


def _first(inputs: Iterator[Input], limit: int) -> Iterator[Input]:
    """The first `limit` inputs; the rest are still read, so the whole source is checked as without a limit."""
    for n, x in enumerate(inputs):
        if n < limit:
            yield x


def load_inputs(root: Path, source: Source, data_dir: Path) -> list[Input]:
    return list(iter_inputs(root, source, data_dir))


@dataclass(frozen=True)
class Streamed:
    """A method whose requests are all known before any answer (labeling), built in one streamed pass
    (kd.elicit.build): `items` are read twice (to plan the requests, then to make the records) and never held.

    - `items(cfg, root, data_dir)`: what to ask about, in order;
    - `render(asker, prompt, cfg, item)`: the item's request (rendered while planning, unless the render memo
      knows its key: kd.cache.renders);
    - `values(item)`: its sample index and the values its template gets (what the memo keys on);
    - `assemble(name, cfg, prompt, identity, item, key, response, request)`: (record, None) or (None, rejection)
      from the item, its answer and its request as cached (None when it was refused and so not cached), without
      rendering again.
    """

    variables: tuple[str, ...]
    items: Callable[[Any, Path, Path], Iterator[Any]]
    render: Callable[[Asker, Prompt, Any, Any], Call]
    values: Callable[[Any], tuple[int, tuple[str, ...]]]
    assemble: Callable[..., tuple[dict[str, Any] | None, dict[str, Any] | None]]


class Summary:
    """The stage's closing line: `name: 64 records (12 cached, 52 new, 3 rejected) in 41 s`."""

    def __init__(self) -> None:
        self.start = time.monotonic()

    def line(self, name: str, manifest: dict[str, Any], asker: Asker | Totals) -> str:
        rejected = sum(manifest["rejected"].values())
        return (f"{name}: {manifest['records']} records ({asker.cached} cached, {asker.new} new, {rejected} rejected)"
                f" in {time.monotonic() - self.start:.0f} s")


_PREFIX = re.compile(r"^\s*(?:\d+\s*[.):]|[-*]|(?:new\s+)?(?:task|instruction|question|prompt)\s*\d*\s*:)\s*",
                     re.IGNORECASE)
# Self-Instruct drops tasks a text-only model cannot do.
UNSUITABLE = re.compile(r"\b(image|images|picture|graph|graphs|draw|plot|video|audio|file|map|go to)\b", re.I)


_LEAD_IN = re.compile(r"^(?:sure|okay|ok|certainly)?[,!. ]*(?:here(?:'s| is| are)|below is)\b[^:\n]{0,80}:\s*", re.I)
_QUOTED = re.compile(r'^[^"“]{0,40}["“]([^"”]{8,})["”]')


def clean_instruction(text: str, min_words: int, max_words: int, truncated: bool = False) -> tuple[str | None, str]:
    """The one instruction in a teacher's answer, or (None, reason it was rejected).

    Takes the first paragraph after a lead-in such as "Here's a new task:", unwrapping quotes. An answer cut
    off at max_tokens is fine if its first paragraph was complete before the cut.
    """
    body = _LEAD_IN.sub("", text.strip(), count=1)
    paragraphs = [p for p in re.split(r"\n\s*\n", body) if p.strip()]
    if not paragraphs:
        return None, "empty"
    if truncated and len(paragraphs) == 1:
        return None, "truncated"
    line = _PREFIX.sub("", " ".join(paragraphs[0].split()))
    if quoted := _QUOTED.match(line):
        line = quoted.group(1)
    line = line.strip().strip("\"'`“”").strip()
    if not line:
        return None, "empty"
    n = len(line.split())
    if n < min_words:
        return None, "too_short"
    if n > max_words:
        return None, "too_long"
    if not line[0].isalnum():
        return None, "bad_start"
    if UNSUITABLE.search(line):
        return None, "unsuitable_for_text"
    return line, ""
