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
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kd.errors import KdError
from kd.paths import CACHE_DIR
from kd.records import canonical_json, sha256_text, write_probe

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

    def note(self) -> str:
        """`; 2 damaged cache entries asked again` for a stage's summary line, or "" when none was damaged."""
        n = len(self.corrupted)
        return f"; {n} damaged cache entr{'y' if n == 1 else 'ies'} asked again" if n else ""


class RequestCache:
    """Answers by request key. `get` verifies an entry; `put` persists one atomically."""

    def __init__(self, directory: Path | str = CACHE_DIR) -> None:
        self.dir = Path(directory)
        self.stats = CacheStats()

    def path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        """The cached response for `key`, or None (a damaged or unreadable entry is reported, removed and missed)."""
        entry = self.read(key)
        return None if entry is None else entry["response"]

    def read(self, key: str) -> dict[str, Any] | None:
        """The whole verified entry for `key` (request and response), or None, as `get` treats it."""
        path = self.path(key)
        try:
            raw = path.read_bytes()
        except (FileNotFoundError, NotADirectoryError):  # no entry there (NotADirectory: no cache)
            self.stats.misses += 1
            return None
        except OSError as e:  # permission denied, a directory in its place, an I/O error: damaged, not fatal
            raw, problem = b"", unreadable(e)
        else:
            problem = check_entry(raw, key)
        if problem:
            self.stats.corrupted.append(key)
            self.stats.misses += 1
            try:
                path.unlink(missing_ok=True)
                done = "removed it"
            except OSError:  # a read-only cache: ensure_writable stops the stage before anything is asked
                done = "could not remove it"
            print(f"kd: cache entry {path} is damaged ({problem}); {done}, asking the teacher again", file=sys.stderr)
            return None
        self.stats.hits += 1
        return parse_json(raw)

    def get_entry(self, key: str) -> dict[str, Any] | None:
        """The whole entry (request and response), for tools that show what was asked; None if absent or damaged."""
        try:
            raw = self.path(key).read_bytes()
        except OSError:
            return None
        return None if check_entry(raw, key) else parse_json(raw)

    def present(self, keys: Iterable[str]) -> dict[str, tuple[int, int, int]]:
        """For each key with an entry: (prompt characters, prompt_tokens, completion_tokens); entries not verified."""
        out = {}
        for key in keys:
            try:
                raw = self.path(key).read_bytes()
            except OSError:
                continue
            try:
                entry = parse_json(raw)
                usage = entry["response"]["usage"]
                chars = sum(len(m.get("content", "")) for m in entry["request"].get("messages") or [])
                out[key] = (chars, int(usage["prompt_tokens"]), int(usage["completion_tokens"]))
            except (ValueError, KeyError, TypeError, AttributeError):
                out[key] = (0, 0, 0)  # there but damaged: the reader that verifies it reports it and asks again
        return out

    def ensure_writable(self) -> None:
        """Raise KdError naming the directory unless answers can be persisted in it. Called before the first
        request is sent, so a read-only cache stops a stage before any answer is paid for and lost."""
        probe_writable(self.dir, "request cache")
        for sub in self.dir.iterdir():  # entries land in <key[:2]>/: one of those read-only fails the same way
            if sub.is_dir() and len(sub.name) == 2 and not os.access(sub, os.W_OK):
                raise KdError(f"{sub}: the request cache directory is not writable; make it writable "
                              f"(chmod -R u+w {self.dir})")

    def put(self, key: str, request: dict[str, Any], response: dict[str, Any]) -> None:
        """Persist one answer now (temporary file + rename); safe under concurrent writers."""
        body = {"request": request, "response": response}
        entry = {"cache_format": CACHE_FORMAT, "key": key, "checksum": sha256_text(canonical_json(body)), **body}
        path = self.path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{key[:16]}.", suffix=".tmp", dir=path.parent)
        except OSError as e:
            raise KdError(f"{path.parent}: cannot write to the request cache "
                          f"({e.strerror or type(e).__name__})") from None
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(canonical_json(entry))
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self.stats.written += 1


def probe_writable(directory: Path, what: str) -> None:
    """Raise KdError naming `directory` unless a file can be created in it (created if missing)."""
    if directory.exists() and not directory.is_dir():
        raise KdError(f"{directory}: the {what} is a file, not a directory; move it away so kd can create it")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        write_probe(directory)
    except OSError as e:
        raise KdError(f"{directory}: the {what} directory is not writable ({e.strerror or type(e).__name__}); "
                      f"make it writable (chmod -R u+w {directory})") from None


def unreadable(e: OSError) -> str:
    return f"unreadable: {e.strerror or type(e).__name__}"


class NotJson(ValueError):
    """NaN, Infinity or -Infinity in a file: Python's json reads them, JSON (and canonical_json) does not."""


def _no_constant(name: str) -> Any:
    raise NotJson(f"holds {name}, which JSON does not allow")


def parse_json(raw: bytes) -> Any:
    """Strict JSON: Python's json accepts NaN and Infinity, which no kd writer emits (canonical_json refuses them)."""
    return json.loads(raw, parse_constant=_no_constant)


def check_entry(raw: bytes, key: str) -> str | None:
    """Why an entry cannot be trusted for `key`, or None: the one schema check behind every reader (stages,
    `kd cache verify`, push and pull). Never raises, whatever the bytes."""
    try:
        entry = parse_json(raw)
    except NotJson as e:
        return str(e)
    except UnicodeDecodeError:
        return "not UTF-8"
    except (ValueError, RecursionError):
        return "not valid JSON: truncated or overwritten"
    if not isinstance(entry, dict) or entry.get("key") != key:
        return "its key does not match its file name"
    if entry.get("cache_format") != CACHE_FORMAT:
        return f"cache format {entry.get('cache_format')!r}, expected {CACHE_FORMAT}"
    request, response = entry.get("request"), entry.get("response")
    if not isinstance(request, dict) or not isinstance(response, dict):
        return "no request or no response"
    if entry.get("checksum") != sha256_text(canonical_json({"request": request, "response": response})):
        return "checksum mismatch"
    if request_key(request) != key:
        return "the request it holds does not hash to its key"
    if not isinstance(response.get("text"), str):
        return "no response text"
    if not isinstance(response.get("finish_reason"), str):
        return "no finish_reason"
    usage = response.get("usage")
    if not isinstance(usage, dict) or not {"prompt_tokens", "completion_tokens"} <= usage.keys():
        return "no usage (prompt_tokens, completion_tokens)"
    if not all(type(v) is int and v >= 0 for v in usage.values()):
        return "usage holds something other than token counts"
    return None
