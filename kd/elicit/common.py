"""What every elicitation method shares: seeds, requests through the cache, verdicts, provenance, summary."""

from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kd.cache import RequestCache, request_key
from kd.config import Sampling, Source
from kd.errors import KdError
from kd.prompts import Prompt
from kd.records import read_dataset, read_jsonl, sha256_text
from kd.teachers import Teacher


@dataclass(frozen=True)
class Call:
    """One teacher request and the template that rendered it (None: a white-box scoring request)."""

    key: str
    request: dict[str, Any]
    prompt: Prompt | None


@dataclass
class Asker:
    """Sends requests to a teacher through the request cache and counts what was cached and what was new."""

    teacher: Teacher
    cache: RequestCache
    label: str
    cached: int = 0
    new: int = 0
    usage: dict[str, int] = field(default_factory=lambda: {"prompt_tokens": 0, "completion_tokens": 0})
    new_usage: dict[str, int] = field(default_factory=lambda: {"prompt_tokens": 0, "completion_tokens": 0})  # paid for now

    def call(self, prompt: Prompt, sampling: Sampling, sample_index: int = 0, **variables: Any) -> Call:
        request = {
            "backend": self.teacher.identity["backend"],
            "teacher": self.teacher.identity,
            "messages": prompt.render(**variables),
            "sampling": sampling.model_dump(),
            "sample_index": sample_index,
            "response_format": None,
        }
        return Call(request_key(request), request, prompt)

    def ask(self, calls: list[Call]) -> dict[str, dict[str, Any]]:
        """Answers for every call: from the cache when present, else from the teacher (persisted on arrival)."""
        from tqdm import tqdm

        unique = {c.key: c for c in calls}
        answers: dict[str, dict[str, Any]] = {}
        misses = []
        for key, c in unique.items():
            hit = self.cache.get(key)
            if hit is None:
                misses.append((key, c.request))
            else:
                answers[key] = hit
        self.cached += len(unique) - len(misses)
        if misses:
            bar = tqdm(total=len(misses), desc=f"{self.label}: teacher", unit="req", file=sys.stderr,
                       disable=None, dynamic_ncols=True)

            def on_result(key: str, response: dict[str, Any]) -> None:
                self.cache.put(key, unique[key].request, response)
                answers[key] = response
                self.new += 1
                for k, v in response["usage"].items():
                    self.new_usage[k] = self.new_usage.get(k, 0) + v
                bar.update(1)

            try:
                self.teacher.generate(misses, on_result)
            finally:
                bar.close()
        for key in unique:
            for k, v in answers[key]["usage"].items():
                self.usage[k] = self.usage.get(k, 0) + v
        return answers


def verdict(response: dict[str, Any], allow_truncated: bool) -> str | None:
    """Why an answer cannot be used as is, or None. Failures are rejections, never records."""
    finish = response["finish_reason"]
    if finish == "length" and not allow_truncated:
        return "truncated"
    if finish not in ("stop", "length"):
        return f"finish_reason:{finish}"
    if not response["text"].strip():
        return "empty"
    return None


def request_provenance(call: Call, response: dict[str, Any]) -> dict[str, Any]:
    if call.prompt is None:  # white-box scoring (kd.elicit.scoring): no template, no sampling
        return {"key": call.key, "kind": call.request["kind"], "teacher": call.request["teacher"],
                "sample_index": 0, "usage": response["usage"], "finish_reason": response["finish_reason"]}
    return {
        "key": call.key,
        "template": call.prompt.provenance(),
        "teacher": call.request["teacher"],
        "sampling": call.request["sampling"],
        "sample_index": call.request["sample_index"],
        "usage": response["usage"],
        "finish_reason": response["finish_reason"],
    }


def provenance(method: str, dataset: str, requests: list[dict[str, Any]], parents: list[dict[str, str]],
               seeds: list[dict[str, str]], filters: list[dict[str, Any]]) -> dict[str, Any]:
    return {"method": method, "stage": dataset, "requests": requests, "parents": parents, "seeds": seeds,
            "filters": filters}


def rejection(reason: str, call: Call | None, response: dict[str, Any] | None, **context: Any) -> dict[str, Any]:
    """A rejected answer with its reason and enough context to find out why."""
    row: dict[str, Any] = {"reason": reason, **context}
    if call is not None:
        row["request_key"] = call.key
        if call.prompt is not None:
            row["template"] = call.prompt.path
    if response is not None:
        row["text"] = response["text"]
        row["finish_reason"] = response["finish_reason"]
    return row


@dataclass(frozen=True)
class Input:
    """One input to answer: its text and where it came from."""

    text: str
    origin: dict[str, str]  # {"file": ..., "id": ...} for a seed, {"dataset": ..., "id": ...} for a record
    is_seed: bool
    category: str = ""
    reference: str = ""


def seed_id(row: dict[str, Any]) -> str:
    return str(row["id"]) if "id" in row else sha256_text(str(sorted(row.items())))[:16]


def load_seeds(root: Path, file: str, required: tuple[str, ...]) -> list[dict[str, Any]]:
    """Seed rows, each checked for the fields a method needs (a bad line names file and line)."""
    rows = read_jsonl(root / file)
    if not rows:
        raise KdError(f"{file}: no seed records")
    seen: set[str] = set()
    for n, row in enumerate(rows, 1):
        for f in required:
            if not isinstance(row.get(f), str) or not row[f].strip():
                raise KdError(f"{file}: record {n} ({row.get('id', 'no id')}): needs a non-empty string `{f}`")
        sid = seed_id(row)
        if sid in seen:
            raise KdError(f"{file}: record {n}: duplicate id '{sid}'")
        seen.add(sid)
    return rows


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


def load_inputs(root: Path, source: Source, data_dir: Path) -> list[Input]:
    if source.seeds is not None:
        rows = load_seeds(root, source.seeds, ("instruction",))
        inputs = [Input(r["instruction"], {"file": source.seeds, "id": seed_id(r)}, True,
                        str(r.get("category", "")), str(r.get("reference", ""))) for r in rows]
    else:
        _, records = read_dataset(data_dir / source.dataset)
        inputs = [Input(user_text(r), {"dataset": source.dataset, "id": r["id"]}, False,
                        str(r.get("category", ""))) for r in records]
    return inputs[: source.limit] if source.limit else inputs


@dataclass
class Totals:
    """Requests and tokens of several askers together (a generator and a judge), for summary and metrics."""

    cached: int = 0
    new: int = 0
    usage: dict[str, int] = field(default_factory=lambda: {"prompt_tokens": 0, "completion_tokens": 0})
    new_usage: dict[str, int] = field(default_factory=lambda: {"prompt_tokens": 0, "completion_tokens": 0})

    @classmethod
    def of(cls, askers: list[Asker]) -> Totals:
        t = cls()
        for a in askers:
            t.cached, t.new = t.cached + a.cached, t.new + a.new
            for total, part in ((t.usage, a.usage), (t.new_usage, a.new_usage)):
                for k, v in part.items():
                    total[k] = total.get(k, 0) + v
        return t


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
