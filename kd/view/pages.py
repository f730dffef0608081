"""What `kd view`'s pages show, gathered from kd's own modules (the app only routes and renders): the stage
graph laid out for SVG, training curves as SVG polylines, the evaluation table and generations, and unified
diffs split into side-by-side rows. Every figure is drawn here as numbers; the templates escape all text."""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from kd.config import load_params
from kd.errors import KdError
from kd.paths import DATA_DIR, PLOTS_DIR, REPORTS_DIR
from kd.pipeline.spec import stages
from kd.pipeline.status import status
from kd.provenance.diff import diff, sides

BOX_W, BOX_H, GAP_X, GAP_Y = 150, 34, 60, 14


def _within(path: str, out: str) -> bool:
    return path == out or path.startswith(out.rstrip("/") + "/")


def pipeline(root: Path) -> dict[str, Any]:
    """The stage graph (from params.yaml, as dvc.yaml is written) with what `kd status` says would run."""
    try:
        graph = [s for s in stages(load_params(root), root) if s.kind != "params"]
    except KdError as e:
        return {"error": str(e), "stages": [], "boxes": [], "edges": [], "width": 0, "height": 0, "status": None}
    ups = {s.name: sorted({t.name for t in graph if t is not s and any(_within(d, o) for d in s.deps for o in t.outs)})
           for s in graph}
    try:
        report, status_error = status(root), None
    except KdError as e:
        report, status_error = None, str(e)
    rows = {r["stage"]: r for r in (report or {}).get("stages", [])}
    depth: dict[str, int] = {}
    for s in graph:  # build order: every upstream stage comes first
        depth[s.name] = 1 + max((depth[u] for u in ups[s.name] if u in depth), default=-1)
    columns: dict[int, list[str]] = defaultdict(list)
    for s in graph:
        columns[depth[s.name]].append(s.name)
    place = {name: (10 + d * (BOX_W + GAP_X), 10 + i * (BOX_H + GAP_Y))
             for d, names in columns.items() for i, name in enumerate(names)}
    boxes = [{"name": s.name, "kind": s.kind, "x": place[s.name][0], "y": place[s.name][1],
              "state": "stale" if s.name in rows else "current"} for s in graph]
    edges = [{"x1": place[u][0] + BOX_W, "y1": place[u][1] + BOX_H // 2, "x2": place[s.name][0],
              "y2": place[s.name][1] + BOX_H // 2} for s in graph for u in ups[s.name]]
    return {
        "error": None, "status_error": status_error, "status": report, "boxes": boxes, "edges": edges,
        "box_w": BOX_W, "box_h": BOX_H,
        "width": 20 + (max(columns, default=0) + 1) * (BOX_W + GAP_X),
        "height": 20 + max((len(v) for v in columns.values()), default=0) * (BOX_H + GAP_Y),
        "stages": [{"name": s.name, "kind": s.kind, "builds": s.builds, "upstream": ups[s.name], "outs": s.outs,
                    "row": rows.get(s.name)} for s in graph],
    }


def dataset_diff(root: Path, name: str, rev_a: str, rev_b: str, examples: int) -> dict[str, Any]:
    """`kd diff data/<name> rev_a [rev_b]` as the diff page shows it: the report, its diffs split side by side."""
    a, b = sides(root, str(DATA_DIR / name), rev_a, rev_b or None)
    report = diff(a, b, root, examples=examples)
    for ex in report["examples"]:
        ex["output_rows"] = side_by_side(ex["output_diff"])
        for p in ex["prompt_diffs"]:
            p["rows"] = side_by_side(p["diff"])
    return report


def curve(path: Path, y: str = "loss", width: int = 560, height: int = 180) -> dict[str, Any] | None:
    """A training curve (plots/<model>.csv: step, loss, ...) as an SVG polyline, or None if there is none."""
    if not path.is_file():
        return None
    with path.open(encoding="utf-8") as f:
        points = [(float(r["step"]), float(r[y])) for r in csv.DictReader(f) if r.get("step") and r.get(y)]
    if len(points) < 2:
        return None
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    sx, sy = (width - 60) / ((x1 - x0) or 1), (height - 30) / ((y1 - y0) or 1)
    line = " ".join(f"{50 + (x - x0) * sx:.1f},{10 + (y1 - v) * sy:.1f}" for x, v in points)
    return {"points": line, "width": width, "height": height, "y": y, "ymin": f"{y0:.4g}", "ymax": f"{y1:.4g}",
            "xmin": f"{x0:g}", "xmax": f"{x1:g}", "n": len(points)}


def model_curve(root: Path, name: str) -> dict[str, Any] | None:
    return curve(root / PLOTS_DIR / f"{name}.csv")


def evaluation(root: Path) -> dict[str, Any] | None:
    """reports/metrics.json as rows x metrics with intervals, and generations.jsonl side by side per prompt."""
    path = root / REPORTS_DIR / "metrics.json"
    if not path.is_file():
        return None
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise KdError(f"{path}: not readable JSON ({e})") from None
    table = {name: m for name, m in metrics.items() if isinstance(m, dict) and name not in ("compare", "sanity", "cheap")}
    names = sorted({k for m in table.values() for k in m if not k.endswith(("_lo", "_hi"))})
    rows = [{"model": model, "cells": [_cell(m, k) for k in names]} for model, m in table.items()]
    gens: dict[str, dict[str, str]] = defaultdict(dict)
    gen_file = root / REPORTS_DIR / "generations.jsonl"
    if gen_file.is_file():
        for line in gen_file.read_text(encoding="utf-8").splitlines():
            if line.strip():
                g = json.loads(line)
                gens[str(g.get("prompt"))][str(g.get("model"))] = str(g.get("text", ""))
    models = sorted({m for per in gens.values() for m in per})
    return {"metrics": names, "rows": rows, "models": models,
            "generations": [{"prompt": p, "texts": [per.get(m, "") for m in models]} for p, per in gens.items()]}


def _cell(m: dict[str, Any], key: str) -> str:
    v = m.get(key)
    if v is None:
        return ""
    lo, hi = m.get(f"{key}_lo"), m.get(f"{key}_hi")
    text = f"{v:.4g}" if isinstance(v, float) else str(v)
    return f"{text} [{lo:.3g}, {hi:.3g}]" if isinstance(lo, int | float) and isinstance(hi, int | float) else text


def side_by_side(unified: str | None) -> list[tuple[str, str, str, str]]:
    """A unified diff as (old line, its class, new line, its class) rows: removed lines face the added lines that
    replaced them, context lines face themselves."""
    rows: list[tuple[str, str, str, str]] = []
    removed: list[str] = []
    added: list[str] = []

    def flush() -> None:
        for i in range(max(len(removed), len(added))):
            old = removed[i] if i < len(removed) else None
            new = added[i] if i < len(added) else None
            rows.append((old or "", "del" if old is not None else "", new or "", "add" if new is not None else ""))
        removed.clear()
        added.clear()

    for line in (unified or "").splitlines():
        if line.startswith(("---", "+++")):
            continue
        if line.startswith("@@"):
            flush()
            rows.append((line, "hunk", "", "hunk"))
        elif line.startswith("-"):
            removed.append(line[1:])
        elif line.startswith("+"):
            added.append(line[1:])
        else:
            flush()
            rows.append((line[1:], "", line[1:], ""))
    flush()
    return rows
