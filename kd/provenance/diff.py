"""`kd diff`: a record-level diff of one dataset between two revisions, a revision and the workspace, or
two directories.

Fast at scale because most records do not change: byte-identical lines are set aside with one set
operation and never parsed; only the lines that differ are parsed and matched by input identity
(kd.provenance.lineage), so the cost is one pass over the bytes plus work proportional to the change.
"""

from __future__ import annotations

import gc
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kd.cache.store import RequestCache
from kd.errors import KdError
from kd.paths import CACHE_DIR, DATA_DIR
from kd.provenance.lineage import (
    causes,
    content_text,
    describe,
    find_sorted,
    identity,
    index_by_id,
    iter_lines,
    loads,
    messages_text,
    raw_parent,
    unified,
)
from kd.provenance.revisions import Snapshot, resolve_rev, text_with_sha
from kd.records import MANIFEST_FILE, RECORDS_FILE, canonical_json, sha256_text
from kd.runtime.environment import changes as environment_changes

PROVENANCE_SAMPLE = 1000  # records with new provenance only whose changed fields are itemised
_KEY = re.compile(rb'"key": ?"([0-9a-f]{64})"')  # request keys, read without parsing the line


@dataclass
class Side:
    """One version of the dataset: a snapshot of the project, and where datasets live in it."""

    snap: Snapshot
    data_rel: str  # the directory holding datasets, relative to the snapshot root ("data")
    name: str
    label: str
    shared: dict[Any, Any] = field(default_factory=dict, repr=False)  # parent indexes; sides may share one
    _memo: dict[tuple[str, str], str] = field(default_factory=dict, repr=False)
    _keys: dict[str, Any] = field(default_factory=dict, repr=False)

    def file(self, dataset: str, name: str) -> str:
        return "/".join(p for p in (self.data_rel, dataset, name) if p and p != ".")

    def load(self) -> tuple[dict[str, Any] | None, bytes]:
        """(manifest, records bytes); (None, b"") when the dataset did not exist in this version."""
        raw = self.snap.read(self.file(self.name, MANIFEST_FILE), missing_ok=True)
        if raw is None:
            return None, b""
        try:
            manifest = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise KdError(f"{self.label}: {self.file(self.name, MANIFEST_FILE)}: not a valid manifest "
                          f"({getattr(e, 'msg', None) or e.reason}); restore it with `dvc checkout` or rebuild "
                          f"it") from None
        if not isinstance(manifest, dict):
            raise KdError(f"{self.label}: {self.file(self.name, MANIFEST_FILE)}: not a kd manifest")
        records = self.snap.read(self.file(self.name, manifest.get("files", {}).get("records", RECORDS_FILE)))
        return manifest, records or b""

    def _record(self, dataset: str, record_id: str) -> dict[str, Any] | None:
        if dataset not in self._keys:
            file = self.file(dataset, RECORDS_FILE)
            # on disk, two sides share a parent only if it is the same file (paths mode may point elsewhere)
            self._keys[dataset] = key = (self.snap.rev, file if self.snap.rev else str((self.snap.root / file).resolve()))
            if key not in self.shared:
                self.shared[key] = [self.snap.read(file, missing_ok=True) or b"", None]
        entry = self.shared[self._keys[dataset]]  # [bytes, id -> record (only after a miss)]
        line = find_sorted(entry[0], record_id.encode())  # kd sorts records by id: bisect, parse one line
        record = loads(line) if line is not None else None
        if record is None or record.get("id") != record_id:
            if entry[1] is None:  # not sorted as kd writes, or absent: parse everything once
                entry[1] = {r.get("id"): r for r in map(loads, iter_lines(entry[0]))}
            record = entry[1].get(record_id)
        return record

    def parent_identity(self, dataset: str, record_id: str) -> str:
        """The input identity of a parent record, read from the same version of its dataset."""
        key = (dataset, record_id)
        if key not in self._memo:
            self._memo[key] = f"{dataset}:{record_id}"  # a cycle or a missing parent falls back to its id
            record = self._record(dataset, record_id)
            if record is not None:
                self._memo[key] = identity(record, self.parent_token)
        return self._memo[key]

    def parent_token(self, dataset: str, record_id: str) -> str:
        """A parent named by its own input identity, so a parent whose answer changed keeps its name."""
        return f"{dataset}@{sha256_text(self.parent_identity(dataset, record_id))[:16]}"


def sides(root: Path, target: str, rev_a: str | None, rev_b: str | None) -> tuple[Side, Side]:
    """Two sides from `kd diff` arguments: `DIR_A DIR_B` (two dataset directories) or `DATASET [A [B]]`."""
    if rev_a and rev_b is None and _is_dataset_dir(Path(target)) and _is_dataset_dir(Path(rev_a)):
        a, b = Path(target).resolve(), Path(rev_a).resolve()
        return (Side(Snapshot(a.parent), "", a.name, str(target)), Side(Snapshot(b.parent), "", b.name, str(rev_a)))
    path = Path(target)
    if not path.is_absolute() and not (root / path).exists() and len(path.parts) == 1:
        path = DATA_DIR / path  # a bare dataset name
    try:
        rel = (root / path).resolve().relative_to(root.resolve())
    except ValueError:
        raise KdError(f"{target}: not inside the project {root.resolve()}") from None
    data_rel, name = rel.parent.as_posix(), rel.name
    rev_a = rev_a or "HEAD"
    labels = [f"{r} ({resolve_rev(root, r)[:10]})" if r else "workspace" for r in (rev_a, rev_b)]
    return (Side(Snapshot(root, rev_a), data_rel, name, labels[0]), Side(Snapshot(root, rev_b), data_rel, name, labels[1]))


def _is_dataset_dir(path: Path) -> bool:
    return (path / MANIFEST_FILE).is_file()


def _by_identity(records: list[dict[str, Any]], parent: Any) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    seen: Counter[str] = Counter()
    for rec in records:
        key = identity(rec, parent)
        seen[key] += 1
        out[key if seen[key] == 1 else f"{key} #{seen[key]}"] = rec  # same input answered twice (two sources)
    return out


def _match(p: _Pairing, a: Side, b: Side) -> tuple[list[tuple[str, dict, dict]], dict[str, dict], dict[str, dict]]:
    """(changed pairs, removed, added) among the records found on one side only.

    First by parent ids, which is cheap and enough when parents did not change; what is left is matched
    again by the parents' own identities, read from each version of their datasets.
    """
    old, new = _by_identity(list(p.rest_a.values()), raw_parent), _by_identity(list(p.rest_b.values()), raw_parent)
    pairs: list[tuple[str, dict, dict]] = []
    for second in (False, True):
        if second:
            if not (old and new and any((r.get("provenance") or {}).get("parents") for r in [*old.values(), *new.values()])):
                break
            old, new = _by_identity(list(old.values()), a.parent_token), _by_identity(list(new.values()), b.parent_token)
        matched = old.keys() & new.keys()
        pairs += [(k, old[k], new[k]) for k in matched]
        old = {k: r for k, r in old.items() if k not in matched}
        new = {k: r for k, r in new.items() if k not in matched}
    return sorted(pairs, key=lambda x: x[0]), old, new


def _request_keys(record: dict[str, Any]) -> list[str]:
    return [r.get("key", "") for r in (record.get("provenance") or {}).get("requests") or []]


def _provenance_changes(old: dict[str, Any], new: dict[str, Any]) -> str:
    """Which provenance fields differ, for records whose content did not change."""
    po, pn = old.get("provenance") or {}, new.get("provenance") or {}
    fields = {k for k in set(po) | set(pn) if k != "requests" and po.get(k) != pn.get(k)}
    for ro, rn in zip(po.get("requests") or [], pn.get("requests") or [], strict=False):
        fields |= {f"requests.{k}" for k in set(ro) | set(rn) if ro.get(k) != rn.get(k)}
    return ", ".join(sorted(fields)) or "key order"


@dataclass
class _Pairing:
    """Lines of both versions paired by record id."""

    ia: dict[bytes, bytes]  # id -> line
    ib: dict[bytes, bytes]
    common: list[bytes]  # ids on both sides (same content), in id order
    restamped: list[bytes]  # of those, the ones whose line differs: new provenance only
    rest_a: dict[bytes, dict[str, Any]]  # parsed records found on one side only
    rest_b: dict[bytes, dict[str, Any]]
    sample: list[tuple[dict[str, Any], dict[str, Any]]]  # the first restamped pairs, parsed


def _pair(la: list[bytes], lb: list[bytes]) -> _Pairing:
    """Pair records by id, parsing only the lines that need it.

    After a template edit most lines differ, but only in provenance; those are paired by the id each line
    starts with and never parsed. Every line that is parsed checks that id, and two lines under one key are
    counted; either failing (a record shape kd does not write) makes the pairing parse everything instead.
    """
    for exact in (False, True):
        ia, ib = _index(la, exact), _index(lb, exact)
        if not exact and (len(ia) != len(la) or len(ib) != len(lb)):
            continue
        common = [i for i in ia if i in ib]  # files are sorted by id, so this is id order
        restamped = [i for i in common if ia[i] != ib[i]]
        rest_a = {i: loads(line) for i, line in ia.items() if i not in ib}
        rest_b = {i: loads(line) for i, line in ib.items() if i not in ia}
        sample = [(loads(ia[i]), loads(ib[i])) for i in restamped[:PROVENANCE_SAMPLE]]
        checked = [*rest_a.items(), *rest_b.items(), *((i, x) for i, (x, _) in zip(restamped, sample, strict=False)),
                   *((i, y) for i, (_, y) in zip(restamped, sample, strict=False))]
        if exact or all(str(r.get("id", "")).encode() == i for i, r in checked):
            return _Pairing(ia, ib, common, restamped, rest_a, rest_b, sample)
    raise AssertionError("the exact pairing always returns")


def _index(lines: list[bytes], exact: bool) -> dict[bytes, bytes]:
    return {str(loads(line).get("id", "")).encode(): line for line in lines} if exact else index_by_id(lines)


def _restamped_requests(p: _Pairing, keys_a: set[bytes], keys_b: set[bytes]) -> int:
    """How many records with unchanged content were asked a different request.

    Read from all request keys of each file at once: keys that appear or vanish only there, and not in a
    record that was parsed anyway, are looked up record by record (rare: a render changed, its answer not).
    """
    parsed_a = {k.encode() for r in p.rest_a.values() for k in _request_keys(r)}
    parsed_b = {k.encode() for r in p.rest_b.values() for k in _request_keys(r)}
    if not (keys_b - keys_a - parsed_b) and not (keys_a - keys_b - parsed_a):
        return 0
    return sum(_KEY.findall(p.ia[i]) != _KEY.findall(p.ib[i]) for i in p.restamped)


def diff(a: Side, b: Side, root: Path, examples: int = 3, cache_dir: Path | None = None) -> dict[str, Any]:
    """The whole comparison as one JSON-able dict (what `--json` prints)."""
    # Parsed records hold no reference cycles; the cyclic collector would only rescan them over and over
    # (a quarter of the CPU time on a million records).
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _diff(a, b, root, examples, cache_dir)
    finally:
        if enabled:
            gc.enable()


def _diff(a: Side, b: Side, root: Path, examples: int, cache_dir: Path | None) -> dict[str, Any]:
    if a.snap.rev is None and b.snap.rev is None:
        b.shared = a.shared  # both read the disk: a parent dataset is indexed once
    ma, da = a.load()
    keys_a, la = set(_KEY.findall(da)), iter_lines(da)
    del da  # the lines are copies: keep one of the two in memory
    mb, db = b.load()
    keys_b, lb = set(_KEY.findall(db)), iter_lines(db)
    del db
    if ma is None and mb is None:
        raise KdError(f"{a.file(a.name, '')}: no dataset in either version ({a.label}, {b.label})")
    p = _pair(la, lb)
    changed, removed, added = _match(p, a, b)

    groups: dict[str, dict[str, Any]] = {}
    rows = []
    for key, ro, rn in changed:
        mine: list[str] = []
        for c in causes(ro, rn):
            ck = canonical_json(c)
            g = groups.setdefault(ck, {**c, "description": describe(c), "records": 0})
            if ck not in mine:
                g["records"] += 1
                mine.append(ck)
        rows.append({"identity": key, "old": ro["id"], "new": rn["id"], "causes": [groups[c]["description"] for c in mine]})
    env = environment_changes((ma or {}).get("environment"), (mb or {}).get("environment"))
    if env and (answer := groups.pop(canonical_json({"kind": "answer"}), None)):
        # the same request answered differently under another library, precision or CPU: the environment is why
        groups["environment"] = {"kind": "environment", "changes": env, "records": answer["records"],
                                 "description": "environment " + ", ".join(env)}
    cause_list = sorted(groups.values(), key=lambda g: (-g["records"], g["description"]))
    for g in cause_list:
        if g["kind"] == "template" and g.get("old") and g.get("new"):
            g["template_diff"] = _template_diff(root, g, a, b)
    prov = Counter(_provenance_changes(ro, rn) for ro, rn in p.sample)
    requests_changed = sum(_request_keys(ro) != _request_keys(rn) for _, ro, rn in changed)
    requests_changed += _restamped_requests(p, keys_a, keys_b)
    del la, lb
    cache = RequestCache(cache_dir or root / CACHE_DIR)
    by_new = {rn["id"]: (ro, rn) for _, ro, rn in changed}
    return {
        "dataset": b.name if mb is not None else a.name,
        "old": _side_summary(a, ma, len(p.ia)),
        "new": _side_summary(b, mb, len(p.ib)),
        "counts": {"added": len(added), "removed": len(removed),
                   "changed": len(changed), "unchanged": len(p.common), "provenance_only": len(p.restamped),
                   "requests_changed": requests_changed},
        "causes": cause_list,
        "environment": env,  # what differs between the environments the two manifests recorded
        # which provenance fields moved, itemised for the first PROVENANCE_SAMPLE such records
        "provenance_only": [{"fields": f, "records": n} for f, n in prov.most_common()],
        "provenance_only_itemised": len(p.sample),
        "rejected": _rejected(ma, mb),
        "changed": rows,
        "added": [{"identity": k, "id": r["id"]} for k, r in sorted(added.items())],
        "removed": [{"identity": k, "id": r["id"]} for k, r in sorted(removed.items())],
        "examples": [_example(row, *by_new[row["new"]], cache) for row in _pick_examples(rows, examples)],
    }


def _side_summary(side: Side, manifest: dict[str, Any] | None, n: int) -> dict[str, Any]:
    if manifest is None:
        return {"version": side.label, "exists": False, "records": 0}
    return {"version": side.label, "exists": True, "records": n, "fingerprint": manifest.get("fingerprint"),
            "teacher": manifest.get("teacher"), "templates": manifest.get("templates", [])}


def _rejected(ma: dict[str, Any] | None, mb: dict[str, Any] | None) -> dict[str, list[int]]:
    ra, rb = (ma or {}).get("rejected", {}), (mb or {}).get("rejected", {})
    return {k: [ra.get(k, 0), rb.get(k, 0)] for k in sorted(set(ra) | set(rb)) if ra.get(k, 0) != rb.get(k, 0)}


def _template_diff(root: Path, cause: dict[str, Any], a: Side, b: Side) -> str | None:
    """The template's own unified diff, when git (or the workspace) still has both versions."""
    old = text_with_sha(root, cause.get("old_path") or cause["path"], cause["old"], (a.snap.rev,))
    new = text_with_sha(root, cause["path"], cause["new"], (b.snap.rev,))
    if old is None or new is None:
        return None
    return unified(old, new, f"{cause.get('old_path') or cause['path']}@{cause['old'][:12]}",
                   f"{cause['path']}@{cause['new'][:12]}")


def _pick_examples(rows: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """One record per distinct set of causes first, then the rest in order, up to n."""
    first: dict[tuple[str, ...], dict[str, Any]] = {}
    for row in rows:
        first.setdefault(tuple(row["causes"]), row)
    picked = list(first.values())[:n]
    picked += [r for r in rows if r not in picked][: n - len(picked)]
    return picked


def _example(row: dict[str, Any], old: dict[str, Any], new: dict[str, Any], cache: RequestCache) -> dict[str, Any]:
    prompts = []
    for i, (ko, kn) in enumerate(zip(_request_keys(old), _request_keys(new), strict=False)):
        if ko == kn:
            continue
        eo, en = cache.get_entry(ko), cache.get_entry(kn)
        text = None
        if eo and en:
            text = unified(messages_text(eo["request"]["messages"]), messages_text(en["request"]["messages"]),
                           f"request {i + 1} {ko[:12]}", f"request {i + 1} {kn[:12]}")
        prompts.append({"request": i + 1, "old_key": ko, "new_key": kn, "diff": text,
                        "missing": [k for k, e in ((ko, eo), (kn, en)) if e is None]})
    return {**row, "prompt_diffs": prompts,
            "output_diff": unified(content_text(old), content_text(new), f"record {old['id'][:12]}",
                                   f"record {new['id'][:12]}")}


def render(report: dict[str, Any], style: Any, listed: int = 5) -> str:
    """The report for people: counts, causes (with template diffs), examples (prompt and output diffs)."""
    s, c, o, n = style, report["counts"], report["old"], report["new"]
    lines = [s.bold(f"kd diff {report['dataset']}: {o['version']} -> {n['version']}"),
             f"  records {o['records']} -> {n['records']}: {s.yellow(str(c['changed']) + ' changed')}, "
             f"{s.green(str(c['added']) + ' added')}, {s.red(str(c['removed']) + ' removed')}, "
             f"{c['unchanged']} unchanged ({c['provenance_only']} of them with new provenance only)",
             f"  teacher requests that differ: {c['requests_changed']}"]
    for side in (o, n):
        if not side["exists"]:
            lines.append(f"  (no dataset at {side['version']})")
    if o.get("fingerprint") != n.get("fingerprint") and o["exists"] and n["exists"]:
        lines.append(f"  fingerprint {o['fingerprint'][:12]} -> {n['fingerprint'][:12]}")
    for reason, (x, y) in report["rejected"].items():
        lines.append(f"  rejected ({reason}) {x} -> {y}")
    if report["environment"]:
        lines.append(f"  environment: {', '.join(report['environment'])}")
    if report["causes"]:
        lines += ["", s.bold(f"causes of the {c['changed']} changed records")]
        for g in report["causes"]:
            lines.append(f"  {g['records']:>6}  {g['description']}")
            if g.get("template_diff"):
                lines.append(s.diff(g["template_diff"], " " * 10))
    if report["provenance_only"]:
        sampled = report["provenance_only_itemised"] < c["provenance_only"]
        lines += ["", s.bold("same content, new provenance" + (f" (fields itemised for the first "
                                                                 f"{report['provenance_only_itemised']})" if sampled else ""))]
        lines += [f"  {p['records']:>6}  {p['fields']}" for p in report["provenance_only"]]
    if report["examples"]:
        lines += ["", s.bold(f"changed records ({len(report['examples'])} of {c['changed']} shown)")]
    for ex in report["examples"]:
        lines += [f"  {s.cyan(ex['identity'])}", f"    id {ex['old'][:12]} -> {ex['new'][:12]}; "
                  f"{'; '.join(ex['causes'])}"]
        for p in ex["prompt_diffs"]:
            if p["diff"]:
                lines += [f"    rendered request {p['request']}:", s.diff(p["diff"], "      ")]
            else:
                lines.append(f"    rendered request {p['request']}: not in the local request cache "
                             f"({', '.join(k[:12] for k in p['missing'])}; `kd cache pull` may have it)")
        lines += ["    output:", s.diff(ex["output_diff"], "      ")]
    for kind, colour in (("added", s.green), ("removed", s.red)):
        rows = report[kind]
        if rows:
            lines += ["", s.bold(f"{kind} ({min(listed, len(rows))} of {len(rows)} shown)")]
            lines += [colour(f"  {r['id'][:12]}  {r['identity']}") for r in rows[:listed]]
    return "\n".join(lines) + "\n"
