"""Content-addressed request cache (DESIGN.md §4).

One JSON file per request key under `.kd/cache/<key[:2]>/<key>.json`, written through a temporary file and
a rename as soon as the answer arrives: a SIGKILL loses at most the requests in flight, concurrent writers
never see half an entry, and a directory of immutable objects can be shared through a DVC remote.
Each entry carries the request it answers and a checksum, so a damaged entry is detected, reported,
removed and asked again instead of poisoning a dataset.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kd.paths import CACHE_DIR
from kd.records import canonical_json, sha256_text

CACHE_FORMAT = 1


def request_key(request: dict[str, Any]) -> str:
    """sha256 of exactly what determines an answer: backend, teacher identity, rendered messages,
    sampling params, sample index and response format (plus the cache format version)."""
    return sha256_text(canonical_json({**request, "cache_format": CACHE_FORMAT}))


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    written: int = 0
    corrupted: list[str] = field(default_factory=list)


class RequestCache:
    """Answers by request key. `get` verifies an entry; `put` persists one atomically."""

    def __init__(self, directory: Path | str = CACHE_DIR) -> None:
        self.dir = Path(directory)
        self.stats = CacheStats()

    def path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        """The cached response for `key`, or None (a damaged entry is reported, removed and missed)."""
        path = self.path(key)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            self.stats.misses += 1
            return None
        problem = check_entry(raw, key)
        if problem:
            self.stats.corrupted.append(key)
            self.stats.misses += 1
            print(f"kd: cache entry {path} is damaged ({problem}); removing it and asking the teacher again",
                  file=sys.stderr)
            path.unlink(missing_ok=True)
            return None
        self.stats.hits += 1
        return json.loads(raw)["response"]

    def get_entry(self, key: str) -> dict[str, Any] | None:
        """The whole entry (request and response), for tools that show what was asked."""
        path = self.path(key)
        if not path.exists():
            return None
        raw = path.read_bytes()
        return None if check_entry(raw, key) else json.loads(raw)

    def put(self, key: str, request: dict[str, Any], response: dict[str, Any]) -> None:
        """Persist one answer now (temporary file + rename); safe under concurrent writers."""
        body = {"request": request, "response": response}
        entry = {"cache_format": CACHE_FORMAT, "key": key, "checksum": sha256_text(canonical_json(body)), **body}
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{key[:16]}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(canonical_json(entry))
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self.stats.written += 1


def check_entry(raw: bytes, key: str) -> str | None:
    """Why an entry cannot be trusted for `key`, or None."""
    try:
        entry = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "not valid JSON: truncated or overwritten"
    if not isinstance(entry, dict) or entry.get("key") != key:
        return "its key does not match its file name"
    body = {"request": entry.get("request"), "response": entry.get("response")}
    if entry.get("checksum") != sha256_text(canonical_json(body)):
        return "checksum mismatch"
    if request_key(entry["request"]) != key:
        return "the request it holds does not hash to its key"
    response = entry["response"]
    if not isinstance(response, dict) or not isinstance(response.get("text"), str):
        return "no response text"
    return None
