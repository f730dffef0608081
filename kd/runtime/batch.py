"""`mode: batch` of an `openai` teacher: the uncached requests go up as Batch API jobs at half the price.

One job per up to MAX_REQUESTS requests: the JSONL input file is uploaded (`POST /files`, purpose=batch), the batch
created (`POST /batches`, endpoint /v1/chat/completions, completion window 24h), and its id, input file id and
request keys are written durably to `.kd/batches/<batch id>.json` BEFORE any wait. A stage killed while it waits
finds that file on the rerun and polls the same batch: a request is never submitted twice. Polls back off from
`poll_s` by 1.5x up to `poll_max_s`. When the batch ends, its output and error files are read line by line and each
answer goes through `on_result` (and so into the request cache) as it is parsed, checked exactly like an online
answer (`custom_id` is the request key). A per-request error about the request itself (too long, refused) becomes
a rejection as online (kd.runtime.refusals); a failed, expired or cancelled batch fails the stage in one line,
the answers it did return cached. The state file goes once its batch is collected, so a rerun after a failure
submits what is still missing as a new batch.

A stage killed in the instant between creating a batch and writing its file leaves that batch unrecorded (it is
submitted again on the rerun); the window is one fsync long.
"""

from __future__ import annotations

import json
import os
import random
import re
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import httpx

from kd.config import OpenAITeacher as OpenAIConfig
from kd.errors import KdError, TeacherError
from kd.paths import BATCHES_DIR
from kd.runtime.openai import RETRY_STATUS, OpenAITeacher, about_the_request, parse_completion
from kd.runtime.refusals import MAX_ERROR_CHARS, refused
from kd.secrets import redact

MAX_REQUESTS = 50_000  # OpenAI's limit on requests in one batch
ENDPOINT = "/v1/chat/completions"
ENDED = ("completed", "failed", "expired", "cancelled")


class BatchTeacher:
    """An OpenAI-compatible teacher asked through its Batch API; same identity and answers as the online one."""

    def __init__(self, name: str, cfg: OpenAIConfig, root: Path) -> None:
        self.name, self.cfg = name, cfg
        self.online = OpenAITeacher(name, cfg)  # the request bodies, the key and the answer checks
        self.dir = root / BATCHES_DIR
        self.submitted: list[str] = []  # batch ids created by this process
        self.resumed: list[str] = []  # batch ids found in .kd/batches and polled again

    @property
    def identity(self) -> dict[str, Any]:
        return self.online.identity

    def generate(self, items: Iterable[tuple[str, dict[str, Any]]], on_result: Any) -> None:
        items = list(items)  # one batch file holds them all
        if not items:
            return
        wanted = dict(items)
        with httpx.Client(base_url=self.cfg.base_url.rstrip("/") + "/", headers=self.online.headers(),
                          timeout=httpx.Timeout(self.cfg.timeout_s)) as client:
            jobs = [j for j in self._pending() if not wanted.keys().isdisjoint(j["keys"])]
            self.resumed = [j["batch_id"] for j in jobs]
            covered = {k for j in jobs for k in j["keys"]}
            rest = [(k, r) for k, r in items if k not in covered]
            for i in range(0, len(rest), MAX_REQUESTS):
                jobs.append(self._submit(client, rest[i:i + MAX_REQUESTS]))
            for job in jobs:
                self._collect(client, job, wanted, on_result)

    # ------------------------------------------------------------------------------------------ submitting

    def _pending(self) -> list[dict[str, Any]]:
        """Batches this teacher's server holds for this project that were not collected yet."""
        jobs = []
        for path in sorted(self.dir.glob("*.json")):
            try:
                job = json.loads(path.read_text(encoding="utf-8"))
                mine = job["endpoint"] == self.online.endpoint and job["model"] == self.cfg.model
                job["keys"], job["batch_id"]  # noqa: B018 -- both must be there
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise KdError(f"{path}: unreadable batch record ({type(e).__name__}); delete it to submit its "
                              f"requests anew") from None
            if mine:
                jobs.append(job)
        return jobs

    def _submit(self, client: httpx.Client, items: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
        lines = (json.dumps({"custom_id": k, "method": "POST", "url": ENDPOINT, "body": self.online.body(k, r)},
                            sort_keys=True, ensure_ascii=False) for k, r in items)
        data = ("\n".join(lines) + "\n").encode()
        file = self._call(client, "POST", "files", data={"purpose": "batch"},
                          files={"file": ("kd-batch.jsonl", data, "application/jsonl")})
        batch = self._call(client, "POST", "batches", json={"input_file_id": file["id"], "endpoint": ENDPOINT,
                                                            "completion_window": "24h"})
        job = {"batch_id": str(batch["id"]), "input_file_id": str(file["id"]), "endpoint": self.online.endpoint,
               "model": self.cfg.model, "teacher": self.name, "keys": [k for k, _ in items]}
        self._record(job)
        self.submitted.append(job["batch_id"])
        return job

    def _record(self, job: dict[str, Any]) -> None:
        """Write the job's file durably (temp file, fsync, rename, fsync of the directory) before any wait."""
        self.dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".tmp-")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(job, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._path(job))
        dfd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def _path(self, job: dict[str, Any]) -> Path:
        return self.dir / (re.sub(r"[^A-Za-z0-9_-]", "_", job["batch_id"])[:200] + ".json")

    # ------------------------------------------------------------------------------------------ collecting

    def _collect(self, client: httpx.Client, job: dict[str, Any], wanted: dict[str, Any], on_result: Any) -> None:
        bid, delay = job["batch_id"], self.cfg.poll_s
        while (batch := self._call(client, "GET", f"batches/{bid}")).get("status") not in ENDED:
            time.sleep(delay)
            delay = min(delay * 1.5, self.cfg.poll_max_s)
        seen: set[str] = set()
        for fid in (batch.get("output_file_id"), batch.get("error_file_id")):
            if fid:
                for line in self._call(client, "GET", f"files/{fid}/content", raw=True).splitlines():
                    if line.strip():
                        self._answer(line, wanted, seen, on_result)
        status = batch["status"]
        missing = sum(1 for k in job["keys"] if k in wanted and k not in seen)
        self._path(job).unlink(missing_ok=True)  # collected: a rerun submits what is still missing anew
        if status != "completed":
            why = "; ".join(str(e.get("message", e))[:200] for e in (batch.get("errors") or {}).get("data") or [])
            raise TeacherError(f"teacher '{self.name}' ({self.online.endpoint}): batch {bid} {status}"
                               f"{': ' + self.online.scrub(why, 300) if why else ''}; {len(seen)} answers it "
                               f"returned are cached, {missing} requests unanswered: rerun to submit them anew")
        if missing:
            raise TeacherError(f"teacher '{self.name}' ({self.online.endpoint}): batch {bid} completed without "
                               f"{missing} of its answers; the others are cached: rerun to submit those anew")

    def _answer(self, line: bytes, wanted: dict[str, Any], seen: set[str], on_result: Any) -> None:
        """One line of an output or error file: an answer, a rejection, or (unusable) nothing: asked again later."""
        try:
            row = json.loads(line)
            key, response = row["custom_id"], row.get("response") or {}
        except (ValueError, KeyError, TypeError):
            return
        if key not in wanted or key in seen or not isinstance(response, dict):
            return
        status, body = response.get("status_code"), response.get("body")
        if status == 200:
            try:
                answer = self.online.checked(parse_completion(json.dumps(body).encode(), self.online.endpoint),
                                             self.online.body(key, wanted[key]))  # oversized: a rejection here too
            except ValueError:
                return  # unreadable: left unanswered, so the stage fails and a rerun asks it again
        elif isinstance(status, int):
            text = json.dumps(body) if not isinstance(body, str) else body
            reason = about_the_request(status, text)
            if reason is None:
                raise TeacherError(f"teacher '{self.name}' ({self.online.endpoint}) refused a batch request with "
                                   f"HTTP {status}: {self.online.scrub(text, 300)}")
            answer = refused(reason, redact(f"HTTP {status}: {self.online.scrub(text, MAX_ERROR_CHARS)}"))
        else:
            return  # no response at all (e.g. the batch expired before it): unanswered
        seen.add(key)
        on_result(key, answer)

    def _call(self, client: httpx.Client, method: str, path: str, raw: bool = False, **kw: Any) -> Any:
        """One Batch API call, retried like an online request on 408/409/429/5xx and dropped connections."""
        last = "no attempt made"
        for attempt in range(1, self.cfg.max_attempts + 1):
            try:
                r = client.request(method, path, **kw)
            except httpx.TransportError as e:
                last = f"connection error ({type(e).__name__}: {self.online.scrub(str(e), 200)})"
            else:
                if r.status_code == 200:
                    if raw:
                        return r.content
                    try:
                        data = r.json()
                    except ValueError:
                        data = None
                    if isinstance(data, dict) and "id" in data:
                        return data
                    last = f"unreadable response to {method} /{path}"
                elif r.status_code in RETRY_STATUS or r.status_code >= 500:
                    last = f"HTTP {r.status_code}: {self.online.scrub(r.text, 200)}"
                else:
                    raise TeacherError(f"teacher '{self.name}' ({self.online.endpoint}): {method} /{path} got HTTP "
                                       f"{r.status_code}: {self.online.scrub(r.text, 300)}")
            if attempt < self.cfg.max_attempts:
                time.sleep(random.uniform(0, min(self.cfg.backoff_max_s, self.cfg.backoff_s * 2 ** (attempt - 1))))
        raise TeacherError(f"teacher '{self.name}' ({self.online.endpoint}): {method} /{path} failed "
                           f"{self.cfg.max_attempts} times; last: {last}. Rerun to resume.")
