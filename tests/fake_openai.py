"""A fake OpenAI-compatible chat-completions server for tests and benchmarks (stdlib only).

    with FakeOpenAI(latency_s=0.2, faults=["429", "500"]) as server:
        ... OpenAITeacher(base_url=server.url, ...) ...
        assert server.received == 3

Answers are deterministic per request content ("Answer: " + the last user message reversed), and so are
the usage numbers. `faults` are consumed one per request in arrival order, then requests are answered
normally:

    "429"        status 429 with `Retry-After: 0.05`
    "500", "503" server errors (retryable), JSON error bodies
    "502"        a reverse proxy's multi-line HTML "Bad Gateway" page (retryable)
    "400", "401" client errors (not retryable)
    "403", "404" forbidden, model not found (not retryable)
    "context"    400 `context_length_exceeded` in OpenAI's words (the request is too long for the model)
    "filter"     400 `content_filter` (the server refuses this request's content)
    "timeout"    sleep `timeout_sleep_s` (longer than the client's timeout), then answer
    "truncated"  status 200 announcing the full Content-Length, half the JSON bytes sent, connection closed
    "length"     a complete answer with finish_reason "length"
    "ok"         a normal answer (a placeholder, to place a fault later in the order)

`kill_pid_at=N`: when request N+1 arrives, SIGKILL is sent to `server.kill_pid` before it is answered, so
exactly N requests were answered before the kill. `api_key`: requests without `Authorization: Bearer
<api_key>` get 401 (whose body echoes the key it got, as real servers partly do, to test scrubbing).
`served_model`: the model name its answers report (OpenAI reports a dated snapshot of the one asked for).

Hostile servers: `echo(key)` (the key a request carried) gives raw JSON text that 401 and "context" error
messages end with, put into the body unescaped, so it may hold the key JSON-escaped (`\\/`, `\\u002d`),
percent-encoded or in base64 as a server would echo it. `usage_json`: the raw JSON text of every answer's `usage`
(`{"prompt_tokens": 1e400}` cannot be written with json.dumps).

Batch API (`/v1/files`, `/v1/batches`): an uploaded JSONL file becomes a batch that reports `in_progress` for
`batch_polls` polls, then `batch_end` ("completed", or "failed"/"expired"/"cancelled": no output). Its lines are
answered like online requests; `batch_faults` are consumed one per line ("context", "filter": the line goes to the
error file with a 400). `kill_on_poll`: SIGKILL `kill_pid` at the first poll. Counters: `uploads`,
`batches_created`, `polls`, `batch_lines`.

`prompt_logprobs(ids, k)`: makes it also serve POST /v1/completions the way vLLM does for a `prompt` of token ids
and `prompt_logprobs: k` (a list with None first, then per position a {"<id>": {"logprob", "rank"}} map of the top
k plus the prompt's own token); `model_prompt_logprobs(model_dir)` computes them with a real local model.
Faults, counts and bodies are shared with chat completions.

Run by hand: `python tests/fake_openai.py --port 8000 --latency 0.2` (blocks; Ctrl-C stops it).
"""

from __future__ import annotations

import argparse
import email.policy
import json
import os
import select
import signal
import socket
import threading
import time
from collections.abc import Callable
from email.parser import BytesParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

FAULTS = ("429", "500", "502", "503", "400", "401", "403", "404", "context", "filter", "timeout", "truncated",
          "length", "ok")


def default_answer(messages: list[dict[str, Any]]) -> str:
    """Deterministic per request: the last user message reversed."""
    users = [m.get("content", "") for m in messages if m.get("role") == "user"]
    return "Answer: " + (users[-1] if users else "")[::-1]


def _tokens(text: str) -> int:
    return len(text.split())


class FakeOpenAI:
    """A threaded HTTP server on 127.0.0.1 (free port) speaking POST /v1/chat/completions."""

    def __init__(self, latency_s: float = 0.0, faults: list[str] | None = None,
                 answer: Callable[[list[dict[str, Any]]], str] | None = None,
                 kill_pid_at: int | None = None, api_key: str | None = None,
                 served_model: str | None = None, port: int = 0,
                 prompt_logprobs: Callable[[list[int], int], list[Any]] | None = None, max_logprobs: int = 20,
                 echo: Callable[[str], str] | None = None, usage_json: str | None = None) -> None:
        unknown = [f for f in faults or [] if f not in FAULTS]
        if unknown:
            raise ValueError(f"unknown fault(s) {unknown}; known: {', '.join(FAULTS)}")
        self.latency_s = latency_s
        self.faults = list(faults or [])
        self.answer = answer or default_answer
        self.kill_pid_at = kill_pid_at
        self.kill_pid: int | None = None
        self.api_key = api_key
        self.served_model = served_model  # the `model` its answers report; None: the requested one (as vLLM does)
        self.port = port  # 0: a free one
        self.prompt_logprobs = prompt_logprobs
        self.max_logprobs = max_logprobs  # vLLM's --max-logprobs: asking for more is a 400
        self.echo = echo
        self.usage_json = usage_json
        self.timeout_sleep_s = 2.0  # how long a "timeout" fault stalls before answering anyway
        self.received = 0  # POSTs to /v1/chat/completions (and /v1/completions when served)
        self.answered = 0  # complete, valid 200 completions sent
        self.in_flight = 0
        self.max_in_flight = 0
        self.killed = False
        self.arrivals: list[float] = []  # time.monotonic() of each POST, in arrival order
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.batch_polls = 1
        self.batch_end = "completed"
        self.batch_faults: list[str] = []
        self.kill_on_poll = False
        self.uploads = self.batches_created = self.polls = self.batch_lines = 0
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self.url = ""
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------------------ lifecycle

    def start(self, port: int | None = None) -> FakeOpenAI:
        handler = type("Handler", (_Handler,), {"fake": self})
        self._httpd = _Server(("127.0.0.1", self.port if port is None else port), handler)
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-openai", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------------------------------ behaviour

    def _arrive(self, body: dict[str, Any], headers: dict[str, str]) -> tuple[str | None, bool]:
        """Count a request; return (its fault or None, whether to kill the client now)."""
        with self._lock:
            self.received += 1
            self.arrivals.append(time.monotonic())
            self.bodies.append(body)
            self.headers.append(headers)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            fault = self.faults.pop(0) if self.faults else None
            kill = self.kill_pid_at is not None and self.received == self.kill_pid_at + 1 and not self.killed
            if kill:
                self.killed = True
            return fault, kill

    def completion(self, body: dict[str, Any], finish_reason: str = "stop") -> dict[str, Any]:
        if "prompt" in body:
            return self.text_completion(body)
        messages = body.get("messages") or []
        text = self.answer(messages)
        prompt_tokens = sum(_tokens(str(m.get("content", ""))) for m in messages)
        return {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": 0,
            "model": self.served_model or body.get("model", "fake"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish_reason}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": _tokens(text),
                      "total_tokens": prompt_tokens + _tokens(text)},
        }


    def text_completion(self, body: dict[str, Any]) -> dict[str, Any]:
        """vLLM's answer to a `prompt` of token ids with `prompt_logprobs`."""
        ids = body["prompt"]
        k = body.get("prompt_logprobs")
        return {"id": "cmpl-fake", "object": "text_completion", "created": 0,
                "model": self.served_model or body.get("model", "fake"),
                "choices": [{"index": 0, "text": "", "logprobs": None, "finish_reason": "length",
                             "prompt_logprobs": self.prompt_logprobs(ids, k) if k is not None else None}],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": 1, "total_tokens": len(ids) + 1}}


def model_prompt_logprobs(model_dir: Any) -> Callable[[list[int], int], list[Any]]:
    """vLLM-shaped prompt log-probs of a local transformers model (float32, one sequence per request)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    lock = threading.Lock()  # one forward at a time: the handler threads share the model

    def compute(ids: list[int], k: int) -> list[Any]:
        with lock, torch.inference_mode():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
        out: list[Any] = [None]
        for t in range(1, len(ids)):
            row = logp[t - 1]
            values, top = row.topk(k)
            entry = {str(i): {"logprob": float(v), "rank": r + 1, "decoded_token": ""}
                     for r, (v, i) in enumerate(zip(values.tolist(), top.tolist(), strict=True))}
            own = ids[t]
            if str(own) not in entry:  # vLLM adds the prompt's own token with its rank
                entry[str(own)] = {"logprob": float(row[own]), "rank": int((row > row[own]).sum()) + 1,
                                   "decoded_token": ""}
            out.append(entry)
        return out

    return compute


_ECHO = "@@fake-echo@@"  # stands for raw text put into a body after json.dumps

# What nginx sends when the model server behind it is down: several lines of HTML.
_BAD_GATEWAY = (b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
                b"<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n"
                b"</body>\r\n</html>\r\n")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients that time out and hang up are part of the tests, not errors


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like real servers
    fake: FakeOpenAI

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> bool:
        return self._send_raw(status, json.dumps(payload).encode(), "application/json", headers)

    def _send_raw(self, status: int, data: bytes, content_type: str,
                  headers: dict[str, str] | None = None) -> bool:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)
            self.wfile.flush()
            return True
        except OSError:  # the client gave up (timeout) and closed the connection
            self.close_connection = True
            return False

    def _peer_closed(self) -> bool:
        readable, _, _ = select.select([self.connection], [], [], 0)
        try:
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _error(self, status: int, message: str, kind: str, headers: dict[str, str] | None = None,
               code: str | int | None = None, echo: bool = False) -> None:
        if echo and self.fake.echo is not None:  # raw text after the message, as the server wrote it
            data = json.dumps({"error": {"message": message + _ECHO, "type": kind, "code": code or status}}).encode()
            got = self.headers.get("Authorization", "").removeprefix("Bearer ")
            self._send_raw(status, data.replace(_ECHO.encode(), self.fake.echo(got).encode()), "application/json",
                           headers)
            return
        self._send(status, {"error": {"message": message, "type": kind, "code": code or status}}, headers)

    def do_GET(self) -> None:
        _batch_get(self, self.fake)

    def do_POST(self) -> None:
        fake = self.fake
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        if self.path.rstrip("/") in ("/v1/files", "/v1/batches"):
            _batch_post(self, fake, raw)
            return
        routes = ("/v1/chat/completions",) + (("/v1/completions",) if fake.prompt_logprobs else ())
        if self.path.rstrip("/") not in routes:
            self._error(404, f"no route {self.path}", "not_found")
            return
        try:
            body = json.loads(raw)
        except json.JSONDecodeError:
            self._error(400, "body is not JSON", "invalid_request_error")
            return
        fault, kill = fake._arrive(body, dict(self.headers.items()))
        try:
            self._answer(fake, body, fault, kill)
        finally:
            with fake._lock:
                fake.in_flight -= 1

    def _answer(self, fake: FakeOpenAI, body: dict[str, Any], fault: str | None, kill: bool) -> None:
        if kill:
            if fake.kill_pid is not None:
                os.kill(fake.kill_pid, signal.SIGKILL)
            self.close_connection = True
            return
        if fake.latency_s:
            time.sleep(fake.latency_s)
        if fake.api_key is not None:
            auth = self.headers.get("Authorization", "")
            if auth != f"Bearer {fake.api_key}":
                got = auth.removeprefix("Bearer ")
                self._error(401, f"Incorrect API key provided: {got}", "invalid_api_key", echo=True)
                return
        match fault:
            case "429":
                self._error(429, "Rate limit reached; try again shortly", "rate_limit_exceeded",
                            {"Retry-After": "0.05"})
                return
            case "500" | "503" | "400" | "401":
                kind = "server_error" if fault.startswith("5") else "invalid_request_error"
                self._error(int(fault), f"fake fault {fault}", kind)
                return
            case "403" | "404":
                self._error(int(fault), f"fake fault {fault}: " + ("forbidden" if fault == "403" else
                            f"The model `{body.get('model')}` does not exist"), "invalid_request_error")
                return
            case "context":
                self._error(400, "This model's maximum context length is 8192 tokens. However, your messages resulted "
                            "in 9100 tokens. Please reduce the length of the messages.", "invalid_request_error",
                            code="context_length_exceeded", echo=True)
                return
            case "filter":
                self._error(400, "The response was filtered due to the prompt triggering content management policy.",
                            "invalid_request_error", code="content_filter")
                return
            case "502":
                self._send_raw(502, _BAD_GATEWAY, "text/html")
                return
            case "timeout":
                time.sleep(fake.timeout_sleep_s)
                if self._peer_closed():
                    self.close_connection = True
                    return  # the client gave up: nothing is answered
            case "truncated":
                data = json.dumps(fake.completion(body)).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                except OSError:
                    pass
                self.close_connection = True
                return
        if (body.get("prompt_logprobs") or 0) > fake.max_logprobs:  # vLLM's words
            self._error(400, f"Requested prompt logprobs of {body['prompt_logprobs']}, which is greater than max "
                        f"allowed: {fake.max_logprobs}", "BadRequestError")
            return
        finish = "length" if fault == "length" else "stop"
        # counted before the client can read the answer, taken back if it could not be sent: a test that reads
        # `answered` right after its reply raced this thread (under load it read 0 for an answer it had received)
        with fake._lock:
            fake.answered += 1
        if fake.usage_json is not None:
            data = json.dumps({**fake.completion(body, finish), "usage": _ECHO}).encode()
            sent = self._send_raw(200, data.replace(json.dumps(_ECHO).encode(), fake.usage_json.encode()),
                                  "application/json")
        else:
            sent = self._send(200, fake.completion(body, finish))
        if not sent:
            with fake._lock:
                fake.answered -= 1


def _multipart_file(handler: _Handler, raw: bytes) -> tuple[str, bytes]:
    """(purpose, file bytes) of a multipart upload."""
    msg = BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {handler.headers.get('Content-Type')}\r\n\r\n".encode() + raw)
    parts = {p.get_param("name", header="content-disposition"): p.get_payload(decode=True) for p in msg.iter_parts()}
    return (parts.get("purpose") or b"").decode(), parts.get("file") or b""


def _batch_post(handler: _Handler, fake: FakeOpenAI, raw: bytes) -> None:
    with fake._lock:
        if handler.path.rstrip("/") == "/v1/files":
            purpose, data = _multipart_file(handler, raw)
            if purpose != "batch" or not data:
                handler._error(400, "purpose must be batch and file non-empty", "invalid_request_error")
                return
            fake.uploads += 1
            fid = f"file-{len(fake.files)}"
            fake.files[fid] = data
            handler._send(200, {"id": fid, "object": "file", "purpose": "batch", "bytes": len(data)})
            return
        body = json.loads(raw)
        if body.get("input_file_id") not in fake.files or body.get("endpoint") != "/v1/chat/completions" \
                or body.get("completion_window") != "24h":
            handler._error(400, "bad batch request", "invalid_request_error")
            return
        fake.batches_created += 1
        bid = f"batch_{len(fake.batches)}"
        fake.batches[bid] = {"id": bid, "object": "batch", "status": "validating", "polls": 0,
                             "input_file_id": body["input_file_id"], "output_file_id": None, "error_file_id": None}
        handler._send(200, _public(fake.batches[bid]))


def _public(batch: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in batch.items() if k != "polls"}


def _run_batch(fake: FakeOpenAI, batch: dict[str, Any]) -> None:
    """Answer every line of the batch's input file into an output and an error file (under the lock)."""
    out, err = [], []
    for n, line in enumerate(fake.files[batch["input_file_id"]].splitlines()):
        req = json.loads(line)
        fake.batch_lines += 1
        fault = fake.batch_faults.pop(0) if fake.batch_faults else None
        if fault in ("context", "filter"):
            message = ("This model's maximum context length is 8192 tokens." if fault == "context"
                       else "The response was filtered due to the prompt triggering content management policy.")
            err.append({"id": f"batch_req_{n}", "custom_id": req["custom_id"],
                        "response": {"status_code": 400, "body": {"error": {"message": message,
                                                                            "type": "invalid_request_error"}}},
                        "error": None})
        else:
            out.append({"id": f"batch_req_{n}", "custom_id": req["custom_id"],
                        "response": {"status_code": 200, "body": fake.completion(req["body"])}, "error": None})
    for field, rows in (("output_file_id", out), ("error_file_id", err)):
        if rows:
            fid = f"file-{len(fake.files)}"
            fake.files[fid] = "".join(json.dumps(r) + "\n" for r in rows).encode()
            batch[field] = fid


def _batch_get(handler: _Handler, fake: FakeOpenAI) -> None:
    path = handler.path.rstrip("/")
    kill = False
    with fake._lock:
        if path.startswith("/v1/files/") and path.endswith("/content"):
            fid = path.removeprefix("/v1/files/").removesuffix("/content")
            if fid in fake.files:
                handler._send_raw(200, fake.files[fid], "application/jsonl")
            else:
                handler._error(404, f"no file {fid}", "not_found")
            return
        batch = fake.batches.get(path.removeprefix("/v1/batches/"))
        if batch is None:
            handler._error(404, f"no route {handler.path}", "not_found")
            return
        fake.polls += 1
        if fake.kill_on_poll and not fake.killed:
            fake.killed = kill = True
        else:
            batch["polls"] += 1
            if batch["status"] not in ("completed", "failed", "expired", "cancelled"):
                if batch["polls"] > fake.batch_polls:
                    batch["status"] = fake.batch_end
                    if fake.batch_end == "completed":
                        _run_batch(fake, batch)
                    elif fake.batch_end == "failed":
                        batch["errors"] = {"data": [{"code": "invalid_file", "message": "fake: the batch failed"}]}
                else:
                    batch["status"] = "in_progress"
    if kill:
        if fake.kill_pid is not None:
            os.kill(fake.kill_pid, signal.SIGKILL)
        handler.close_connection = True
        return
    handler._send(200, _public(batch))


def main() -> None:
    parser = argparse.ArgumentParser(description="fake OpenAI-compatible chat-completions server")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before each answer")
    parser.add_argument("--api-key", default=None, help="require `Authorization: Bearer <key>`")
    args = parser.parse_args()
    server = FakeOpenAI(latency_s=args.latency, api_key=args.api_key).start(args.port)
    print(f"fake OpenAI server at {server.url} (latency {args.latency:g} s); Ctrl-C stops it", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
