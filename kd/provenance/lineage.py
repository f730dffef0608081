"""What `kd diff` and `kd audit` share: record identity, causes of a change, fast lookups, readable text.

A record's *input identity* is what it answers, not what it says: its method, seed ids, parents (by their
own input identity, recursively, so an upstream record whose answer changed keeps its place), and the sample
index of each request (plus the template path for expansion, whose operators share inputs). Two versions
of a dataset are matched on it, so a new answer to the same input is a *change*, not a removal plus an
addition. Seed text is deliberately not part of it: an edited seed shows as a changed input.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable
from itertools import zip_longest
from typing import Any

from kd.records import canonical_json, sha256_text

try:  # orjson (a dependency of dvc-data) parses records several times faster than json
    from orjson import loads
except ImportError:  # pragma: no cover
    loads = json.loads

# kd writes records with json.dumps defaults (", " and ": "); the compact form is accepted too.
_ID_NEEDLES = (b'"id": "', b'"id":"')
CONTENT_SKIP = ("id", "provenance")


def identity(record: dict[str, Any], parent: Callable[[str, str], str]) -> str:
    """A readable key of the record's input: equal across rebuilds that answer the same input.

    `parent(dataset, id)` names a parent: `raw_parent` by its id, or a Side by the parent's own identity.
    """
    prov = record.get("provenance") or {}
    requests = prov.get("requests") or []
    parts = [str(prov.get("method", "?"))]
    if prov.get("method") == "expansion":  # Self-Instruct and each Evol operator ask about the same seeds
        parts += [f"template={r.get('template', {}).get('path', '?')}" for r in requests]
    parts += sorted(f"seed={s.get('file')}:{s.get('id')}" for s in prov.get("seeds") or [])
    parts += sorted(f"parent={parent(p.get('dataset', ''), p.get('id', ''))}" for p in prov.get("parents") or [])
    parts += [f"sample={r.get('sample_index', 0)}" for r in requests]
    if len(parts) == 1 + len(requests):  # no lineage at all: the prompt is the only input there is
        parts.append(f"input={sha256_text(canonical_json(record.get('prompt', record.get('messages', record.get('id')))))[:16]}")
    return " ".join(parts)


def raw_parent(dataset: str, record_id: str) -> str:
    """A parent named by its id: enough to match records whose parents did not change."""
    return f"{dataset}:{record_id[:16]}"


def changed_dict(old: dict[str, Any], new: dict[str, Any]) -> dict[str, list[Any]]:
    return {k: [old.get(k), new.get(k)] for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}


def causes(old: dict[str, Any], new: dict[str, Any]) -> list[dict[str, Any]]:
    """Why two versions of the same input differ, upstream-most first.

    Template, teacher and sampling causes are named only for requests whose key changed: an edit inside a
    branch that this record's rendering never took did not change it.
    """
    out: list[dict[str, Any]] = []
    po, pn = old.get("provenance") or {}, new.get("provenance") or {}
    parents_old = {(p.get("dataset"), p.get("id")) for p in po.get("parents") or []}
    parents_new = {(p.get("dataset"), p.get("id")) for p in pn.get("parents") or []}
    for ds in sorted({d for d, _ in parents_old ^ parents_new}, key=str):
        out.append({"kind": "parent", "dataset": ds})
    derived = bool(out)  # a request whose input is an upstream answer changes when that answer does
    for ro, rn in zip_longest(po.get("requests") or [], pn.get("requests") or []):
        if ro is None or rn is None:
            out.append({"kind": "requests", "old": len(po.get("requests") or []), "new": len(pn.get("requests") or [])})
            break
        if ro.get("key") == rn.get("key"):
            continue
        before = len(out)
        to, tn = ro.get("template") or {}, rn.get("template") or {}
        if to.get("path") != tn.get("path"):
            out.append({"kind": "template", "path": tn.get("path"), "old_path": to.get("path"),
                        "old": to.get("sha256"), "new": tn.get("sha256")})
        elif to.get("sha256") != tn.get("sha256"):
            out.append({"kind": "template", "path": tn.get("path"), "old": to.get("sha256"), "new": tn.get("sha256")})
        io, inn = to.get("includes") or {}, tn.get("includes") or {}
        for path in sorted(set(io) | set(inn)):
            if io.get(path) != inn.get(path):
                out.append({"kind": "template", "path": path, "old": io.get(path), "new": inn.get(path)})
        if ro.get("teacher") != rn.get("teacher"):
            out.append({"kind": "teacher", "old": ro.get("teacher"), "new": rn.get("teacher")})
        if ro.get("sampling") != rn.get("sampling"):
            out.append({"kind": "sampling", "changed": changed_dict(ro.get("sampling") or {}, rn.get("sampling") or {})})
        if len(out) == before and not derived:
            out.append({"kind": "input"})
        derived = True
    if not out:
        out.append({"kind": "answer"})
    return out


def describe(cause: dict[str, Any]) -> str:
    """One line for a person."""
    match cause["kind"]:
        case "template":
            if cause.get("old_path"):
                return f"template {cause['old_path']} -> {cause['path']}"
            return f"template {cause['path']} {_short(cause['old'])} -> {_short(cause['new'])}"
        case "teacher":
            return f"teacher {json.dumps(cause['old'], sort_keys=True)} -> {json.dumps(cause['new'], sort_keys=True)}"
        case "sampling":
            return "sampling " + ", ".join(f"{k} {v[0]!r} -> {v[1]!r}" for k, v in cause["changed"].items())
        case "parent":
            return f"upstream record changed in {cause['dataset']}"
        case "input":
            return "input changed (seed text edited, or a rendered variable)"
        case "requests":
            return f"number of teacher requests {cause['old']} -> {cause['new']}"
        case _:
            return "same request, different answer (a sampling teacher asked again?)"


def _short(sha: str | None) -> str:
    return sha[:12] if sha else "(none)"


def iter_lines(data: bytes) -> list[bytes]:
    """The non-blank lines of a JSONL file's bytes (filtered in C: this runs over millions of lines)."""
    lines = list(filter(None, data.split(b"\n")))
    if any(map(bytes.isspace, lines)):
        lines = [line for line in lines if not line.isspace()]
    return lines


def _line_id(line: bytes) -> bytes:
    i = line.find(_ID_NEEDLES[0])
    return line[i + 7: i + 71] if i >= 0 else b""


def index_by_id(lines: list[bytes]) -> dict[bytes, bytes]:
    """id -> line, without parsing: the 64 characters after each line's first `"id": "`.

    kd writes keys sorted and ids as sha256 hex, so a record's own id comes before the parent and seed ids
    in its provenance. A line of another shape gets a wrong key; callers parse the lines they use and
    check the id, count keys against lines, and fall back to a full parse.
    """
    return {line[(i := line.find(b'"id": "')) + 7: i + 71]: line for line in lines}


def find_sorted(data: bytes, record_id: bytes) -> bytes | None:
    """The line of `record_id` in a JSONL file sorted by id (as kd writes them), by bisection over the bytes
    (no split, no parse of other lines); None if absent or the file is not sorted that way."""
    lo, hi = 0, len(data)  # lo and hi are line starts; lines before lo have smaller ids
    while lo < hi:
        start = data.rfind(b"\n", 0, (lo + hi) // 2) + 1
        end = data.find(b"\n", start)
        end = len(data) if end == -1 else end
        if _line_id(data[start:end]) < record_id:
            lo = end + 1
        else:
            hi = start
    end = data.find(b"\n", lo)
    line = data[lo: len(data) if end == -1 else end]
    return line if line and _line_id(line) == record_id else None


def find_by_id(data: bytes, prefix: str) -> list[dict[str, Any]]:
    """Records of a JSONL file whose id starts with `prefix`, without parsing the other lines."""
    found: dict[str, dict[str, Any]] = {}
    for needle in _ID_NEEDLES:
        needle += prefix.encode()
        pos = 0
        while (i := data.find(needle, pos)) != -1:
            start = data.rfind(b"\n", 0, i) + 1
            end = data.find(b"\n", i)
            end = len(data) if end == -1 else end
            record = loads(data[start:end])
            if isinstance(record, dict) and str(record.get("id", "")).startswith(prefix):
                found[record["id"]] = record  # a parent's id inside provenance is not a match
            pos = end + 1
        if found:  # kd writes the first form; the compact one (another tool's file) costs a second pass
            break
    return [found[k] for k in sorted(found)]


def content_text(record: dict[str, Any]) -> str:
    """A record's content (not its id or provenance) as text lines, for unified diffs."""
    lines: list[str] = []
    for key in sorted(k for k in record if k not in CONTENT_SKIP):
        value = record[key]
        if isinstance(value, list) and all(isinstance(m, dict) and "role" in m for m in value):
            lines += [f"[{key}]"] + messages_text(value).splitlines()
        elif isinstance(value, str):
            lines += [f"[{key}]"] + (value.splitlines() or [""])
        else:
            lines.append(f"[{key}] {json.dumps(value, sort_keys=True, ensure_ascii=False)}")
    return "\n".join(lines) + "\n"


def messages_text(messages: list[dict[str, Any]]) -> str:
    out = []
    for m in messages:
        out.append(f"{m.get('role', '?')}:")
        out += [f"  {line}" for line in str(m.get("content", "")).splitlines() or [""]]
    return "\n".join(out) + "\n"


def unified(old: str, new: str, old_label: str, new_label: str) -> str:
    return "".join(difflib.unified_diff(old.splitlines(keepends=True), new.splitlines(keepends=True),
                                        old_label, new_label, n=2))
