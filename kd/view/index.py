"""The search index `kd view` pages datasets through: one SQLite file per dataset fingerprint under .kd/view/.

Paging and searching a million-record JSONL file must not read it into Python per request. The index holds,
for every record, its position (line number), id, category, seeds and parents, and the byte range of its line
in records.jsonl; its content text goes into an FTS5 table (contentless: the words are indexed, the text stays
in records.jsonl), so a search reads the index and then only the lines of the page it shows. Rejections are
indexed the same way. SQLite (with FTS5) ships with Python: no server, nothing to install.

The index is built once per fingerprint (the manifest's) and rebuilt when the fingerprint, or the records
file's size, changes; it is written to a temporary file and renamed, so a half-built index is never read.
"""

from __future__ import annotations

import os
import re
import sqlite3
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kd.paths import KD_DIR
from kd.provenance.lineage import content_text, loads
from kd.records import REJECTED_FILE, read_manifest

VIEW_DIR = KD_DIR / "view"  # one index per dataset fingerprint: kd's own state, never a DVC out
INDEX_FORMAT = 2  # bump when the schema changes: older index files are then rebuilt
BATCH = 20_000  # rows per insert while building
COUNT_CAP = 10_000  # matches counted beyond this show as "10000+" (counting every hit of a common word is slow)
_SCHEMA = """
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE records(n INTEGER PRIMARY KEY, id TEXT NOT NULL, category TEXT, pos INTEGER, len INTEGER);
CREATE TABLE links(kind TEXT, ref TEXT, n INTEGER);
CREATE TABLE rejected(n INTEGER PRIMARY KEY, reason TEXT, pos INTEGER, len INTEGER);
CREATE VIRTUAL TABLE words USING fts5(body, content='', detail=none);
"""
_INDEXES = """
CREATE INDEX records_id ON records(id);
CREATE INDEX records_category ON records(category, n);
CREATE INDEX links_ref ON links(kind, ref, n);
CREATE INDEX rejected_reason ON rejected(reason, n);
"""


@dataclass(frozen=True)
class Page:
    """One page of records (or rejections): the parsed rows, and how many match (capped at COUNT_CAP + 1)."""

    rows: list[dict[str, Any]]
    total: int
    capped: bool


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(byte offset, line) of each non-blank line, read in blocks (never the whole file at once)."""
    pos = 0
    with path.open("rb") as f:
        for line in f:
            if line.strip():
                yield pos, line
            pos += len(line)


def search_query(text: str) -> str | None:
    """An FTS5 query matching records that contain every word typed (`word*`: any word it starts); None when
    `text` has no word. Words are quoted, so nothing typed is FTS5 syntax. Prefixes are asked for, not implied:
    a prefix merges the match lists of every word it starts, all of them, where a word is read only as far as
    the page needs (a million records: 0.1 s against seconds for a common prefix)."""
    words = re.findall(r"\w+\*?", text.lower())
    if not words:
        return None
    return " ".join(f'"{w[:-1]}"*' if w.endswith("*") else f'"{w}"' for w in words)


class DatasetIndex:
    """An open index of `data/<name>/`; `DatasetIndex.open` builds it first when it is missing or outdated."""

    def __init__(self, dataset_dir: Path, manifest: dict[str, Any], db: Path) -> None:
        self.dir, self.manifest, self.path = dataset_dir, manifest, db
        self.records_file = dataset_dir / manifest["files"]["records"]
        self.rejected_file = dataset_dir / manifest["files"].get("rejected", REJECTED_FILE)
        self.db = sqlite3.connect(f"file:{db}?mode=ro", uri=True, check_same_thread=False)

    @classmethod
    def open(cls, root: Path, dataset_dir: Path) -> DatasetIndex:
        manifest = read_manifest(dataset_dir)
        db = root / VIEW_DIR / f"{dataset_dir.name}-{str(manifest['fingerprint'])[:16]}.sqlite"
        records = dataset_dir / manifest["files"]["records"]
        stamp = f"{INDEX_FORMAT}:{manifest['fingerprint']}:{records.stat().st_size}"
        if not db.is_file() or _stamp(db) != stamp:
            print(f"kd view: indexing {dataset_dir.name} ({manifest['records']} records) into {db}; once per "
                  f"fingerprint", file=sys.stderr, flush=True)
            build(records, dataset_dir / manifest["files"].get("rejected", REJECTED_FILE), db, stamp)
        return cls(dataset_dir, manifest, db)

    def close(self) -> None:
        self.db.close()

    def records(self, query: str = "", category: str = "", seed: str = "", parent: str = "",
                offset: int = 0, limit: int = 50) -> Page:
        """A page of records in file order, narrowed by a text search and filters (all optional)."""
        joins, join_args, where, args = [], [], [], []
        fts = search_query(query)
        if fts:
            joins.append("JOIN words ON words.rowid = r.n")
            where.append("words MATCH ?")
            args.append(fts)
        elif query.strip():
            return Page([], 0, False)  # punctuation only: nothing to match
        if category:
            where.append("r.category = ?")
            args.append(category)
        for kind, ref in (("seed", seed), ("parent", parent)):
            if ref:
                joins.append(f"JOIN links {kind} ON {kind}.n = r.n AND {kind}.kind = ? AND {kind}.ref = ?")
                join_args += [kind, ref]
        args = join_args + args  # the joins' parameters come before the WHERE's
        sql = f"FROM records r {' '.join(joins)} {'WHERE ' + ' AND '.join(where) if where else ''}"
        if not (fts or category or seed or parent):
            total, capped = self.manifest["records"], False
        elif fts and not (category or seed or parent):  # the full-text table alone knows how many match
            total = self.db.execute(f"SELECT count(*) FROM (SELECT rowid FROM words WHERE words MATCH ? "
                                    f"LIMIT {COUNT_CAP + 1})", [fts]).fetchone()[0]
            capped = total > COUNT_CAP
        else:
            total = self.db.execute(f"SELECT count(*) FROM (SELECT 1 {sql} LIMIT {COUNT_CAP + 1})", args).fetchone()[0]
            capped = total > COUNT_CAP
        order = "words.rowid" if fts else "r.n"  # FTS5 yields matches in rowid order: no sort of every match
        rows = self.db.execute(f"SELECT r.pos, r.len {sql} ORDER BY {order} LIMIT ? OFFSET ?",
                               [*args, limit, offset]).fetchall()
        return Page(self._read(self.records_file, rows), total, capped)

    def rejected(self, reason: str = "", offset: int = 0, limit: int = 50) -> Page:
        where, args = ("WHERE reason = ?", [reason]) if reason else ("", [])
        total = self.db.execute(f"SELECT count(*) FROM rejected {where}", args).fetchone()[0]
        rows = self.db.execute(f"SELECT pos, len FROM rejected {where} ORDER BY n LIMIT ? OFFSET ?",
                               [*args, limit, offset]).fetchall()
        return Page(self._read(self.rejected_file, rows), total, False)

    def record(self, record_id: str) -> dict[str, Any] | None:
        """The record with this exact id, or None."""
        row = self.db.execute("SELECT pos, len FROM records WHERE id = ?", (record_id,)).fetchone()
        found = self._read(self.records_file, [row]) if row else []
        return found[0] if found and found[0].get("id") == record_id else None

    def categories(self) -> list[tuple[str, int]]:
        return self.db.execute("SELECT category, n FROM categories ORDER BY category").fetchall()

    @staticmethod
    def _read(path: Path, rows: list[tuple[int, int]]) -> list[dict[str, Any]]:
        out = []
        with path.open("rb") as f:
            for pos, length in rows:
                f.seek(pos)
                out.append(loads(f.read(length)))
        return out


def _stamp(db: Path) -> str | None:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
            row = con.execute("SELECT value FROM meta WHERE key = 'stamp'").fetchone()
        return row[0] if row else None
    except sqlite3.Error:  # a damaged or foreign file: rebuilt
        return None


def build(records: Path, rejected: Path, db: Path, stamp: str) -> None:
    """Write the index of one dataset to `db` (through a temporary sibling and a rename)."""
    db.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{db.name}.", suffix=".tmp", dir=db.parent)
    os.close(fd)
    try:
        con = sqlite3.connect(tmp)
        con.executescript("PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF;" + _SCHEMA)
        rows, links, words = [], [], []
        for n, (pos, line) in enumerate(_lines(records)):
            rec = loads(line)
            prov = rec.get("provenance") or {}
            rows.append((n, str(rec.get("id", "")), str(rec.get("category") or ""), pos, len(line)))
            links += [(n, "seed", f"{s.get('file')}:{s.get('id')}") for s in prov.get("seeds") or []]
            links += [(n, "parent", f"{p.get('dataset')}:{p.get('id')}") for p in prov.get("parents") or []]
            words.append((n, content_text(rec)))
            if len(rows) >= BATCH:
                _flush(con, rows, links, words)
        _flush(con, rows, links, words)
        if rejected.is_file():
            con.executemany("INSERT INTO rejected VALUES (?, ?, ?, ?)",
                            ((n, str(loads(line).get("reason", "")), pos, len(line))
                             for n, (pos, line) in enumerate(_lines(rejected))))
        con.executescript(_INDEXES)  # then the category counts every dataset page shows, once
        con.execute("CREATE TABLE categories AS SELECT category, count(*) AS n FROM records WHERE category != '' "
                    "GROUP BY category")
        con.execute("INSERT INTO meta VALUES ('stamp', ?)", (stamp,))
        con.commit()
        con.close()
        os.replace(tmp, db)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _flush(con: sqlite3.Connection, rows: list, links: list, words: list) -> None:
    con.executemany("INSERT INTO records VALUES (?, ?, ?, ?, ?)", rows)
    con.executemany("INSERT INTO links (n, kind, ref) VALUES (?, ?, ?)", links)
    con.executemany("INSERT INTO words (rowid, body) VALUES (?, ?)", words)
    rows.clear()
    links.clear()
    words.clear()
