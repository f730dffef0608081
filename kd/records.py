"""Records and datasets: canonical JSON, content ids, atomic dataset writes, manifests (DESIGN.md §3)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from kd import __version__
from kd.errors import KdError
from kd.paths import DATA_DIR
from kd.secrets import scrub_known

RECORDS_FILE = "records.jsonl"
REJECTED_FILE = "rejected.jsonl"
MANIFEST_FILE = "manifest.json"
CARD_FILE = "README.md"
# Fields that describe where a record came from; everything else is content and goes into the id.
NON_CONTENT_FIELDS = ("id", "provenance")
MANIFEST_KEYS = ("name", "method", "files", "fingerprint", "records", "rejected")  # what readers of a manifest use
# nesting levels of one JSONL row (kd's own records: 5). Python's json reads up to ~1,000 and then raises
# RecursionError; a row nested a few hundred deep still loads but breaks whatever recurses into it next (hashing,
# rendering, writing) in a deeper stack, so a row is refused at the door, naming its file and line.
MAX_ROW_DEPTH = 64


def canonical_json(obj: Any) -> str:
    """One byte-stable JSON form: sorted keys, no whitespace, UTF-8 kept as is."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def content_id(record: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of a record's content fields (not of its provenance)."""
    return sha256_text(canonical_json({k: v for k, v in record.items() if k not in NON_CONTENT_FIELDS}))


def finalize(record: dict[str, Any]) -> dict[str, Any]:
    """Return the record with its `id` set from its content."""
    return {**record, "id": content_id(record)}


def fingerprint(ids: Iterable[str]) -> str:
    """sha256 over the ordered record ids: equal fingerprints mean equal datasets."""
    return sha256_text("\n".join(ids))


def _jsonl(rows: Iterable[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n" for r in rows)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file through a temporary sibling and a rename, so no reader ever sees half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    """A small JSON file (metrics, params summaries), written atomically with sorted keys."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def replace_dir(tmp_dir: Path, out_dir: Path) -> None:
    """Move a fully written directory into place; the old one disappears only after the new one is whole."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
        os.replace(tmp_dir, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp_dir, out_dir)


def write_probe(directory: Path) -> None:
    """Create and remove a file in `directory`; raises OSError where that fails. A real probe, not os.access:
    that one says yes to root and cannot see every read-only mount."""
    fd, tmp = tempfile.mkstemp(prefix=".kd-write-probe.", suffix=".tmp", dir=directory)
    os.close(fd)
    os.unlink(tmp)


def ensure_writable(*dirs: Path) -> None:
    """Probe that a stage can write its outputs' directories, so it fails when it starts, not after the teacher
    answered (answers cost money and time; a stage that cannot write them loses its work).

    Raises:
        KdError: naming the first directory that cannot be created or written.
    """
    for d in dirs:
        existing = d
        while not existing.exists() and existing.parent != existing:
            existing = existing.parent  # where the stage would create it: nothing is created by the probe
        try:
            if not existing.is_dir():
                raise NotADirectoryError(20, f"{existing} is not a directory")
            write_probe(existing)
        except OSError as e:
            raise KdError(f"{d}: cannot write there ({e.strerror}); nothing was asked or built: make it writable and "
                          f"run the stage again") from None


class DatasetWriter:
    """Writes a dataset one record at a time in bounded memory: each record's line is appended to a spool file
    beside the output as it comes, and only an index of (id, offset) is kept; `close` copies the lines into
    `records.jsonl` in id order, so the bytes are those of `write_dataset` whatever order records came in.

    Records are deduplicated by id (a later duplicate becomes a rejection). Rejections are kept in memory to be
    sorted (they are few next to the records). Nothing appears at `out_dir` until `close` succeeds; `abort` (or an
    exception inside `with`) removes the partial work.
    """

    def __init__(self, out_dir: Path, name: str, method: str) -> None:
        self.out_dir, self.name, self.method = out_dir, name, method
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
        self.spool = open(self.tmp / ".records.unsorted", "w+b")  # noqa: SIM115 (closed in close/abort)
        self.index: list[bytes] = []  # 32-byte id digest + 5-byte arrival number: sorts by id, then arrival
        self.offsets = array("Q")
        self.rejected: list[tuple[str, str]] = []  # (reason, canonical json), sorted at the end

    def add(self, record: dict[str, Any]) -> str:
        """Spool one record (its id computed unless present); return its id."""
        record = record if "id" in record else finalize(record)
        line = (json.dumps(record, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")
        self.index.append(bytes.fromhex(record["id"]) + len(self.offsets).to_bytes(5, "big"))
        self.offsets.append(self.spool.tell())
        self.spool.write(line)
        return record["id"]

    def reject(self, row: dict[str, Any]) -> None:
        # a server's words are scrubbed where they arrive (kd.runtime.openai); this is the last gate before a DVC output
        self.rejected.append((row["reason"], scrub_known(canonical_json(row))))

    def close(self, templates: dict[str, str], teacher: dict[str, Any] | None, extra: dict[str, Any] | None = None,
              card: Callable[[dict[str, Any]], str] | None = None) -> dict[str, Any]:
        """Write records (id order), rejections, manifest and card, and move the directory into place."""
        try:
            return self._close(templates, teacher, extra, card)
        except BaseException:
            self.abort()
            raise

    def _close(self, templates: dict[str, str], teacher: dict[str, Any] | None, extra: dict[str, Any] | None,
               card: Callable[[dict[str, Any]], str] | None) -> dict[str, Any]:
        self.index.sort()
        self.offsets.append(self.spool.tell())  # a line ends where the next to arrive starts
        ids, last = hashlib.sha256(), b""
        count = 0
        with open(self.tmp / RECORDS_FILE, "wb") as out:
            for entry in self.index:
                digest, n = entry[:32], int.from_bytes(entry[32:], "big")
                self.spool.seek(self.offsets[n])
                line = self.spool.read(self.offsets[n + 1] - self.offsets[n])
                if digest == last:  # the same content again: the first to arrive is kept
                    row = {"reason": "duplicate", "record": json.loads(line)}
                    self.rejected.append(("duplicate", canonical_json(row)))
                    continue
                out.write(line)
                ids.update((("\n" if count else "") + digest.hex()).encode())
                last, count = digest, count + 1
        self.spool.close()
        os.unlink(self.spool.name)
        self.rejected.sort()
        manifest = {
            "name": self.name,
            "method": self.method,
            "format": "jsonl",
            "files": {"records": RECORDS_FILE, "rejected": REJECTED_FILE},
            "fingerprint": ids.hexdigest(),  # = fingerprint(ids in file order), without holding them
            "records": count,
            "rejected": dict(sorted(Counter(reason for reason, _ in self.rejected).items())),
            "templates": [{"path": p, "sha256": h} for p, h in sorted(templates.items())],
            "teacher": teacher,
            "kd_version": __version__,
            **(extra or {}),
        }
        rows = (json.loads(c) for _, c in self.rejected)
        (self.tmp / REJECTED_FILE).write_text(_jsonl(rows), encoding="utf-8")
        (self.tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if card is not None:
            (self.tmp / CARD_FILE).write_text(card(manifest), encoding="utf-8")
        replace_dir(self.tmp, self.out_dir)
        return manifest

    def abort(self) -> None:
        self.spool.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def write_dataset(
    out_dir: Path,
    name: str,
    method: str,
    records: Iterable[dict[str, Any]],
    rejected: Iterable[dict[str, Any]],
    templates: dict[str, str],
    teacher: dict[str, Any] | None,
    extra: dict[str, Any] | None = None,
    card: Callable[[dict[str, Any]], str] | None = None,
) -> dict[str, Any]:
    """Write `records.jsonl`, `rejected.jsonl` and `manifest.json` atomically; return the manifest.

    Records are deduplicated by id (a duplicate becomes a rejection) and sorted by id, so the same
    records always give the same bytes whatever order they were produced in. `card(manifest)`, if given,
    returns the dataset card, written as README.md in the same atomic directory write.
    """
    writer = DatasetWriter(out_dir, name, method)
    try:
        for rec in records:
            writer.add(rec)
        for row in rejected:
            writer.reject(row)
    except BaseException:
        writer.abort()
        raise
    return writer.close(templates, teacher, extra, card)


def iter_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """The objects of a JSONL file, one line at a time; a bad line is a KdError naming the file and line."""
    try:
        f = open(path, "rb")  # noqa: SIM115 (closed below, also when the caller stops early)
    except OSError as e:
        raise KdError(f"{path}: cannot read ({e.strerror})") from None
    with f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise KdError(f"{path}: not UTF-8 text ({e.reason})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise KdError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
            except RecursionError:
                raise KdError(f"{path}:{n}: nested deeper than {MAX_ROW_DEPTH} levels") from None
            if not isinstance(row, dict):
                raise KdError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            if line.count("[") + line.count("{") > MAX_ROW_DEPTH and _deeper_than(row, MAX_ROW_DEPTH):  # count: cheap
                raise KdError(f"{path}:{n}: nested deeper than {MAX_ROW_DEPTH} levels")
            yield row


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether a parsed JSON value nests more than `limit` levels of objects and arrays (without recursing)."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(v, dict):
            stack.extend((x, depth + 1) for x in v.values() if isinstance(x, dict | list))
        elif isinstance(v, list):
            stack.extend((x, depth + 1) for x in v if isinstance(x, dict | list))
    return False


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Read a JSONL file; a bad line is a KdError naming the file and line."""
    return list(iter_jsonl(path))


def seed_id(row: dict[str, Any]) -> str:
    """A seed row's id: its `id` field, else a hash of its content."""
    return str(row["id"]) if "id" in row else sha256_text(str(sorted(row.items())))[:16]


def iter_seeds(root: Path, file: str, required: tuple[str, ...]) -> Iterator[dict[str, Any]]:
    """Seed rows one at a time, each checked for the fields a method needs (a bad line names file and line);
    only the ids seen so far are held, to refuse a duplicate."""
    seen: set[str] = set()
    for n, row in enumerate(iter_jsonl(root / file), 1):
        for f in required:
            if not isinstance(row.get(f), str) or not row[f].strip():
                raise KdError(f"{file}: record {n} ({row.get('id', 'no id')}): needs a non-empty string `{f}`")
        sid = seed_id(row)
        if sid in seen:
            raise KdError(f"{file}: record {n}: duplicate id '{sid}'")
        seen.add(sid)
        yield row
    if not seen:
        raise KdError(f"{file}: no seed records")


def load_seeds(root: Path, file: str, required: tuple[str, ...]) -> list[dict[str, Any]]:
    """Seed rows, each checked for the fields a method needs (a bad line names file and line)."""
    return list(iter_seeds(root, file, required))


def read_manifest(out_dir: Path) -> dict[str, Any]:
    """A dataset's manifest.json; missing, truncated or not a manifest is one KdError line naming the file."""
    path = out_dir / MANIFEST_FILE
    if not path.exists():
        raise KdError(f"{out_dir}: no {MANIFEST_FILE}; build it first (`dvc repro`)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise KdError(f"{path}: cannot read ({e.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise KdError(f"{path}: not a valid manifest ({getattr(e, 'msg', None) or e.reason}); "
                      f"{restore_hint(out_dir)}") from None
    missing = [k for k in MANIFEST_KEYS if not isinstance(manifest, dict) or k not in manifest]
    if missing:
        raise KdError(f"{path}: not a kd manifest (lacks {', '.join(missing)}); {restore_hint(out_dir)}")
    return manifest


def restore_hint(out_dir: Path) -> str:
    """How to get a damaged dataset back: from DVC's cache, or by building it again."""
    return f"restore it with `dvc checkout {DATA_DIR / out_dir.name}` or rebuild it (`dvc repro -f {out_dir.name}`)"


def dataset_problems(manifest: dict[str, Any], records: list[dict[str, Any]]) -> list[str]:
    """What differs between a dataset's records and its manifest: count, fingerprint (over the ids in file order),
    and each record's id against its content. Empty when the records are the ones the manifest names."""
    problems = _totals_problems(manifest, len(records), fingerprint(str(r.get("id")) for r in records))
    bad = next((p for n, rec in enumerate(records, 1) if (p := _id_problem(n, rec))), None)
    return problems + ([bad] if bad else [])


def _totals_problems(manifest: dict[str, Any], count: int, print_: str) -> list[str]:
    problems = []
    if count != manifest["records"]:
        problems.append(f"{manifest['files']['records']} holds {count} records, {MANIFEST_FILE} says "
                        f"{manifest['records']}")
    if print_ != manifest["fingerprint"]:
        problems.append(f"the record ids give fingerprint {print_[:12]}, {MANIFEST_FILE} says "
                        f"{str(manifest['fingerprint'])[:12]}")
    return problems


def _id_problem(n: int, rec: dict[str, Any]) -> str | None:
    if rec.get("id") != content_id(rec):
        return f"record {n} ({str(rec.get('id'))[:12]}): its id is not the hash of its content (edited by hand?)"
    return None


def read_dataset(out_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Return (manifest, records) of a dataset directory written by `write_dataset`, re-checked against each other.

    Raises:
        KdError: one line naming the dataset, what differs (count, fingerprint or a record's id) and how to fix it.
    """
    manifest = read_manifest(out_dir)
    records = read_jsonl(out_dir / manifest["files"]["records"])
    if problems := dataset_problems(manifest, records):
        raise KdError(f"{out_dir}: damaged: {problems[0]}; {restore_hint(out_dir)}")
    return manifest, records


def iter_dataset(out_dir: Path) -> Iterator[dict[str, Any]]:
    """The records of a dataset one at a time, checked as `read_dataset` checks them: each id against its content
    as it is read, the count and fingerprint against the manifest once the last one is read (a damaged dataset
    raises then, so a caller that reads all before acting is protected the same way).
    """
    manifest = read_manifest(out_dir)
    ids, count = hashlib.sha256(), 0
    for rec in iter_jsonl(out_dir / manifest["files"]["records"]):
        if problem := _id_problem(count + 1, rec):
            raise KdError(f"{out_dir}: damaged: {problem}; {restore_hint(out_dir)}")
        ids.update((("\n" if count else "") + str(rec["id"])).encode())
        count += 1
        yield rec
    if problems := _totals_problems(manifest, count, ids.hexdigest()):
        raise KdError(f"{out_dir}: damaged: {problems[0]}; {restore_hint(out_dir)}")
