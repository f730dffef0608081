"""`kd status`: which generation stages `dvc repro` would run, and what each would ask the teacher and cost.

DVC decides what is stale (its own `status`, so kd and `dvc repro` never disagree); stages downstream of a
stale one will rerun too once their inputs change, so they are listed with an approximate forecast made
from today's upstream data, and so is a stale stage that is also downstream of another stale one.

A partly built project (a fresh clone, a student not trained yet) still gets every forecast that can be made:
a stage whose inputs are missing is forecast as far as they allow, or gets a line saying why it cannot be,
naming the stage that builds what it lacks.
"""

from __future__ import annotations

import json
from collections import deque
from pathlib import Path
from typing import Any

from kd.cache.store import RequestCache
from kd.config import load_params
from kd.elicit import curation, expansion, feedback, labeling, self_knowledge
from kd.elicit.build import Method, plan_streamed
from kd.elicit.common import Streamed
from kd.errors import KdError
from kd.paths import CACHE_DIR, DATA_DIR, DVC_FILE, MODELS_DIR
from kd.pipeline.spec import Stage, stages
from kd.provenance.forecast import forecast, money
from kd.records import MANIFEST_FILE
from kd.runtime.environment import changes as environment_changes
from kd.runtime.environment import collect
from kd.runtime.models import INFO_FILE


def stale_stages(root: Path) -> dict[str, list[str]]:
    """DVC's own answer: stage name -> what changed (deps, params, outs)."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        with Repo(str(root)) as repo:
            status = repo.status()
    except DvcException as e:
        raise KdError(f"dvc status failed: {e}") from None
    out: dict[str, list[str]] = {}
    for stage, changes in status.items():
        reasons = []
        for change in changes:
            if isinstance(change, dict):
                for kind, what in change.items():
                    reasons += [f"{kind}: {k} {v}" for k, v in what.items()] if isinstance(what, dict) else [kind]
            else:
                reasons.append(str(change))
        out[stage.split(":")[-1]] = reasons
    return out


def method(name: str) -> Method | Streamed:
    """The generation method a dataset's `method:` names (what its stage script passes to the build)."""
    match name:
        case "labeling":
            return labeling.label
        case "expansion":
            return expansion.expand
        case "curation":
            return curation.curate
        case "feedback":
            return feedback.feedback
        case "self_knowledge":
            return self_knowledge.self_knowledge
    raise AssertionError(name)


def _graph(graph: list[Stage]) -> dict[str, dict[str, Any]]:
    # the `params` check is no build: it rewrites its out with the same bytes, so nothing reruns because of it
    return {s.name: {"outs": s.outs, "deps": s.deps, "dataset": s.builds if s.kind == "dataset" else None}
            for s in graph if s.kind != "params"}


def _downstream(graph: dict[str, dict[str, Any]], stale: set[str]) -> dict[str, str]:
    """Stages whose inputs a stale stage upstream will rewrite: name -> the nearest such stage. Stale stages are
    included: their forecast, made from today's upstream data, is then only approximate."""
    found: dict[str, str] = {}
    frontier = deque(n for n in graph if n in stale)
    while frontier:
        up = frontier.popleft()
        outs = graph.get(up, {}).get("outs", [])
        for name, st in graph.items():
            if name == up or name in found:
                continue
            if any(_within(d, o) for d in st["deps"] for o in outs):
                found[name] = up
                frontier.append(name)
    return found


def _within(path: str, out: str) -> bool:
    return path == out or path.startswith(out.rstrip("/") + "/")


def _missing(graph: dict[str, dict[str, Any]], name: str, root: Path) -> list[str]:
    """`path (built by stage X)` for each input of a stage that another stage builds and that is not there yet."""
    out = []
    for dep in graph[name]["deps"]:
        builders = [up for up, st in graph.items() if up != name and any(_within(dep, o) for o in st["outs"])]
        if builders and not (root / dep).exists():
            out.append(f"{dep} (built by stage `{builders[0]}`, not run yet)")
    return out


def status(root: Path) -> dict[str, Any]:
    """Forecasts for every generation stage that `dvc repro` would run, in dvc.yaml order.

    A stage that cannot be forecast gets `error` (why, and what it lacks) instead of `forecast`; the others
    are still computed."""
    if not (root / DVC_FILE).is_file():
        raise KdError(f"{root.resolve()}: no {DVC_FILE}")
    params = load_params(root)
    graph = _graph(stages(params, root))
    stale = stale_stages(root)
    later = _downstream(graph, set(stale))
    cache = RequestCache(root / CACHE_DIR)
    data_dir = root / DATA_DIR
    rows = []
    for name, st in graph.items():
        if name not in stale and name not in later:
            continue
        row: dict[str, Any] = {"stage": name, "why": stale.get(name) or [f"upstream stage {later[name]} is stale"]}
        if st["dataset"] and st["dataset"] in params.datasets:
            ds = st["dataset"]
            cfg = params.datasets[ds]
            missing = _missing(graph, name, root)
            m = None if cfg.method == "feature" else method(cfg.method)
            try:
                if isinstance(m, Streamed):
                    fc = plan_streamed(ds, m, params, root, cache, data_dir, spool=False)[0]
                else:
                    fc = forecast(ds, params, root, cache,
                                  None if m is None else
                                  lambda askers, ds=ds, cfg=cfg, m=m: m(ds, cfg, root, data_dir, askers), data_dir)
            except KdError as e:
                # what it lacks says more than the first error its absence caused
                row["error"] = f"cannot forecast yet: needs {', '.join(missing)}" if missing else f"cannot forecast: {e}"
                rows.append(row)
                continue
            if missing:
                fc.notes.append(f"needs {', '.join(missing)}")
            if name in later:
                fc.approximate = True
                fc.notes.append(f"made from today's inputs; upstream {later[name]} will change them")
            row["forecast"] = fc.as_dict()
        rows.append(row)
    totals = _totals([s["forecast"] for s in rows if "forecast" in s])
    return {"stages": rows, "total": totals, "environment": environment_drift(root)}


def environment_drift(root: Path) -> dict[str, Any] | None:
    """How this machine and its libraries differ from the environment recorded by the datasets and models in the
    workspace (the outputs a build would reuse): {"changes": [...], "outputs": [...]}, or None when they agree or
    none was recorded. Device and dtype are left out: they are resolved only when a run starts."""
    here = collect()
    found: dict[str, list[str]] = {}
    for path in sorted([*(root / DATA_DIR).glob(f"*/{MANIFEST_FILE}"), *(root / MODELS_DIR).glob(f"*/{INFO_FILE}")]):
        try:
            recorded = json.loads(path.read_text(encoding="utf-8")).get("environment")
        except (OSError, ValueError, AttributeError):
            continue  # a damaged output is reported by the stage that reads it, not here
        for change in environment_changes(recorded, here, machine_only=True):
            found.setdefault(change, []).append(path.parent.name)
    if not found:
        return None
    return {"changes": list(found), "outputs": sorted({o for names in found.values() for o in names})}


def drift_line(drift: dict[str, Any]) -> str:
    """The one-line warning `kd status` prints when the environment differs from the recorded one."""
    outs = drift["outputs"]
    named = ", ".join(outs[:4]) + (f" and {len(outs) - 4} more" if len(outs) > 4 else "")
    return (f"warning: this environment differs from the one that built {named}: {'; '.join(drift['changes'])} "
            f"(cached answers still apply; fresh teacher answers and training may give other numbers)")


def forecast_failed(report: dict[str, Any]) -> bool:
    """True when there were generation stages to forecast and none could be (`kd status` exits 1)."""
    return any("error" in r for r in report["stages"]) and not any("forecast" in r for r in report["stages"])


def _totals(forecasts: list[dict[str, Any]]) -> dict[str, Any]:
    costs = [f["cost"] for f in forecasts]
    return {"new": sum(f["new"] for f in forecasts if f["method"] != "feature"),
            "cached": sum(f["cached"] for f in forecasts),
            "prompt_tokens": sum(f["prompt_tokens"] for f in forecasts),
            "completion_tokens": sum(f["completion_tokens"] for f in forecasts),
            "cost": None if any(c is None for c in costs) else sum(costs),
            "approximate": any(f["approximate"] for f in forecasts)}


def render(report: dict[str, Any], style: Any) -> str:
    s = style
    warning = s.yellow(drift_line(report["environment"])) + "\n" if report.get("environment") else ""
    if not report["stages"]:
        return warning + "kd status: every stage is up to date; `dvc repro` would run nothing\n"
    lines = [s.bold("stage          new requests  cached   est. prompt  est. completion  est. cost")]
    for row in report["stages"]:
        f = row.get("forecast")
        if "error" in row:
            lines.append(f"{row['stage']:<14} {row['error']}")
            lines.append(s.dim(f"  why: {'; '.join(row['why'])}"))
            continue
        if f is None:
            lines.append(f"{row['stage']:<14} {s.dim('(not a generation stage)')}  {'; '.join(row['why'])[:80]}")
            continue
        a = "≈" if f["approximate"] else ""
        lines.append(f"{row['stage']:<14} {a + str(f['new']):>12}  {a + str(f['cached']):>6}   "
                     f"{a + str(f['prompt_tokens']):>11}  {a + str(f['completion_tokens']):>15}  {money(f['cost'])}")
        lines.append(s.dim(f"  why: {'; '.join(row['why'])}"))
        if f["estimated"]:
            lines.append(s.dim(f"  ≈{f['estimated']} of the new requests are rendered from answers not known yet"))
        for note in f["notes"]:
            lines.append(s.dim(f"  {note}"))
    t = report["total"]
    a = "≈" if t["approximate"] else ""
    lines.append(s.bold(f"{'total':<14} {a + str(t['new']):>12}  {a + str(t['cached']):>6}   "
                        f"{a + str(t['prompt_tokens']):>11}  {a + str(t['completion_tokens']):>15}  {money(t['cost'])}"))
    return warning + "\n".join(lines) + "\n"

