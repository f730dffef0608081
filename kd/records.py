"""Records and datasets: canonical JSON, content ids, atomic dataset writes, manifests (DESIGN.md §3)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from kd import __version__
from kd.errors import KdError
from kd.paths import DATA_DIR

RECORDS_FILE = "records.jsonl"
REJECTED_FILE = "rejected.jsonl"
MANIFEST_FILE = "manifest.json"
CARD_FILE = "README.md"
# Fields that describe where a record came from; everything else is content and goes into the id.
NON_CONTENT_FIELDS = ("id", "provenance")
MANIFEST_KEYS = ("name", "method", "files", "fingerprint", "records", "rejected")  # what readers of a manifest use


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


def write_dataset(
    out_dir: Path,
    name: str,
    method: str,
    records: list[dict[str, Any]],
    rejected: list[dict[str, Any]],
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
    by_id: dict[str, dict[str, Any]] = {}
    rejected = list(rejected)
    for rec in records:
        rec = rec if "id" in rec else finalize(rec)
        if rec["id"] in by_id:
            rejected.append({"reason": "duplicate", "record": rec})
            continue
        by_id[rec["id"]] = rec
    ordered = [by_id[i] for i in sorted(by_id)]
    rejected.sort(key=lambda r: (r["reason"], canonical_json(r)))
    manifest = {
        "name": name,
        "method": method,
        "format": "jsonl",
        "files": {"records": RECORDS_FILE, "rejected": REJECTED_FILE},
        "fingerprint": fingerprint(r["id"] for r in ordered),
        "records": len(ordered),
        "rejected": dict(sorted(Counter(r["reason"] for r in rejected).items())),
        "templates": [{"path": p, "sha256": h} for p, h in sorted(templates.items())],
        "teacher": teacher,
        "kd_version": __version__,
        **(extra or {}),
    }
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        (tmp / RECORDS_FILE).write_text(_jsonl(ordered), encoding="utf-8")
        (tmp / REJECTED_FILE).write_text(_jsonl(rejected), encoding="utf-8")
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if card is not None:
            (tmp / CARD_FILE).write_text(card(manifest), encoding="utf-8")
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Read a JSONL file; a bad line is a KdError naming the file and line."""
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise KdError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise KdError(f"{path}: not UTF-8 text ({e.reason})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise KdError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise KdError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def seed_id(row: dict[str, Any]) -> str:
    """A seed row's id: its `id` field, else a hash of its content."""
    return str(row["id"]) if "id" in row else sha256_text(str(sorted(row.items())))[:16]


def load_seeds(root: Path, file: str, required: tuple[str, ...]) -> list[dict[str, Any]]:
    """Seed rows, each checked for the fields a method needs (a bad line names file and line)."""
    rows = read_jsonl(root / file)
    if not rows:
        raise KdError(f"{file}: no seed records")
    seen: set[str] = set()
    for n, row in enumerate(rows, 1):
        for f in required:
            if not isinstance(row.get(f), str) or not row[f].strip():
                raise KdError(f"{file}: record {n} ({row.get('id', 'no id')}): needs a non-empty string `{f}`")
        sid = seed_id(row)
        if sid in seen:
            raise KdError(f"{file}: record {n}: duplicate id '{sid}'")
        seen.add(sid)
    return rows


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
    problems = []
    if len(records) != manifest["records"]:
        problems.append(f"{manifest['files']['records']} holds {len(records)} records, "
                        f"{MANIFEST_FILE} says {manifest['records']}")
    ids = [str(r.get("id")) for r in records]
    if fingerprint(ids) != manifest["fingerprint"]:
        problems.append(f"the record ids give fingerprint {fingerprint(ids)[:12]}, {MANIFEST_FILE} says "
                        f"{str(manifest['fingerprint'])[:12]}")
    for n, rec in enumerate(records, 1):
        if rec.get("id") != content_id(rec):
            problems.append(f"record {n} ({str(rec.get('id'))[:12]}): its id is not the hash of its content "
                            f"(edited by hand?)")
            break
    return problems


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
