"""Asking through the request cache: the one way every family puts a request to a teacher or a scorer.

A `Call` is a rendered request and its key; an `Asker` answers calls from the cache when it can and from its
backend otherwise, persisting each answer the moment it arrives, and counts what was cached, new and paid for.
Answers that cannot be used become rejections with a reason (`verdict`, `rejection`), never records.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from kd.cache.store import RequestCache, request_key
from kd.config import Sampling
from kd.prompts import Prompt
from kd.runtime.teachers import Teacher


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
            self.cache.ensure_writable()  # a read-only cache fails here, before any answer is paid for and lost
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
    """What a record says about one request: its key, template, teacher, sampling, usage and, for a server,
    who answered (`served_by`, kept with the cached answer: a cache hit names the server that gave it)."""
    served = {"served_by": response["served_by"]} if response.get("served_by") else {}
    if call.prompt is None:  # white-box scoring (kd.runtime.scoring): no template, no sampling
        return {"key": call.key, "kind": call.request["kind"], "teacher": call.request["teacher"],
                "sample_index": 0, "usage": response["usage"], "finish_reason": response["finish_reason"], **served}
    return {
        "key": call.key,
        "template": call.prompt.provenance(),
        "teacher": call.request["teacher"],
        "sampling": call.request["sampling"],
        "sample_index": call.request["sample_index"],
        "usage": response["usage"],
        "finish_reason": response["finish_reason"],
        **served,
    }


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
