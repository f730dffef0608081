"""The `openai` backend: any OpenAI-compatible chat-completions server (OpenAI, vLLM, llama.cpp, Ollama).

Requests run concurrently on one asyncio loop, bounded by `concurrency`, so throughput is set by the
server. This is the only retry layer: exponential backoff with full jitter on 408/409/429/5xx, timeouts,
dropped connections and unreadable bodies; `Retry-After` honoured up to a cap. A 400/413/422 is about the
request itself (too long for the context, invalid, content filter): that one record is rejected
(kd.runtime.refusals) and the stage goes on. Other 4xx (401/403 keys, 404 unknown model) fail at once.
The API key is read from the environment variable the params name and lives only in this object.

The server is not trusted with sizes: a body is read as a stream up to a cap (`body_cap`), an error body up to
MAX_ERROR_BYTES, and a chat answer longer than OVERSIZE_CHARS_PER_TOKEN characters per `max_tokens` token (no
tokenizer spends 32 characters on a token; a faithful server cannot send more than ~4-5) is the rejection
`oversized_answer` of that one record, never cached. Token usage that is not a count (`1e400`, negative, a word, over
MAX_USAGE_TOKENS) is counted as 0, with a warning and a `usage_note` kept with the answer: usage only prices the
build, and the answer itself is fine, so the record is kept.

Each answer records who gave it (`served_by`: the endpoint, scheme://host[:port] of `base_url`, and the model name
the server reported), so provenance tells which server answered even when the cache answers for another one.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import os
import random
import re
import sys
import time
from collections.abc import Iterable
from typing import Any

import httpx
from pydantic import SecretStr

from kd.config import OpenAITeacher as OpenAIConfig
from kd.errors import KdError, TeacherError
from kd.runtime.refusals import MAX_ERROR_CHARS, Reason, refused
from kd.secrets import REDACTED, endpoint, looks_like_key, redact, remember, scrub_known_bytes

RETRY_STATUS = {408, 409, 429}
REQUEST_STATUS = {400, 413, 422}  # about this request's content; 401/403/404 are about the key or the model
# OpenAI's `context_length_exceeded`, vLLM's "maximum context length", llama.cpp's "exceeds the available context
# size", TGI's "must have less than N tokens" ...
_TOO_LONG = re.compile(r"context[ _-]?(length|window|size)|maximum context|too many (input )?tokens|prompt is too long"
                       r"|must have less than \d+ tokens|input is too long", re.IGNORECASE)
# a 400 about the teacher or about what kd sends every request (an unknown model, a parameter this model does not
# take, e.g. OpenAI's reasoning models refusing `max_tokens`, or vLLM a `prompt_logprobs` over its limit): every
# record would be refused, so the stage fails
_NOT_THE_REQUEST = re.compile(r"model\b.{0,80}\b(not found|does not exist|not exist|unknown)|invalid[_ ]api[_ ]key"
                              r"|unauthori[sz]ed|unsupported[_ ](parameter|value)|unrecognized request argument"
                              r"|not supported with this model|extra inputs are not permitted"
                              # vLLM asked for more prompt log-probs than its --max-logprobs
                              r"|logprobs of \d+, which is greater than max allowed", re.IGNORECASE)
OVERSIZE_CHARS_PER_TOKEN = 32  # 8x the ~4 characters a token spans in English text
MAX_BODY_BASE = 1 << 20  # bytes a chat body may take beside its answer (JSON, usage, a long model name, logprobs)
MAX_ERROR_BYTES = 64 << 10  # of an error body read at all: a line of it is shown, 500 characters kept
MAX_USAGE_TOKENS = 10**9  # one request's tokens; above that a number is not a count (the largest contexts are ~10M)
LOGPROB_ENTRY_BYTES = 256  # generous size of one {"<id>": {"logprob", "rank", "decoded_token"}} entry


def identity(cfg: OpenAIConfig) -> dict[str, Any]:
    """What the cache key and provenance record about the teacher; needs no API key (`kd status` uses it).

    The URL is left out on purpose: the same model behind another host (a teammate's vLLM, a gateway, another
    port) answers the same requests, and a shared cache is only useful if their keys agree. Which server did answer
    is recorded with each answer (`served_by`); pin `revision` to keep answers of another snapshot apart.
    """
    return {"backend": "openai", "model": cfg.model, "revision": cfg.revision}


class OpenAITeacher:
    def __init__(self, name: str, cfg: OpenAIConfig) -> None:
        self.name, self.cfg = name, cfg
        self.endpoint = endpoint(cfg.base_url)  # what errors and provenance show: no credentials, path or query
        self._key: SecretStr | None = None
        if cfg.api_key_env:
            value = os.environ.get(cfg.api_key_env)
            if not value:
                # validation refuses a key typed as the name; this guards a config built around validation
                shown = REDACTED if looks_like_key(cfg.api_key_env) else cfg.api_key_env
                raise KdError(f"teachers.{name}.api_key_env: environment variable {shown} is not set "
                              f"(export it, or set api_key_env: null for a server without keys)")
            if not (value.isascii() and value.isprintable()):  # an HTTP header is ASCII: httpx would raise deep inside
                raise KdError(f"teachers.{name}.api_key_env: environment variable {cfg.api_key_env} holds characters "
                              f"an API key cannot have (non-ASCII or control characters); check what was pasted")
            remember(value)  # scrubbed from every message and answer from now on, in any encoding (kd.secrets)
            self._key = SecretStr(value)
        self.requests_sent = 0
        self.warned_usage = False

    @property
    def identity(self) -> dict[str, Any]:
        return identity(self.cfg)

    def generate(self, items: Iterable[tuple[str, dict[str, Any]]], on_result: Any) -> None:
        asyncio.run(self._run(items, on_result, lambda key, request: ("chat/completions",
                                                                      self.body(key, request), parse_completion)))

    def headers(self) -> dict[str, str]:
        """The request headers: the key, when the params name one (never logged, never in an error)."""
        return {"Authorization": f"Bearer {self._key.get_secret_value()}"} if self._key else {}

    def complete(self, items: Iterable[tuple[str, dict[str, Any]]], parse: Any, on_result: Any) -> None:
        """POST each (key, body) to `completions` (vLLM's prompt log-probs) with the same concurrency, retries and
        per-record refusals as chat; `parse(key, content, endpoint)` raises ValueError on a body it cannot use."""
        asyncio.run(self._run(items, on_result, lambda key, body: (
                "completions", {"model": self.cfg.model, **body}, lambda content, at: parse(key, content, at))))

    async def _run(self, items: Iterable[tuple[str, dict[str, Any]]], on_result: Any, prepare: Any) -> None:
        """`prepare(key, request)` gives (path, body, parse) when the request's turn comes.

        `concurrency` workers take requests from `items` one at a time as they finish the last, so what is held
        is bounded by the concurrency, not by the number of requests (a 1M-request stage once made 1M tasks)."""
        headers = self.headers()
        limits = httpx.Limits(max_connections=self.cfg.concurrency, max_keepalive_connections=self.cfg.concurrency)
        todo = iter(items)
        async with httpx.AsyncClient(base_url=self.cfg.base_url.rstrip("/") + "/", headers=headers, limits=limits,
                                     timeout=httpx.Timeout(self.cfg.timeout_s)) as client:

            async def worker() -> None:
                for key, request in todo:  # one shared iterator: each request goes to exactly one worker
                    on_result(key, await self._ask(client, *prepare(key, request)))

            workers = [asyncio.create_task(worker()) for _ in range(self.cfg.concurrency)]
            try:
                for done in asyncio.as_completed(workers):
                    await done  # the first request that fails for good stops the stage; answers so far are kept
            finally:
                for t in workers:
                    t.cancel()
                await asyncio.gather(*workers, return_exceptions=True)

    def body(self, key: str, request: dict[str, Any]) -> dict[str, Any]:
        s = request["sampling"]
        body: dict[str, Any] = {"model": self.cfg.model, "messages": request["messages"], "temperature": s["temperature"],
                                "top_p": s["top_p"], "max_tokens": s["max_tokens"], "n": 1,
                                # servers that honour a seed (vLLM, OpenAI best-effort) then sample reproducibly
                                "seed": int(key[:8], 16)}
        if s["stop"]:
            body["stop"] = s["stop"]
        if request.get("response_format"):
            body["response_format"] = request["response_format"]
        return body

    async def _ask(self, client: httpx.AsyncClient, path: str, body: dict[str, Any], parse: Any) -> dict[str, Any]:
        last = "no attempt made"
        cap = body_cap(body)
        for attempt in range(1, self.cfg.max_attempts + 1):
            retry_after = None
            try:
                self.requests_sent += 1
                async with client.stream("POST", path, json=body) as r:
                    content, over = await read_capped(r, cap if r.status_code == 200 else MAX_ERROR_BYTES)
            except httpx.TimeoutException:
                last = f"timed out after {self.cfg.timeout_s:g} s"
            except httpx.TransportError as e:
                last = f"connection error ({type(e).__name__}: {self.scrub(str(e), 200)})"
            else:
                text = content.decode("utf-8", "replace") if r.status_code != 200 else ""
                if r.status_code == 200 and over:
                    if "messages" in body:  # this answer only: a rejection, asked again next run
                        return refused("oversized_answer", f"answer body over {cap:,} bytes for max_tokens "
                                                           f"{body.get('max_tokens')}; not read further")
                    raise TeacherError(f"teacher '{self.name}' ({self.endpoint}): a {path} answer is over {cap:,} "
                                       f"bytes, more than the request can need; is {self.endpoint} the server meant?")
                if r.status_code == 200:
                    try:
                        answer = parse(content, self.endpoint)
                    except ValueError as e:
                        last = f"unreadable response ({self.scrub(str(e), 200)})"
                    else:
                        return self.checked(answer, body)
                elif r.status_code in RETRY_STATUS or r.status_code >= 500:
                    last = f"HTTP {r.status_code}: {self.scrub(text, 200)}"
                    retry_after = _retry_after(r.headers.get("retry-after"))
                else:
                    message = redact(f"HTTP {r.status_code}: {self.scrub(text, MAX_ERROR_CHARS)}")
                    if reason := about_the_request(r.status_code, text):
                        return refused(reason, message)
                    raise TeacherError(f"teacher '{self.name}' ({self.endpoint}) refused a request with HTTP "
                                       f"{r.status_code}: {self.scrub(text, 300)}")
            if attempt == self.cfg.max_attempts:
                break
            backoff = random.uniform(0, min(self.cfg.backoff_max_s, self.cfg.backoff_s * 2 ** (attempt - 1)))
            delay = min(retry_after, self.cfg.retry_after_max_s) if retry_after is not None else backoff
            await asyncio.sleep(delay)
        raise TeacherError(f"teacher '{self.name}' ({self.endpoint}): a request failed {self.cfg.max_attempts} "
                           f"times; last: {last}. Answers received so far are cached: rerun to resume.")

    def checked(self, answer: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
        """A chat answer far beyond `max_tokens` becomes the rejection `oversized_answer`; a bad usage note warns."""
        if (note := answer.get("usage_note")) and not self.warned_usage:
            self.warned_usage = True
            print(f"kd: warning: teacher '{self.name}' ({self.endpoint}): {self.scrub(note, 200)}", file=sys.stderr)
        text = answer.get("text")
        limit = OVERSIZE_CHARS_PER_TOKEN * int(body.get("max_tokens") or 0)
        if "messages" in body and isinstance(text, str) and limit and len(text) > limit:
            return refused("oversized_answer", f"answer of {len(text):,} characters for max_tokens "
                                               f"{body['max_tokens']} (more than {limit:,}: "
                                               f"{OVERSIZE_CHARS_PER_TOKEN} a token)")
        return answer

    def scrub(self, text: str, limit: int) -> str:
        """A server's text made fit for a one-line error: keys removed in any encoding (kd.secrets.redact) *before*
        the cut (a key straddling the cut would otherwise leak its head), whitespace folded (an HTML error page spans
        lines). Only a bounded head is looked at: what is shown is `limit` characters."""
        return " ".join(redact(text[:MAX_ERROR_BYTES]).split())[:limit]


def body_cap(body: dict[str, Any]) -> int:
    """The most bytes an answer to `body` is read to: room for an answer of OVERSIZE_CHARS_PER_TOKEN characters
    a token, each JSON-escaped (`\\uXXXX`, 6 bytes, 12 for a surrogate pair), or for vLLM's prompt log-probs."""
    cap = MAX_BODY_BASE + 12 * OVERSIZE_CHARS_PER_TOKEN * int(body.get("max_tokens") or 0)
    if body.get("prompt_logprobs"):
        cap += len(body.get("prompt") or ()) * (int(body["prompt_logprobs"]) + 1) * LOGPROB_ENTRY_BYTES
    return cap


async def read_capped(r: httpx.Response, cap: int) -> tuple[bytes, bool]:
    """(the body, or its first `cap` bytes; whether it was longer). A declared Content-Length over the cap is not
    read at all; a body without one (chunked, compressed) is read until the cap is passed."""
    declared = r.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > cap and not r.headers.get("content-encoding"):
        return b"", True
    chunks, size = [], 0
    async for chunk in r.aiter_bytes():
        chunks.append(chunk)
        size += len(chunk)
        if size > cap:
            return b"".join(chunks)[:cap], True
    return b"".join(chunks), False


def about_the_request(status: int, body: str) -> Reason | None:
    """Why a 4xx answer rejects only its own record (`too_long`, `refused_by_server`), or None: it fails the stage."""
    if status not in REQUEST_STATUS or _NOT_THE_REQUEST.search(body):
        return None
    return "too_long" if status == 413 or _TOO_LONG.search(body) else "refused_by_server"


def _retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def parse_completion(content: bytes, served_at: str) -> dict[str, Any]:
    """The one answer of a chat-completions body, with who gave it; raises ValueError when it is not one."""
    content = scrub_known_bytes(content)  # a server echoing the key in an answer must not put it in the cache
    try:
        data = json.loads(content)
        choice = data["choices"][0]
        text = choice["message"]["content"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, IndexError, TypeError) as e:
        raise ValueError(f"{type(e).__name__}: body of {len(content)} bytes is not a chat completion") from None
    if not isinstance(text, str):
        raise ValueError("message.content is not a string")
    finish = choice.get("finish_reason") or "stop"
    usage = data.get("usage")
    usage = usage if isinstance(usage, dict) else {}
    model = data.get("model")
    counts = {k: token_count(usage.get(k)) for k in ("prompt_tokens", "completion_tokens")}
    answer = {"text": text, "finish_reason": _printable(str(finish)[:100]),
              "served_by": {"endpoint": served_at, "model": _printable(model[:200]) if isinstance(model, str) else None},
              "usage": {k: v or 0 for k, v in counts.items()}}
    if bad := [k for k, v in counts.items() if v is None]:
        answer["usage_note"] = (f"usage {', '.join(f'{k}={_printable(str(usage[k])[:40])}' for k in bad)} is not a "
                                f"token count (0 to {MAX_USAGE_TOKENS:,}); counted as 0")
    return answer


def token_count(value: Any) -> int | None:
    """A usage number as an int (missing: 0), or None when it is not a plausible count: inf, NaN, negative,
    fractional, a word, a bool, over MAX_USAGE_TOKENS. Numeric strings are taken (some servers send them)."""
    if value is None:
        return 0
    if isinstance(value, str) and value.strip().isdigit() and len(value.strip()) <= 12:
        value = int(value.strip())
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if type(value) is int and 0 <= value <= MAX_USAGE_TOKENS:
        return value
    return None


def _printable(text: str) -> str:
    """A server's string fit to print: no control characters (a terminal escape must not reach `kd audit`)."""
    return "".join(c for c in text if c.isprintable())
