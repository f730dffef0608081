"""Content-addressed request cache (DESIGN.md §4), packed into one SQLite database.

`.kd/cache/requests.sqlite3` holds one row per request key: the entry's bytes exactly as `canonical_json(entry)`
(request, response and a checksum, so `check_entry` stays the one check behind every reader), plus the columns a
forecast reads without parsing entries (prompt characters, token counts, the teacher identity).

Why SQLite (the standard library's `sqlite3`) rather than segment files of our own or LMDB: its transactions give
what a hand-written append-only format would have to re-implement — a torn write is rolled back on the next open,
never served; two processes (or threads) write at once under WAL with a busy timeout; a crash mid-migration or
mid-pull leaves every committed row and nothing else — and it is no new dependency. Measured in bench/cache.py.

- Each `put` commits at once (WAL, `synchronous=NORMAL`): a `kill -9` loses only the answers in flight. A power cut
  can lose the last transactions committed before it (never half of one: the WAL's checksums drop a torn tail).
- Entries are immutable: `INSERT OR IGNORE`, the first answer to a key wins.
- A damaged entry (bytes that fail `check_entry`) is reported once, deleted and missed, so it is asked again; a
  damaged database file stops with one line naming it and how to recover.
- A cache directory still in the one-file-per-request layout (`<key[:2]>/<key>.json`) is moved in once, when the
  cache is first opened (verified; inserted, committed, then the files removed: safe if killed midway).
- Remote sharing (packs of entries through the DVC remote) is kd/cache/share.py; this module keeps the local
  record of which packs were seen, so a second push or pull reads nothing again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sqlite3
import sys
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kd.errors import KdError
from kd.paths import CACHE_DIR
from kd.records import canonical_json, sha256_text, write_probe

CACHE_FORMAT = 1
DB_NAME = "requests.sqlite3"
LEGACY_NAME = re.compile(r"^[0-9a-f]{64}\.json$")  # the one-file-per-request layout, `<key[:2]>/<key>.json`
CHUNK = 500  # keys per `IN (...)`: under SQLite's 999 bound parameters of older builds

SCHEMA = """
CREATE TABLE IF NOT EXISTS teachers (id INTEGER PRIMARY KEY, identity TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS packs (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, complete INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    key TEXT PRIMARY KEY NOT NULL,
    teacher INTEGER NOT NULL,
    prompt_chars INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    entry BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_teacher ON entries (teacher);
CREATE TABLE IF NOT EXISTS pack_entries (entry INTEGER NOT NULL, pack INTEGER NOT NULL, PRIMARY KEY (entry, pack))
    WITHOUT ROWID;
"""
# The entry's bytes come last so the small columns are read without touching overflow pages. A rowid table with the
# key's unique index, 16 KiB pages: the smallest on disk of the layouts measured (bench/README.md).


def request_key(request: dict[str, Any]) -> str:
    """sha256 of exactly what determines an answer: backend, teacher identity, rendered messages,
    sampling params, sample index and response format (plus the cache format version)."""
    return sha256_text(canonical_json({**request, "cache_format": CACHE_FORMAT}))


def make_entry(key: str, request: dict[str, Any], response: dict[str, Any]) -> bytes:
    """canonical_json of the entry, serialising the body once: the entry's sorted members are cache_format,
    checksum and key, then exactly the body's request and response."""
    body = canonical_json({"request": request, "response": response})
    return (f'{{"cache_format":{CACHE_FORMAT},"checksum":"{sha256_text(body)}","key":"{key}",' + body[1:]).encode()


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
    """Answers by request key. `get` verifies an entry; `put` persists one at once. Safe from several threads
    (one connection behind a lock) and several processes (SQLite's locking)."""

    def __init__(self, directory: Path | str = CACHE_DIR) -> None:
        self.dir = Path(directory)
        self.db = self.dir / DB_NAME
        self.stats = CacheStats()
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        self._pid = 0
        self._writable = False
        self._teachers: dict[str, int] = {}

    # -- connection -------------------------------------------------------------------------------------------------

    def _open(self, write: bool) -> sqlite3.Connection | None:
        """The connection (opened on first use), or None when reading a cache that does not exist. Opening
        writable creates the database and moves legacy files in; read-only serves a read-only directory."""
        if self._conn is not None and self._pid == os.getpid() and (self._writable or not write):
            return self._conn
        if write:
            probe_writable(self.dir, "request cache")
        elif not self.db.is_file():
            if self.dir.is_dir() and legacy_files(self.dir) and os.access(self.dir, os.W_OK):
                return self._open(True)
            return None
        writable = write or (os.access(self.dir, os.W_OK) and (not self.db.exists() or os.access(self.db, os.W_OK)))
        try:
            conn = self._connect(writable)
        except sqlite3.DatabaseError as e:
            raise self.failure(e) from None
        if self._conn is not None and self._pid == os.getpid():
            self._conn.close()  # a read-only connection, reopened to write
        self._conn, self._pid, self._writable, self._teachers = conn, os.getpid(), writable, {}
        if writable:
            self._migrate()
        return conn

    def _connect(self, writable: bool) -> sqlite3.Connection:
        if writable:
            conn = sqlite3.connect(self.db, timeout=60, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA busy_timeout = 60000")
            if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                conn.execute("PRAGMA page_size = 16384")  # before the first table; a no-op on an existing file
                conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.executescript(SCHEMA)
            return conn
        uri = self.db.resolve().as_uri()
        try:
            return _read_only(uri + "?mode=ro")
        except sqlite3.OperationalError:  # WAL's -shm cannot be made in a read-only directory, where no one writes
            return _read_only(uri + "?mode=ro&immutable=1")

    def failure(self, e: sqlite3.Error) -> KdError:
        """One line naming the database for an error SQLite raised: read-only, locked, or a damaged file."""
        msg = str(e)
        if "readonly" in msg or "read-only" in msg:
            return KdError(f"{self.db}: the request cache is not writable ({msg}); make it writable "
                           f"(chmod -R u+w {self.dir})")
        if "locked" in msg or "unable to open" in msg:
            return KdError(f"{self.db}: cannot use the request cache ({msg})")
        return KdError(f"{self.db}: the request cache database is damaged ({msg}); move it away "
                       f"(mv {self.db} {self.db}.damaged) and `kd cache pull` or rebuild to fill a new one")

    def _run(self, write: bool, sql: str, args: Iterable[Any] = ()) -> list[Any]:
        with self._lock:
            conn = self._open(write)
            if conn is None:
                return []
            try:
                return conn.execute(sql, tuple(args)).fetchall()
            except sqlite3.DatabaseError as e:
                raise self.failure(e) from None

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None

    # -- entries ----------------------------------------------------------------------------------------------------

    def get(self, key: str) -> dict[str, Any] | None:
        """The cached response for `key`, or None (a damaged entry is reported, removed and missed)."""
        entry = self.read(key)
        return None if entry is None else entry["response"]

    def read(self, key: str) -> dict[str, Any] | None:
        """The whole verified entry for `key` (request and response), or None, as `get` treats it: a damaged entry
        is reported, removed and missed."""
        return self.read_many([key]).get(key)

    def read_many(self, keys: Iterable[str]) -> dict[str, dict[str, Any]]:
        """key -> the whole verified entry, for each of `keys` that has a sound one (one query per CHUNK keys);
        a damaged entry is reported, removed and left out, so its request is asked again."""
        keys = list(dict.fromkeys(keys))
        raws = self.raws(keys)
        out: dict[str, dict[str, Any]] = {}
        damaged = []
        for key in keys:
            raw = raws.get(key)
            entry, problem = (None, None) if raw is None else judge(raw, key)
            if entry is not None:
                out[key] = entry
            elif problem:
                damaged.append((key, problem))
        self.stats.hits += len(out)
        self.stats.misses += len(keys) - len(out)
        if damaged:
            self.stats.corrupted += [key for key, _ in damaged]
            try:
                self.delete([key for key, _ in damaged])
                done = "removed it"
            except KdError:  # a read-only cache: ensure_writable stops the stage before anything is asked
                done = "could not remove it"
            for key, problem in damaged:
                print(f"kd: cache entry {key} in {self.db} is damaged ({problem}); {done}, asking the teacher again",
                      file=sys.stderr)
        return out

    def get_entry(self, key: str) -> dict[str, Any] | None:
        """The whole entry (request and response), for tools that show what was asked; None if absent or damaged."""
        raw = self.raw(key)
        return None if raw is None or check_entry(raw, key) else parse_json(raw)

    def raw(self, key: str) -> bytes | None:
        """The stored bytes for `key`, unverified (every reader checks them with `check_entry`)."""
        rows = self._run(False, "SELECT entry FROM entries WHERE key = ?", (key,))
        return _bytes(rows[0][0]) if rows else None

    def put(self, key: str, request: dict[str, Any], response: dict[str, Any]) -> None:
        """Persist one answer now, committed before this returns; the first answer to a key wins."""
        self.insert([(key, make_entry(key, request, response), {"request": request, "response": response})])
        self.stats.written += 1

    def insert(self, entries: Iterable[tuple[str, bytes, dict[str, Any]]]) -> int:
        """Add entries (key, bytes already checked, the entry they parse to) in one transaction; keys already
        present keep their entry. Returns how many were new."""
        with self._lock:
            conn = self._open(True)
            assert conn is not None
            try:
                conn.execute("BEGIN IMMEDIATE")  # take the write lock first: no upgrade deadlock between writers
                new = 0
                for key, raw, entry in entries:
                    new += conn.execute("INSERT OR IGNORE INTO entries VALUES (?, ?, ?, ?, ?, ?)",
                                        (key, *self._columns(conn, entry), raw)).rowcount
                conn.execute("COMMIT")
                return new
            except BaseException as e:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                if isinstance(e, sqlite3.DatabaseError):
                    raise self.failure(e) from None
                raise

    def _columns(self, conn: sqlite3.Connection, entry: dict[str, Any]) -> tuple[int, int, int, int]:
        request, usage = entry["request"], entry["response"].get("usage")
        usage = usage if isinstance(usage, dict) else {}  # stored as given; check_entry judges it when read
        identity = canonical_json(request.get("teacher"))
        if identity not in self._teachers:
            conn.execute("INSERT OR IGNORE INTO teachers (identity) VALUES (?)", (identity,))
            self._teachers[identity] = conn.execute("SELECT id FROM teachers WHERE identity = ?",
                                                    (identity,)).fetchone()[0]
        messages = request.get("messages") or []
        chars = sum(len(m.get("content") or "") for m in messages if isinstance(m, dict))
        tokens = [n if type(n) is int else 0 for n in (usage.get("prompt_tokens"), usage.get("completion_tokens"))]
        return self._teachers[identity], chars, *tokens

    def _each(self, write: bool, sql: str, keys: Iterable[str], *first: Any) -> Iterator[Any]:
        """Rows of `sql` (its `IN ({})` filled with placeholders) over `keys`, CHUNK keys per statement."""
        keys = list(keys)
        for i in range(0, len(keys), CHUNK):
            part = keys[i:i + CHUNK]
            yield from self._run(write, sql.format(",".join("?" * len(part))), (*first, *part))

    def delete(self, keys: Iterable[str]) -> None:
        """Remove entries, and what packs were known to hold them (a rowid may be reused by a later entry)."""
        keys = list(keys)
        sql = "DELETE FROM pack_entries WHERE entry IN (SELECT rowid FROM entries WHERE key IN ({}))"
        list(self._each(True, sql, keys))
        list(self._each(True, "DELETE FROM entries WHERE key IN ({})", keys))

    def present(self, keys: Iterable[str]) -> dict[str, tuple[int, int, int]]:
        """key -> (prompt characters, prompt tokens, completion tokens) for each key with an entry, from the
        columns (the entry's bytes are neither read nor verified: a forecast's estimate, not an answer)."""
        sql = "SELECT key, prompt_chars, prompt_tokens, completion_tokens FROM entries WHERE key IN ({})"
        return {key: tuple(counts) for key, *counts in self._each(False, sql, keys)}

    def raws(self, keys: Iterable[str]) -> dict[str, bytes]:
        """key -> stored bytes (unverified) for each of `keys` with an entry."""
        return {key: _bytes(raw) for key, raw in self._each(False, "SELECT key, entry FROM entries WHERE key IN ({})", keys)}

    def teachers(self) -> list[dict[str, Any]]:
        """The distinct teacher identities of all entries."""
        rows = self._run(False, "SELECT identity FROM teachers t WHERE EXISTS (SELECT 1 FROM entries WHERE "
                                "teacher = t.id) ORDER BY identity")
        return [json.loads(identity) for identity, in rows]

    def entries(self) -> Iterator[tuple[str, bytes]]:
        """Every (key, stored bytes), unverified, in key order, a batch of rows at a time."""
        last = ""
        while rows := self._run(False, "SELECT key, entry FROM entries WHERE key > ? ORDER BY key LIMIT 2000", (last,)):
            yield from ((key, _bytes(raw)) for key, raw in rows)
            last = rows[-1][0]

    def count(self) -> int:
        rows = self._run(False, "SELECT count(*) FROM entries")
        return rows[0][0] if rows else 0

    def ensure_writable(self) -> None:
        """Raise KdError naming the directory or database unless answers can be persisted. Called before the first
        request is sent, so a read-only cache stops a stage before any answer is paid for and lost."""
        probe_writable(self.dir, "request cache")
        for path in (self.db, self.db.with_name(DB_NAME + "-wal")):
            if path.exists() and not os.access(path, os.W_OK):
                raise KdError(f"{path}: the request cache database is not writable; make it writable "
                              f"(chmod u+w {path})")
        self._run(True, "SELECT 1")

    # -- packs seen on remotes (kd/cache/share.py) --------------------------------------------------------------------

    def packs(self) -> dict[str, tuple[int, bool]]:
        """pack name -> (id, complete: every key it holds is here)."""
        return {name: (i, bool(c)) for i, name, c in self._run(False, "SELECT id, name, complete FROM packs")}

    def note_pack(self, name: str, keys: Iterable[str], complete: bool) -> int:
        """Remember pack `name` as seen, and that it holds the entries here under `keys`; returns its id."""
        self._run(True, "INSERT OR IGNORE INTO packs (name, complete) VALUES (?, 0)", (name,))
        if complete:
            self._run(True, "UPDATE packs SET complete = 1 WHERE name = ?", (name,))
        pack = self._run(True, "SELECT id FROM packs WHERE name = ?", (name,))[0][0]
        list(self._each(True, "INSERT OR IGNORE INTO pack_entries SELECT rowid, ? FROM entries WHERE key IN ({})",
                        keys, pack))
        return pack

    def unpacked(self, packs: Iterable[int]) -> list[str]:
        """Keys of the entries that no pack among `packs` is known to hold, in key order."""
        ids = list(packs)
        return [key for key, in self._run(
            False, "SELECT key FROM entries e WHERE NOT EXISTS (SELECT 1 FROM pack_entries p WHERE p.entry = e.rowid "
                   f"AND p.pack IN ({','.join('?' * len(ids))})) ORDER BY key", ids)]

    # -- the one-file-per-request layout ------------------------------------------------------------------------------

    def _migrate(self) -> None:
        """Move `<key[:2]>/<key>.json` files into the database: verified, inserted and committed, then removed."""
        files = legacy_files(self.dir)
        if not files:
            return
        good, bad = [], []
        for path in files:
            try:
                raw = path.read_bytes()
            except FileNotFoundError:  # another process moved it in meanwhile
                continue
            except OSError as e:
                raw, problem = b"", unreadable(e)
            else:
                entry, problem = judge(raw, path.stem)
            if problem:
                bad.append(path)
                print(f"kd: cache entry {path} is damaged ({problem}); left out of {self.db}", file=sys.stderr)
            else:
                good.append((path.stem, raw, entry))
        moved = self.insert(good)
        for path in files:
            path.unlink(missing_ok=True)
        for sub in {p.parent for p in files}:
            with contextlib.suppress(OSError):  # something else lives there: leave it
                sub.rmdir()
        print(f"kd: moved {len(good)} request cache entries ({moved} new) from one file each into {self.db}"
              + (f"; {len(bad)} damaged left out" if bad else ""), file=sys.stderr)


def _read_only(uri: str) -> sqlite3.Connection:
    conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
    try:
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()  # opening is lazy: fail here, not later
    except sqlite3.Error:
        conn.close()
        raise
    return conn


def legacy_files(directory: Path) -> list[Path]:
    """Entries of the one-file-per-request layout under `directory`."""
    try:
        subs = [d for d in directory.iterdir() if len(d.name) == 2 and d.is_dir()]
    except OSError:
        return []
    return sorted(p for d in subs for p in d.iterdir() if LEGACY_NAME.match(p.name) and p.name[:2] == d.name)


def _bytes(raw: Any) -> bytes:
    return raw if isinstance(raw, bytes) else str(raw).encode("utf-8")  # text stored by a hand edit


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


_STRICT = json.JSONDecoder(parse_constant=_no_constant)  # made once: json.loads(…, parse_constant=) builds one a call


def parse_json(raw: bytes) -> Any:
    """Strict JSON: Python's json accepts NaN and Infinity, which no kd writer emits (canonical_json refuses them).
    UTF-8 only, as every kd writer emits."""
    return _STRICT.decode(raw.decode("utf-8") if isinstance(raw, bytes | bytearray) else raw)


def check_entry(raw: bytes, key: str) -> str | None:
    """Why an entry cannot be trusted for `key`, or None: the one schema check behind every reader (stages,
    `kd cache verify`, push and pull). Never raises, whatever the bytes."""
    return judge(raw, key)[1]


def judge(raw: bytes, key: str) -> tuple[dict[str, Any], None] | tuple[None, str]:
    """(the entry, None) when `raw` passes `check_entry`, else (None, why): for readers that keep the parsed entry."""
    problem = _problem(raw, key)
    return (None, problem) if isinstance(problem, str) else (problem, None)


def _body_checksum(raw: bytes, entry: dict[str, Any]) -> str:
    """sha256 of canonical_json({"request": …, "response": …}) of the parsed entry.

    kd writes entries in canonical JSON, whose last two members are exactly that body, so hashing `raw`'s tail
    saves serialising it again (about half of the check's time). A tail that hashes to the stored checksum can
    only be the canonical body itself, and it ends `raw`, so it holds the top-level (last-read) "request" and
    "response"; any other entry (not canonical, edited) is serialised and hashed as before."""
    at = raw.find(b'"request":')
    if at > 0:
        tail = hashlib.sha256(b"{" + raw[at:]).hexdigest()
        if tail == entry.get("checksum"):
            return tail
    return sha256_text(canonical_json({"request": entry["request"], "response": entry["response"]}))


def _hashes_to(raw: bytes, request: dict[str, Any], key: str) -> bool:
    """request_key(request) == key, from the canonical request inside `raw` where it is there (a third of the
    check's time saved): `canonical_json({**request, "cache_format": 1})` is that text with the format member put
    after `backend`, the first key (sorted). Anything else is serialised and hashed as `request_key` does."""
    start, end = raw.find(b'"request":{"backend":'), raw.rfind(b',"response":')
    if 0 < start < end:
        text = raw[start + 10:end]  # canonical_json(request): no unescaped `,"` inside a JSON string
        cut = text.find(b',"', 11)
        if cut > 0 and hashlib.sha256(text[:cut] + _FORMAT_MEMBER + text[cut:]).hexdigest() == key:
            return True
    return request_key(request) == key


_FORMAT_MEMBER = f',"cache_format":{CACHE_FORMAT}'.encode()


def _problem(raw: bytes, key: str) -> str | dict[str, Any]:
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
    if entry.get("checksum") != _body_checksum(raw, entry):
        return "checksum mismatch"
    if not _hashes_to(raw, request, key):
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
    return entry
