"""The `openai` backend: any OpenAI-compatible chat-completions server (OpenAI, vLLM, llama.cpp, Ollama).

Requests run concurrently on one asyncio loop, bounded by `concurrency`, so throughput is set by the
server. This is the only retry layer: exponential backoff with full jitter on 408/409/429/5xx, timeouts,
dropped connections and unreadable bodies; `Retry-After` honoured up to a cap. A 400/413/422 is about the
request itself (too long for the context, invalid, content filter): that one record is rejected
(kd.runtime.refusals) and the stage goes on. Other 4xx (401/403 keys, 404 unknown model) fail at once.
The API key is read from the environment variable the params name and lives only in this object.

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
import time
from collections.abc import Iterable
from typing import Any

import httpx
from pydantic import SecretStr

from kd.config import OpenAITeacher as OpenAIConfig
from kd.errors import KdError, TeacherError
from kd.runtime.refusals import MAX_ERROR_CHARS, Reason, refused
from kd.secrets import REDACTED, endpoint, looks_like_key, redact

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
            self._key = SecretStr(value)
        self.requests_sent = 0

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
        for attempt in range(1, self.cfg.max_attempts + 1):
            retry_after = None
            try:
                self.requests_sent += 1
                r = await client.post(path, json=body)
            except httpx.TimeoutException:
                last = f"timed out after {self.cfg.timeout_s:g} s"
            except httpx.TransportError as e:
                last = f"connection error ({type(e).__name__}: {self.scrub(str(e), 200)})"
            else:
                if r.status_code == 200:
                    try:
                        return parse(r.content, self.endpoint)
                    except ValueError as e:
                        last = f"unreadable response ({e})"
                elif r.status_code in RETRY_STATUS or r.status_code >= 500:
                    last = f"HTTP {r.status_code}: {self.scrub(r.text, 200)}"
                    retry_after = _retry_after(r.headers.get("retry-after"))
                else:
                    message = redact(f"HTTP {r.status_code}: {self.scrub(r.text, MAX_ERROR_CHARS)}")
                    if reason := about_the_request(r.status_code, r.text):
                        return refused(reason, message)
                    raise TeacherError(f"teacher '{self.name}' ({self.endpoint}) refused a request with HTTP "
                                       f"{r.status_code}: {self.scrub(r.text, 300)}")
            if attempt == self.cfg.max_attempts:
                break
            backoff = random.uniform(0, min(self.cfg.backoff_max_s, self.cfg.backoff_s * 2 ** (attempt - 1)))
            delay = min(retry_after, self.cfg.retry_after_max_s) if retry_after is not None else backoff
            await asyncio.sleep(delay)
        raise TeacherError(f"teacher '{self.name}' ({self.endpoint}): a request failed {self.cfg.max_attempts} "
                           f"times; last: {last}. Answers received so far are cached: rerun to resume.")

    def scrub(self, text: str, limit: int) -> str:
        """A server's text made fit for a one-line error: key removed *before* the cut (a key straddling the
        cut would otherwise leak its head), whitespace folded (an HTML error page spans lines)."""
        if self._key and self._key.get_secret_value() in text:
            text = text.replace(self._key.get_secret_value(), "***")
        return " ".join(text.split())[:limit]


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
    try:
        data = json.loads(content)
        choice = data["choices"][0]
        text = choice["message"]["content"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, IndexError, TypeError) as e:
        raise ValueError(f"{type(e).__name__}: body of {len(content)} bytes is not a chat completion") from None
    if not isinstance(text, str):
        raise ValueError("message.content is not a string")
    finish = choice.get("finish_reason") or "stop"
    usage = data.get("usage") or {}
    model = data.get("model")
    return {"text": text, "finish_reason": str(finish),
            "served_by": {"endpoint": served_at, "model": _printable(model[:200]) if isinstance(model, str) else None},
            "usage": {"prompt_tokens": int(usage.get("prompt_tokens") or 0),
                      "completion_tokens": int(usage.get("completion_tokens") or 0)}}


def _printable(text: str) -> str:
    """A server's string fit to print: no control characters (a terminal escape must not reach `kd audit`)."""
    return "".join(c for c in text if c.isprintable())
