"""Asking through the request cache: the one way every family puts a request to a teacher or a scorer.

A `Call` is a rendered request and its key; an `Asker` answers calls from the cache when it can and from its
backend otherwise, persisting each answer the moment it arrives, and counts what was cached, new and paid for.
Answers that cannot be used become rejections with a reason (`verdict`, `rejection`), never records; so do
requests the teacher refused because of the request itself (kd.runtime.refusals), which are never cached.
While answers arrive, `Progress` shows how far the asking is.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

from tqdm import tqdm

from kd.cache.store import RequestCache, request_key
from kd.config import Price, Sampling, billed_price
from kd.prompts import Prompt, TooLong
from kd.runtime.refusals import REASONS, is_refused, refused
from kd.runtime.teachers import Teacher

# Without a terminal (logs, `dvc repro` output), a plain progress line at each further tenth of the requests
# once PROGRESS_MIN_S passed since the last line, and at least every PROGRESS_MAX_S: a 9-minute stage prints
# about ten lines, a stage of seconds none.
PROGRESS_MIN_S = 10.0
PROGRESS_MAX_S = 60.0


@dataclass(frozen=True)
class Call:
    """One teacher request and the template that rendered it (None: a white-box scoring request). `refusal`: the
    row could not become a request (kd.prompts.TooLong), so its answer is that refusal, never sent or cached."""

    key: str
    request: dict[str, Any]
    prompt: Prompt | None
    refusal: dict[str, Any] | None = None


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
        try:
            messages = prompt.render(**variables)
        except TooLong as e:  # the row's fault: its record is rejected `too_long` (like a teacher's refusal)
            return Call(e.digest, {}, prompt, refused("too_long", str(e)))
        request = {
            "backend": self.teacher.identity["backend"],
            "teacher": self.teacher.identity,
            "messages": messages,
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
            hit = c.refusal or self.cache.get(key)
            if hit is None:
                misses.append((key, c.request))
            else:
                answers[key] = hit
        self.cached += sum(c.refusal is None for c in unique.values()) - len(misses)
        answers.update(self.send(misses, len(misses), keep_all=True))
        for key in unique:
            self.count(answers[key])
        return answers

    def send(self, misses: Iterable[tuple[str, dict[str, Any]]], total: int,
             keep_all: bool = False) -> dict[str, dict[str, Any]]:
        """Ask the teacher `total` uncached requests, persisting each answer as it arrives. Returns every answer
        (`keep_all`) or only those the cache does not keep (refusals): a streamed stage reads the rest back."""
        kept: dict[str, dict[str, Any]] = {}
        if not total:
            return kept
        self.cache.ensure_writable()  # a read-only cache fails here, before any answer is paid for and lost
        progress = Progress(f"{self.label}: teacher", total, self.price())

        def on_result(key: str, response: dict[str, Any]) -> None:
            request = requests.pop(key)
            if is_refused(response):  # a refusal is about this request only: recomputed next run
                kept[key] = response
            else:
                self.cache.put(key, request, response)
                if keep_all:
                    kept[key] = response
                self.new += 1
                for k, v in response["usage"].items():
                    self.new_usage[k] = self.new_usage.get(k, 0) + v
            progress.update(self.new_usage)

        requests: dict[str, dict[str, Any]] = {}  # taken by the teacher, not answered yet: a bounded number

        def tracked() -> Iterator[tuple[str, dict[str, Any]]]:
            for key, request in misses:
                requests[key] = request
                yield key, request

        try:
            self.teacher.generate(tracked(), on_result)
        finally:
            progress.close()
        return kept

    def count(self, response: dict[str, Any]) -> None:
        """Add one distinct request's answer to the usage of every request that built the dataset."""
        for k, v in response["usage"].items():
            self.usage[k] = self.usage.get(k, 0) + v

    def price(self) -> Price | None:
        """The teacher's price from its params as billed in its mode, when it has one (a reward-model scorer has none)."""
        return billed_price(getattr(self.teacher, "cfg", None))


class Progress:
    """Requests done / total, rate, ETA, and tokens (and cost, when priced) paid for so far.

    A tqdm bar when stderr is a terminal; otherwise plain lines (see PROGRESS_MIN_S), which logs keep.
    """

    def __init__(self, label: str, total: int, price: Price | None, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.label, self.total, self.price, self.clock = label, total, price, clock
        self.stream = stream or sys.stderr
        self.start = self.last = clock()
        self.done, self.tenths, self.spent = 0, 0, ""
        tty = getattr(self.stream, "isatty", lambda: False)()
        self.bar = tqdm(total=total, desc=label, unit="req", file=self.stream, dynamic_ncols=True) if tty else None

    def update(self, paid: dict[str, int]) -> None:
        """One more request done; `paid`: tokens paid for so far."""
        self.done += 1
        p, c = paid.get("prompt_tokens", 0), paid.get("completion_tokens", 0)
        cost = f", ${self.price.cost(p, c):.4f}" if self.price is not None else ""
        self.spent = f"{p:,} prompt + {c:,} completion tokens{cost}"
        if self.bar is not None:
            self.bar.set_postfix_str(self.spent, refresh=False)
            self.bar.update(1)
            return
        now, tenths = self.clock(), self.done * 10 // max(self.total, 1)
        if (tenths > self.tenths and now - self.last >= PROGRESS_MIN_S) or now - self.last >= PROGRESS_MAX_S:
            self.tenths, self.last = tenths, now
            print(self.line(now), file=self.stream, flush=True)

    def line(self, now: float) -> str:
        elapsed = now - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = duration((self.total - self.done) / rate) if rate > 0 else "?"
        return (f"{self.label}: {self.done}/{self.total} requests ({100 * self.done // max(self.total, 1)}%), "
                f"{rate:.2f} req/s, ETA {eta}; so far {self.spent}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def duration(seconds: float) -> str:
    """`42s`, `3m07s`, `2h05m`."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def verdict(response: dict[str, Any], allow_truncated: bool) -> str | None:
    """Why an answer cannot be used as is, or None. Failures are rejections, never records."""
    finish = response["finish_reason"]
    if finish in REASONS:  # the teacher refused the request itself (kd.runtime.refusals)
        return finish
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
        if "error" in response:  # the teacher's own words on a refused request (no key: scrubbed by the backend)
            row["error"] = response["error"]
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
