"""A stage's requests planned in one pass, in bounded memory: the first half of a streamed stage.

Every request is rendered and keyed once and looked up in the cache's index in chunks (no entry is read or
verified here); the stage keeps 32 bytes per request (its key, in order) and a set of the distinct keys, and
spools the uncached requests to an anonymous temporary file from which they are sent. The running totals are
what the forecast prints (kd.provenance.forecast.planned) and what calibrates its token estimate, so a stage's
forecast and its build share one pass over the cache instead of two (issue: each prompt was rendered and each
entry read twice).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from kd.errors import KdError
from kd.prompts import TooLong
from kd.runtime.ask import Call
from kd.runtime.refusals import refused

CHUNK = 512  # keys per index lookup: one query instead of 512, and a bounded list of pending calls


@dataclass
class Calibration:
    """Running sums over cached answers: characters and tokens of their prompts, tokens of their completions."""

    chars: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    completions: int = 0

    def add(self, chars: int, prompt_tokens: int, completion_tokens: int) -> None:
        if chars and prompt_tokens:
            self.chars += chars
            self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        self.completions += 1

    def chars_per_token(self) -> float | None:
        return self.chars / self.prompt_tokens if self.prompt_tokens else None

    def mean_completion(self) -> float | None:
        return self.completion_tokens / self.completions if self.completions else None


@dataclass
class Plan:
    """Items added in order; `close` after the last. Counts are over distinct requests, as the Asker counts.

    An item whose memo key (kd.cache.renders) names a request key is not rendered unless its request must be sent.
    An item whose row is too long for any prompt (kd.prompts.TooLong) becomes a `too_long` refusal in `refused`,
    under a key standing for it, like a request the teacher refused: its record is rejected, the stage goes on.
    """

    cache: Any  # kd.cache.store.RequestCache: `present(keys)` answers from its index
    identity: dict[str, Any]  # the teacher identity the keys carry
    render: Callable[[Any], Call]  # an item's request
    memo_of: Callable[[Any], bytes] | None = None  # an item's memo key; None: no memo
    memo: Any = None  # kd.cache.renders.RenderMemo
    spool_misses: bool = True  # a forecast alone (`kd status`) keeps no requests
    calls: int = 0
    cached: int = 0
    new: int = 0
    cached_usage: dict[str, int] = field(default_factory=lambda: {"prompt_tokens": 0, "completion_tokens": 0})
    hits: Calibration = field(default_factory=Calibration)
    new_chars: int = 0  # prompt characters of the new requests
    new_caps: dict[int, int] = field(default_factory=dict)  # max_tokens -> how many new requests have it
    keys: bytearray = field(default_factory=bytearray)  # 32 bytes per call, in call order
    first: bytearray = field(default_factory=bytearray)  # 1 where a call is the first with its key
    refused: dict[str, dict[str, Any]] = field(default_factory=dict)  # key -> refusal of the rows too long to render

    def __post_init__(self) -> None:
        self._seen: set[bytes] = set()
        self._pending: list[Any] = []
        self._spool: IO[bytes] | None = tempfile.TemporaryFile() if self.spool_misses else None  # noqa: SIM115

    def add(self, item: Any) -> None:
        self._pending.append(item)
        if len(self._pending) >= CHUNK:
            self._flush()

    def close(self) -> Plan:
        self._flush()
        self._seen = set()  # `first` now says which calls are first with their key: ≈100 MB less at 1M calls
        if self.memo is not None:
            self.memo.close()
        if self._spool is not None:
            self._spool.flush()
        return self

    def _flush(self) -> None:
        items, self._pending = self._pending, []
        memos = [self.memo_of(it) for it in items] if self.memo_of is not None and self.memo is not None else None
        known = self.memo.get_many(memos) if memos is not None else {}
        rendered: dict[int, Call] = {}
        distinct: list[tuple[int, str]] = []  # (position in this chunk, key) of each key's first call
        for i, item in enumerate(items):
            key = known.get(memos[i]) if memos is not None else None
            if key is None:
                try:
                    rendered[i] = call = self.render(item)
                except TooLong as e:  # the row's fault: a rejection of its record, not a failed stage
                    key = e.digest
                    self.refused[key] = refused("too_long", str(e))
                except KdError as e:  # the template's fault: the stage stops, naming which request it was
                    raise KdError(f"{e} (request {self.calls + 1} of the stage)") from None
                else:
                    key = call.key
                    if memos is not None:
                        self.memo.add(memos[i], key)
            digest = bytes.fromhex(key)
            self.keys += digest
            self.calls += 1
            if digest in self._seen:
                self.first.append(0)
                continue
            self._seen.add(digest)
            self.first.append(1)
            distinct.append((i, key))
        distinct = [(i, k) for i, k in distinct if k not in self.refused]
        found = self.cache.present([k for _, k in distinct])
        for i, key in distinct:
            hit = found.get(key)
            if hit is not None:
                chars, prompt_tokens, completion_tokens = hit
                self.cached += 1
                self.cached_usage["prompt_tokens"] += prompt_tokens
                self.cached_usage["completion_tokens"] += completion_tokens
                self.hits.add(chars, prompt_tokens, completion_tokens)
                continue
            call = rendered.get(i) or self.render(items[i])  # known from the memo, but it must be sent: render it
            assert call.key == key, "the render memo named another request than the template renders"
            self.new += 1
            self.new_chars += sum(len(m.get("content", "")) for m in call.request.get("messages") or [])
            cap = call.request["sampling"]["max_tokens"]
            self.new_caps[cap] = self.new_caps.get(cap, 0) + 1
            if self._spool is not None:
                self._spool.write(json.dumps([call.key, call.request], ensure_ascii=False).encode("utf-8") + b"\n")

    def key(self, n: int) -> str:
        return self.keys[32 * n:32 * n + 32].hex()

    def misses(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """The uncached requests as (key, request), read back from the spool in the order they were planned."""
        assert self._spool is not None, "a plan made without spool_misses keeps no requests"
        self._spool.seek(0)
        for line in self._spool:
            key, request = json.loads(line)
            yield key, request

    def discard(self) -> None:
        """Drop what the plan holds (the spool file goes with it)."""
        if self._spool is not None:
            self._spool.close()
        self._seen = set()
