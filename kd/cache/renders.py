"""The render memo: which request key a template renders for given values, so an unchanged row is not rendered
again (rendering is most of what planning a labeling stage costs: ≈37 µs a prompt, ≈53 µs with its key).

A memo key hashes everything the rendered request depends on: the template and its includes (by content hash),
the teacher identity, the sampling, the sample index, the values passed to the template, and the versions of the
renderer (MEMO_FORMAT, kd's prompt and sandbox code, Jinja); the memo maps it to the request key the render gave.
Each row also carries `bind`, a keyed hash of its memo key and its request key together: a row whose request key
was damaged or swapped with another row's no longer matches its `bind` and is a miss (rendered again), never the
answer to another record. `verify` checks every row (`kd cache verify`). A request that must actually be sent is
rendered again, so a stale or lost memo costs time, never a wrong answer.

One SQLite file beside the request cache (`.kd/cache/renders.sqlite3`), local to this machine (never pushed).
A memo that cannot be opened or written is skipped: everything is rendered, as without it.
"""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path
from typing import Any

import jinja2

from kd import prompts, sandbox, watchdog
from kd.records import canonical_json

MEMO_FORMAT = 2  # 2: rows bound to their request key (`bind`)
# the renderer's own code: a changed sandbox may render other text, so its memo rows must not be trusted
RENDERER = hashlib.sha256(b"".join(Path(m.__file__).read_bytes() for m in (prompts, sandbox, watchdog))).hexdigest()
_BIND_KEY = b"kd render memo row"
FILE = "renders.sqlite3"
CHUNK = 500  # keys per query (SQLite allows 32766 variables; small chunks keep each query's list short)
FLUSH = 50_000  # new pairs written in one transaction: a million-row plan holds at most this many


def memo_prefix(template: dict[str, Any], identity: dict[str, Any], sampling: dict[str, Any]) -> bytes:
    """What every request of one plan shares; hashed into each memo key."""
    return canonical_json({"format": MEMO_FORMAT, "jinja": jinja2.__version__, "renderer": RENDERER, "template": template,
                           "teacher": identity, "sampling": sampling}).encode("utf-8")


def memo_key(prefix: bytes, sample_index: int, values: tuple[str, ...]) -> bytes:
    h = hashlib.blake2b(prefix, digest_size=20)
    h.update(str(sample_index).encode())
    for v in values:  # length-prefixed: ("ab", "c") and ("a", "bc") differ
        b = v.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.digest()


def bind(memo: bytes, key: bytes) -> bytes:
    """What ties a row's request key to its memo key (the two are 20 and 32 bytes: no ambiguity in concatenation)."""
    return hashlib.blake2b(memo + key, digest_size=16, key=_BIND_KEY).digest()


class RenderMemo:
    """memo key -> request key; `get_many` reads, `add` buffers, `close` writes in one transaction."""

    def __init__(self, cache_dir: Path, writable: bool) -> None:
        self.path = Path(cache_dir) / FILE
        self.pending: list[tuple[bytes, bytes, bytes]] = []
        self.db: sqlite3.Connection | None = None
        self.writable = writable
        try:
            if writable:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.db = sqlite3.connect(self.path, timeout=30)
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("DROP TABLE IF EXISTS renders")  # format 1: rows bound to nothing
                self.db.execute("CREATE TABLE IF NOT EXISTS memo (memo BLOB PRIMARY KEY, key BLOB NOT NULL, "
                                "bind BLOB NOT NULL) WITHOUT ROWID")
            elif self.path.is_file():
                self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30)
        except (sqlite3.Error, OSError):  # a cache directory that is a file, read-only, a damaged memo
            self.db = None  # no memo: everything is rendered

    def get_many(self, memos: list[bytes]) -> dict[bytes, str]:
        found: dict[bytes, str] = {}
        if self.db is None:
            return found
        try:
            for i in range(0, len(memos), CHUNK):
                part = memos[i:i + CHUNK]
                rows = self.db.execute(f"SELECT memo, key, bind FROM memo WHERE memo IN ({','.join('?' * len(part))})",
                                       part)
                found.update((m, k.hex()) for m, k, b in rows if _bound(m, k, b))
        except sqlite3.Error:
            return {}
        return found

    def add(self, memo: bytes, key: str) -> None:
        if self.db is not None and self.writable:
            k = bytes.fromhex(key)
            self.pending.append((memo, k, bind(memo, k)))
            if len(self.pending) >= FLUSH:
                self._write()

    def _write(self) -> None:
        try:
            if self.pending and self.db is not None:
                with self.db:
                    self.db.executemany("INSERT OR REPLACE INTO memo VALUES (?, ?, ?)", self.pending)
        except sqlite3.Error:
            pass  # a memo that cannot be written only means rendering again next time
        self.pending = []

    def close(self) -> None:
        if self.db is None:
            return
        self._write()
        self.db.close()
        self.db = None



def _bound(memo: Any, key: Any, b: Any) -> bool:
    return isinstance(memo, bytes) and isinstance(key, bytes) and len(key) == 32 and isinstance(b, bytes) and \
        b == bind(memo, key)


def verify(cache_dir: Path, fix: bool = False) -> tuple[int, list[str]]:
    """(rows, the memo keys (hex) of rows that fail their `bind`) of the memo in `cache_dir`; with `fix` those rows
    are removed. A memo that cannot be read counts as empty (it is only a speed-up)."""
    path = Path(cache_dir) / FILE
    if not path.is_file():
        return 0, []
    try:
        db = sqlite3.connect(path if fix else f"file:{path}?mode=ro", uri=not fix, timeout=30)
    except sqlite3.Error:
        return 0, []
    try:
        rows, bad = 0, []
        for m, k, b in db.execute("SELECT memo, key, bind FROM memo"):
            rows += 1
            if not _bound(m, k, b):
                bad.append(m)
        if fix and bad:
            with db:
                db.executemany("DELETE FROM memo WHERE memo = ?", [(m,) for m in bad])
        return rows, [m.hex() if isinstance(m, bytes) else repr(m) for m in bad]
    except sqlite3.Error:
        return 0, []
    finally:
        db.close()
