"""The evaluation's files: DVC metrics and plots, the generations and report.md (kd.evaluation.report), and
its MLflow run.

Every file is a pure function of the evaluation's results (no times, no dates), so the same models give
byte-identical files and DVC sees no change; wall times go to MLflow only.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from kd.evaluation.charts import figures
from kd.evaluation.report import report_md
from kd.evaluation.results import CHEAP, CONSISTENCY_MIN, METRICS, NOT_ROWS, REWARD_ROW, Comparison, Run
from kd.paths import FIGURES_DIR, PLOTS_DIR
from kd.records import atomic_write_text, replace_dir
from kd.tracking import environment_tags, start_run

CURVE_EXTS = (".csv", ".tsv", ".json")



def metrics_json(run: Run) -> str:
    """{row: {metric: value, metric_lo, metric_hi}}, the shape `dvc metrics diff` compares; unknown values are
    left out. With a reward model, its own figures are one more row; comparisons are `compare.<b>_vs_<a>`;
    `sanity.<scorer>`: overall, per bad answer and `trusted` (1/0); `cheap.<answer>`: what a fixed answer scores."""
    out: dict[str, Any] = {r.name: r.metrics() for r in run.results}
    fb = run.feedback
    if fb is not None and fb.reward_model is not None:
        out[REWARD_ROW] = fb.reward_model.metrics()
    if fb is not None:
        for name, w in fb.win_rates.items():
            ci = w.interval()
            out[name] |= {"wins": w.wins, "ties": w.ties, "losses": w.losses, "unparseable": w.unparseable,
                          "inconsistent": w.inconsistent}
            if w.consistency is not None:
                out[name]["judge_consistency"] = round(w.consistency, 4)
            if w.rate is not None and (w.consistency or 0) >= CONSISTENCY_MIN:
                out[name]["win_rate"] = round(w.rate, 4)
                if ci:
                    out[name]["win_rate_lo"], out[name]["win_rate_hi"] = round(ci[0], 4), round(ci[1], 4)
    for s in run.sanity:
        out.setdefault("sanity", {})[s.scorer] = {"overall": round(s.rate, 4), "trusted": int(s.trusted),
                                                  **{n: round(v, 4) for n, v in s.rates().items()}}
    if run.cheap:
        out[CHEAP] = {c.name: c.metrics() for c in run.cheap}
    for c in run.comparisons:
        out.setdefault("compare", {})[comparison_key(c)] = {
            m: {"difference": d, "lo": lo, "hi": hi} for m, (d, (lo, hi)) in c.differences.items()}
    return json.dumps(out, indent=2) + "\n"


def comparison_key(c: Comparison) -> str:
    """`compare.<key>` in metrics.json: `<b>_vs_<a>`, sides joined by `+`."""
    return f"{'+'.join(c.b)}_vs_{'+'.join(c.a)}"


def generations_jsonl(run: Run) -> str:
    rows = [{"prompt": p.id, "model": r.name, "text": o.text, "tokens": o.length, "stopped": o.stopped,
             "degenerate": s.degenerate}
            for r in run.results if r.outputs is not None
            for p, o, s in zip(run.prompts, r.outputs, r.scores, strict=True)]
    return "".join(json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n" for row in rows)


def plot_tables(run: Run) -> dict[str, str]:
    """One CSV per metric across rows, for `dvc plots` (x: model, y: the metric, with its interval)."""
    out = {}
    for metric in METRICS:
        rows = []
        for r in run.results:
            v, ci = r.value(metric), r.interval(metric)
            if v is not None:
                rows.append(f"{r.name},{v},{ci[0] if ci else ''},{ci[1] if ci else ''}")
        if rows:
            out[f"{metric}.csv"] = f"model,{metric},low,high\n" + "\n".join(rows) + "\n"
    return out


def training_curves(run: Run, root: Path) -> dict[str, Path]:
    """Each student's training curve, `plots/<student>.{csv,tsv,json}` as its stage writes it, if present."""
    found = {}
    for r in run.results:
        if r.kind == "student":
            for ext in CURVE_EXTS:
                src = root / PLOTS_DIR / f"{r.name}{ext}"
                if src.is_file():
                    found[f"train_{r.name}{ext}"] = src
    return found


def write_reports(run: Run, out_dir: Path, root: Path) -> list[Path]:
    """Write metrics.json, generations.jsonl, plots/ (DVC plots), figures/ (SVG charts) and report.md under
    `out_dir`, each atomically (the plots and figures directories as a whole), and return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    curves = training_curves(run, root)
    _write_dir(out_dir / "plots", {**{name: text.encode() for name, text in plot_tables(run).items()},
                                   **{name: src.read_bytes() for name, src in curves.items()}})
    svgs = figures(run, {r.name: root / PLOTS_DIR / f"{r.name}.csv" for r in run.results
                         if r.kind == "student" and (root / PLOTS_DIR / f"{r.name}.csv").is_file()})
    _write_dir(out_dir / FIGURES_DIR, {name: svg.encode() for name, svg in svgs.items()})
    files = {"metrics.json": metrics_json(run), "generations.jsonl": generations_jsonl(run),
             "report.md": report_md(run, root, sorted(curves), sorted(svgs))}
    for name, text in files.items():
        atomic_write_text(out_dir / name, text)
    return [out_dir / n for n in files] + [out_dir / "plots", out_dir / FIGURES_DIR]


def _write_dir(path: Path, files: dict[str, bytes]) -> None:
    """A directory holding exactly `files` (name -> bytes), replacing any old one whole."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def per_model_metrics(run: Run) -> dict[str, dict[str, float]]:
    """{row: {metric: value}} for the evaluation's child runs: the same names in every row's run, so MLflow's
    compare view and charts put the models side by side (prefixed names in one run would be one chart each)."""
    rows = {row: values for row, values in json.loads(metrics_json(run)).items() if row not in NOT_ROWS}
    return {row: {k: v for k, v in values.items() if isinstance(v, (int, float))} for row, values in rows.items()}


def metrics_for_mlflow(run: Run) -> dict[str, float]:
    """`<row>.<metric>` -> value (MLflow takes flat keys), plus the wall times the reports leave out."""
    out: dict[str, float] = {}
    for row, values in per_model_metrics(run).items():
        out |= {f"{row}.{k}": v for k, v in values.items()}
    for s in run.sanity:
        scorer = f"sanity.{s.scorer.split('`')[0].strip().replace(' ', '_')}"
        out |= {scorer: round(s.rate, 4), f"{scorer}.trusted": int(s.trusted),
                **{f"{scorer}.{n}": round(v, 4) for n, v in s.rates().items()}}
    for r in run.results:
        out |= {f"{r.name}.generate_s": round(r.generate_s, 2), f"{r.name}.score_s": round(r.score_s, 2)}
    if run.feedback is not None:
        for role, (cached, new) in run.feedback.requests.items():
            out |= {f"{role}.requests_cached": cached, f"{role}.requests_new": new}
    return out | {"seconds": round(run.seconds, 2)}


def log_mlflow(run: Run, root: Path, project: str, section: dict[str, Any]) -> str:
    """One MLflow run for the evaluation: its params, the prompts as its input (by sha256), the training runs
    of the students it judged, and every metric; and one child run per row (model) with that row's metrics
    under their plain names, tagged with the model's training run; returns the parent's run id."""
    models = {r.name: {"mlflow_run_id": (r.about.get("mlflow") or {}).get("run_id"),
                       "git_commit": r.about.get("git_commit")} for r in run.results if r.kind == "student"}
    prompts = {"name": "eval_prompts", "path": str(root / run.prompts_path), "fingerprint": run.prompts_sha256}
    tracked = start_run(root, project, "evaluate", {"evaluation": section, "models": models}, [prompts],
                        context="evaluation", tags=environment_tags(run.environment or {}))
    try:
        tracked.log_metrics(metrics_for_mlflow(run), step=0)
        for row, values in per_model_metrics(run).items():
            about = models.get(row) or {}
            tracked.child(row, values, {"kd.model": row, "kd.training_run": about.get("mlflow_run_id") or "",
                                        "git_commit": about.get("git_commit") or ""})
    except BaseException:
        tracked.end("FAILED")
        raise
    tracked.end()
    return tracked.run_id
