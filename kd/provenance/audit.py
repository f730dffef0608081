"""`kd audit`: where a record came from (back to its seeds), and what a model was trained on.

A record's lineage follows `provenance.parents` through the datasets in data/ to seed rows, and for every
step names the template (path, sha256, whether today's file still has it, and the git commit that had it),
the teacher, the sampling params, the rendered request (from the request cache) and the token usage.
"""

from __future__ import annotations

import json
import mmap
from pathlib import Path
from typing import Any

from kd.cache.store import RequestCache
from kd.errors import KdError
from kd.paths import CACHE_DIR, DATA_DIR, MODELS_DIR
from kd.provenance.lineage import find_by_id, loads
from kd.provenance.revisions import git, resolve_rev, template_origin
from kd.records import MANIFEST_FILE, RECORDS_FILE, read_jsonl, read_manifest, seed_id
from kd.runtime.models import INFO_FILE, ModelInfo, read_info
from kd.tracking import DIRTY_SUFFIX

MAX_DESCENDANTS = 100  # records followed downstream when asking which models learned from a record


def mapped(path: Path) -> bytes:
    """A file's bytes, memory-mapped rather than read: a million-record dataset is a gigabyte, and a lookup
    searches it once (`kd view` opens a record page per click). b"" when missing or empty (unmappable)."""
    try:
        with path.open("rb") as f:
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # type: ignore[return-value]
    except (FileNotFoundError, IsADirectoryError, ValueError):
        return b""


class _Project:
    """Today's datasets and seeds, each read once per audit."""

    def __init__(self, root: Path, data_dir: Path) -> None:
        self.root, self.data_dir = root, data_dir
        self.cache = RequestCache(root / CACHE_DIR)
        self._bytes: dict[str, bytes] = {}
        self._seeds: dict[str, dict[str, dict[str, Any]]] = {}
        self._seed_bytes: dict[str, bytes] = {}
        self._origins: dict[tuple[str, str], dict[str, Any]] = {}

    def datasets(self) -> list[str]:
        return sorted(p.parent.name for p in self.data_dir.glob(f"*/{MANIFEST_FILE}"))

    def records(self, dataset: str) -> bytes:
        if dataset not in self._bytes:
            self._bytes[dataset] = mapped(self.data_dir / dataset / RECORDS_FILE)
        return self._bytes[dataset]

    def manifest(self, dataset: str) -> dict[str, Any] | None:
        path = self.data_dir / dataset / MANIFEST_FILE
        return read_manifest(path.parent) if path.is_file() else None  # a damaged one: one line, not a traceback

    def seed(self, file: str, sid: str) -> dict[str, Any] | None:
        """Today's row of a seed file, found by searching for its id before parsing the whole file."""
        path = self.root / file
        if not path.is_file():
            return None
        if file not in self._seeds:
            if file not in self._seed_bytes:
                self._seed_bytes[file] = path.read_bytes()
            hit = [r for r in find_by_id(self._seed_bytes[file], sid) if seed_id(r) == sid]
            if hit:
                return hit[0]
            self._seeds[file] = {seed_id(r): r for r in read_jsonl(path)}  # ids derived from content: parse all
        return self._seeds[file].get(sid)

    def template(self, path: str, sha256: str) -> dict[str, Any]:
        if (path, sha256) not in self._origins:
            self._origins[(path, sha256)] = {"path": path, "sha256": sha256,
                                             **template_origin(self.root, path, sha256)}
        return self._origins[(path, sha256)]


def find_record(project: _Project, prefix: str) -> tuple[str, dict[str, Any]]:
    """The one record whose id starts with `prefix` (optionally `dataset:prefix`), across data/."""
    dataset, _, prefix = prefix.rpartition(":")
    if len(prefix) < 4 or any(ch not in "0123456789abcdef" for ch in prefix):
        raise KdError(f"{prefix!r}: give at least 4 hex characters of a record id")
    names = [dataset] if dataset else project.datasets()
    hits = [(ds, r) for ds in names for r in find_by_id(project.records(ds), prefix)]
    if not hits:
        raise KdError(f"no record id starts with {prefix} in {', '.join(f'data/{n}' for n in names) or 'data/'}")
    if len(hits) > 1:
        listed = ", ".join(f"{ds}:{r['id'][:16]}" for ds, r in hits[:8])
        raise KdError(f"{prefix} is ambiguous ({len(hits)} records: {listed}); give more characters, "
                      f"or DATASET:PREFIX")
    return hits[0]


def audit_record(root: Path, prefix: str, data_dir: Path | None = None, models_dir: Path | None = None) -> dict[str, Any]:
    project = _Project(root, data_dir or root / DATA_DIR)
    dataset, record = find_record(project, prefix)
    seen: set[tuple[str, str]] = set()
    tree = _step(project, dataset, record, seen)
    seeds = sorted({(s["file"], s["id"]) for s in _walk(tree, "seeds")})
    descendants = _descendants(project, dataset, record["id"])
    return {"dataset": dataset, "id": record["id"], "lineage": tree,
            "seeds": [{"file": f, "id": i} for f, i in seeds],
            "descendants": [{"dataset": d, "id": i} for d, i in descendants],
            "models": _models_using(project, models_dir or root / MODELS_DIR, {dataset} | {d for d, _ in descendants})}


def _step(project: _Project, dataset: str, record: dict[str, Any], seen: set[tuple[str, str]]) -> dict[str, Any]:
    seen.add((dataset, record["id"]))
    prov = record.get("provenance") or {}
    parents = []
    for p in prov.get("parents") or []:
        key = (p.get("dataset", ""), p.get("id", ""))
        if key in seen:
            parents.append({"dataset": key[0], "id": key[1], "shown_above": True})
            continue
        found = find_by_id(project.records(key[0]), key[1])
        parents.append(_step(project, key[0], found[0], seen) if found
                       else {"dataset": key[0], "id": key[1], "missing": True})
    return {
        "dataset": dataset, "id": record["id"], "method": prov.get("method"),
        "content": {k: v for k, v in record.items() if k not in ("id", "provenance")},
        "requests": [_request(project, r) for r in prov.get("requests") or []],
        "filters": prov.get("filters") or [],
        "seeds": [{"file": s.get("file"), "id": s.get("id"), "row": project.seed(s.get("file", ""), s.get("id", ""))}
                  for s in prov.get("seeds") or []],
        "parents": parents,
    }


def _request(project: _Project, r: dict[str, Any]) -> dict[str, Any]:
    t = r.get("template") or {}
    entry = project.cache.get_entry(r.get("key", ""))
    return {
        "key": r.get("key"),
        "kind": r.get("kind"),  # "loglik"/"reward": a white-box score (kd.runtime.scoring), rendered by no template
        "template": project.template(t.get("path", ""), t.get("sha256", "")) if t else None,
        "includes": [project.template(p, h) for p, h in sorted((t.get("includes") or {}).items())],
        "teacher": r.get("teacher"), "sampling": r.get("sampling"), "sample_index": r.get("sample_index"),
        "usage": r.get("usage"), "finish_reason": r.get("finish_reason"), "served_by": r.get("served_by"),
        "messages": entry["request"]["messages"] if entry else None,
    }


def _walk(node: dict[str, Any], field: str) -> list[dict[str, Any]]:
    out = list(node.get(field) or [])
    for p in node.get("parents") or []:
        out += _walk(p, field)
    return out


def _descendants(project: _Project, dataset: str, record_id: str) -> list[tuple[str, str]]:
    """Records in data/ that name this record (or its descendants) as a parent, breadth first, capped."""
    out: list[tuple[str, str]] = []
    frontier = [(dataset, record_id)]
    names = project.datasets()
    while frontier and len(out) < MAX_DESCENDANTS:
        ds, rid = frontier.pop(0)
        for name in names:
            data = project.records(name)
            pos = 0
            needle = rid.encode()
            while (i := data.find(needle, pos)) != -1 and len(out) < MAX_DESCENDANTS:
                start, end = data.rfind(b"\n", 0, i) + 1, data.find(b"\n", i)
                end = len(data) if end == -1 else end
                pos = end + 1
                rec = loads(data[start:end])
                if any(p.get("dataset") == ds and p.get("id") == rid for p in rec.get("provenance", {}).get("parents") or []):
                    out.append((name, rec["id"]))
                    frontier.append((name, rec["id"]))
    return out


def _models_using(project: _Project, models_dir: Path, datasets: set[str]) -> list[dict[str, Any]]:
    out = []
    for meta_path in sorted(models_dir.glob(f"*/{INFO_FILE}")):
        info = read_info(meta_path.parent)
        used = [d for d in [*info.datasets, info.logits] if d is not None and d.name in datasets]
        if used:
            out.append({"model": str(meta_path.parent.relative_to(project.root)) if meta_path.is_relative_to(project.root)
                        else str(meta_path.parent), "via": [_fingerprint_check(project, d.model_dump()) for d in used]})
    return out


def _fingerprint_check(project: _Project, ref: dict[str, Any]) -> dict[str, Any]:
    manifest = project.manifest(ref.get("name", ""))
    today = manifest.get("fingerprint") if manifest else None
    return {"name": ref.get("name"), "fingerprint": ref.get("fingerprint"), "today": today,
            "matches": today is not None and today == ref.get("fingerprint")}


def audit_model(root: Path, model_dir: Path, data_dir: Path | None = None) -> dict[str, Any]:
    """What `models/<name>/kd_model.json` says, checked against today's manifests, git and MLflow."""
    info: ModelInfo = read_info(model_dir)
    project = _Project(root, data_dir or root / DATA_DIR)
    commit = info.git_commit
    try:
        known = bool(commit) and resolve_rev(root, commit.removesuffix(DIRTY_SUFFIX)) is not None
    except KdError:
        known = False
    return {
        "model": str(model_dir), "name": info.name, "objective": info.objective,
        "init": info.init, "params": info.params,
        "datasets": [_fingerprint_check(project, d.model_dump()) for d in info.datasets],
        "logits": _fingerprint_check(project, info.logits.model_dump()) if info.logits else None,
        "git_commit": {"commit": commit, "in_repository": known,
                       "subject": git(root, "log", "-1", "--format=%s", commit.removesuffix(DIRTY_SUFFIX)).decode().strip() if known else None},
        "metrics": info.metrics,
        "mlflow": mlflow_run(root, info.mlflow.tracking_uri, info.mlflow.run_id),
    }


def tracking_uri(root: Path, uri: str | None) -> str:
    """An MLflow tracking URI made absolute against the project root (kd's default is sqlite:///mlflow.db)."""
    uri = uri or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{(root / uri.removeprefix('sqlite:///')).resolve()}"
    if "://" not in uri:
        return str((root / uri).resolve())
    return uri


def mlflow_run(root: Path, uri: str | None, run_id: str | None) -> dict[str, Any]:
    """The run and its metrics, or why it cannot be found. MLflow is imported only here (≈1 s)."""
    if not run_id:
        return {"found": False, "error": "the model names no MLflow run"}
    uri = tracking_uri(root, uri)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return {"found": False, "run_id": run_id, "tracking_uri": uri, "error": "tracking store does not exist"}
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        run = MlflowClient(tracking_uri=uri).get_run(run_id)
    except MlflowException as e:
        return {"found": False, "run_id": run_id, "tracking_uri": uri, "error": str(e).splitlines()[0]}
    return {"found": True, "run_id": run_id, "tracking_uri": uri, "status": run.info.status,
            "experiment_id": run.info.experiment_id, "run_name": run.info.run_name,
            "metrics": dict(sorted(run.data.metrics.items())), "params": dict(sorted(run.data.params.items()))}


def _short(text: str, width: int = 100) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def render_record(report: dict[str, Any], style: Any) -> str:
    s = style
    lines = [s.bold(f"kd audit {report['dataset']}:{report['id']}")]
    _render_step(report["lineage"], s, lines, "  ")
    seeds = report["seeds"]
    lines += ["", s.bold(f"seeds reached: {len(seeds)}")]
    lines += [f"  {x['file']}: {x['id']}" for x in seeds]
    if report["descendants"]:
        lines.append(s.bold(f"derived records: {len(report['descendants'])}"))
        lines += [f"  {d['dataset']}:{d['id'][:16]}" for d in report["descendants"][:10]]
    lines.append(s.bold("models trained on it or on data derived from it: " + ("none" if not report["models"] else "")))
    for m in report["models"]:
        via = ", ".join(f"{v['name']} ({'fingerprint matches today' if v['matches'] else 'an older build'})"
                        for v in m["via"])
        lines.append(f"  {m['model']}  via {via}")
    return "\n".join(lines) + "\n"


def _render_step(node: dict[str, Any], s: Any, lines: list[str], pad: str) -> None:
    if node.get("shown_above") or node.get("missing"):
        note = "shown above" if node.get("shown_above") else s.red("not found in today's data (rebuilt since?)")
        lines.append(f"{pad}{node['dataset']}:{node['id'][:16]}  {note}")
        return
    lines.append(f"{pad}{s.cyan(node['dataset'] + ':' + node['id'][:16])}  ({node['method']})")
    for key, value in node["content"].items():
        if isinstance(value, list) and all(isinstance(m, dict) and "role" in m for m in value):
            text = " / ".join(f"{m.get('role')}: {m.get('content')}" for m in value)
        else:  # e.g. a feedback record's ranked `candidates`
            text = f"[{len(value)} items]" if isinstance(value, list) else value
        if text not in ("", None, []):
            lines.append(f"{pad}  {key}: {_short(text)}")
    for n, r in enumerate(node["requests"], 1):
        lines.append(f"{pad}  request {n}  key {str(r['key'])[:16]}")
        if r.get("kind"):
            lines.append(f"{pad}    scored   {r['kind']} (white-box, no template)")
        templates = [("template", r["template"])] if r["template"] else []
        for label, t in templates + [("include", i) for i in r["includes"]]:
            today = s.green("today's file has it") if t["current"] else s.yellow("today's file differs")
            where = f"commit {t['commit'][:10]} (introduced in {t['introduced'][:10]})" if t["commit"] else \
                s.yellow("in no commit")
            lines.append(f"{pad}    {label:<9}{t['path']}  sha256 {t['sha256'][:16]}  {today}; {where}")
        lines.append(f"{pad}    teacher  {json.dumps(r['teacher'], sort_keys=True)}")
        if r.get("served_by"):  # an OpenAI-compatible server: where the answer came from, and what it said it ran
            served, asked = r["served_by"], (r.get("teacher") or {}).get("model")
            other = f" (asked for {asked})" if served.get("model") and served["model"] != asked else ""
            lines.append(f"{pad}    served   by {served.get('endpoint')}, model {served.get('model') or '(not reported)'}"
                         f"{other}")
        lines.append(f"{pad}    sampling {json.dumps(r['sampling'], sort_keys=True)}  sample {r['sample_index']}")
        usage = r["usage"] or {}
        lines.append(f"{pad}    usage    {usage.get('prompt_tokens', '?')} prompt + "
                     f"{usage.get('completion_tokens', '?')} completion tokens ({r['finish_reason']})")
        if r["messages"] is None:
            lines.append(f"{pad}    request  not in the local request cache (`kd cache pull` may have it)")
        for m in r["messages"] or []:
            lines.append(f"{pad}    {m['role']:<9}{_short(m['content'])}")
    for f in node["filters"]:
        lines.append(f"{pad}  filter {f.get('name')}: {'passed' if f.get('passed') else 'failed'} ({f.get('detail')})")
    for seed in node["seeds"]:
        row = seed["row"]
        text = _short(json.dumps(row, ensure_ascii=False, sort_keys=True), 90) if row else s.red("not in today's file")
        lines.append(f"{pad}  seed {seed['file']}:{seed['id']}  {text}")
    for p in node["parents"]:
        lines.append(f"{pad}  parent:")
        _render_step(p, s, lines, pad + "    ")


def render_model(report: dict[str, Any], style: Any) -> str:
    s = style
    lines = [s.bold(f"kd audit {report['model']}  ({report['name']}, objective {report['objective']})"),
             f"  init     {json.dumps(report['init'], sort_keys=True)}",
             f"  params   {json.dumps(report['params'], sort_keys=True)}"]
    for label, refs in (("dataset", report["datasets"]), ("logits", [report["logits"]] if report["logits"] else [])):
        for d in refs:
            state = s.green("matches today's manifest") if d["matches"] else \
                s.yellow(f"today's is {d['today'][:16]}") if d["today"] else s.red("no such dataset today")
            lines.append(f"  {label:<8} {d['name']}  fingerprint {str(d['fingerprint'])[:16]}  {state}")
    g = report["git_commit"]
    lines.append(f"  commit   {g['commit']}  " + (g["subject"] if g["in_repository"] else s.red("not in this repository")))
    if report["metrics"]:
        lines.append(f"  metrics  {json.dumps(report['metrics'], sort_keys=True)}")
    m = report["mlflow"]
    if m["found"]:
        lines.append(f"  mlflow   run {m['run_id']} ({m['status']}, experiment {m['experiment_id']}) in {m['tracking_uri']}")
        lines += [f"    {k} = {v:g}" for k, v in m["metrics"].items()]
    else:
        lines.append(f"  mlflow   {s.red('run not found')}: {m.get('run_id', '')} in {m.get('tracking_uri', '')}: {m['error']}")
    return "\n".join(lines) + "\n"
