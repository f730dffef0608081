"""The evaluation's files: DVC metrics and plots, the generations, and report.md (issue 3 §6).

Everything here is a pure function of the evaluation's results (no times, no dates), so the same models give
byte-identical files and DVC sees no change.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from kd.evaluation.evaluate import exact_match
from kd.evaluation.results import BASELINE, METRICS, REWARD_MAX_LENGTH, REWARD_ROW, ModelResult, Run
from kd.paths import DATA_DIR, PLOTS_DIR
from kd.records import MANIFEST_FILE, atomic_write_text, replace_dir
from kd.tracking import start_run

LABELS = {
    "kl": "KL(teacher‖model) ↓",
    "teacher_logprob": "teacher log-prob ↑",
    "rouge_l": "ROUGE-L vs teacher ↑",
    "exact_match": "exact match ↑",
    "contains_match": "contains ↑",
    "length": "length (tokens)",
}
# Measured against the teacher: the teacher's own row is the reference point, not a contender.
TEACHER_RELATIVE = ("kl", "teacher_logprob", "rouge_l")
EXAMPLES = 5
CELL_CHARS = 360
CURVE_EXTS = (".csv", ".tsv", ".json")
# Plotted too when present (a reward model / a judge was configured); higher is better for both.
FEEDBACK_PLOTS = ("reward", "win_rate")
_MARKDOWN = set("\\`*_[]#|~")


def metrics_json(run: Run) -> str:
    """{model: {metric: value}}, the shape `dvc metrics diff` compares; unknown values are left out. With a
    reward model, its own figures are one more row, `reward_model`."""
    out = {r.name: {k: v for k, v in r.metrics.items() if v is not None} for r in run.results}
    if run.feedback is not None and run.feedback.reward_model is not None:
        out[REWARD_ROW] = run.feedback.reward_model.metrics()
    return json.dumps(out, indent=2) + "\n"


def generations_jsonl(run: Run) -> str:
    rows = [{"prompt": p.id, "model": r.name, "text": o.text, "tokens": o.length, "stopped": o.stopped}
            for r in run.results for p, o in zip(run.prompts, r.outputs, strict=True)]
    return "".join(json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n" for row in rows)


def plot_tables(run: Run) -> dict[str, str]:
    """One CSV per metric across models, for `dvc plots` (x: model, y: the metric)."""
    out = {}
    for metric in (*METRICS, *FEEDBACK_PLOTS):
        rows = [f"{r.name},{r.metrics[metric]}" for r in run.results if r.metrics.get(metric) is not None]
        if rows:
            out[f"{metric}.csv"] = f"model,{metric}\n" + "\n".join(rows) + "\n"
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


def _num(metric: str, v: float | None) -> str:
    if v is None:
        return "n/a"
    return f"{v:.1f}" if metric == "length" else f"{v:.3f}"


def _best(run: Run, metric: str) -> set[str]:
    higher = METRICS[metric]
    rows = [r for r in run.results if r.metrics[metric] is not None
            and not (metric in TEACHER_RELATIVE and r.kind == "teacher")]
    if higher is None or not rows:
        return set()
    pick = max if higher else min
    best = pick(r.metrics[metric] for r in rows)
    marked = {r.name for r in rows if r.metrics[metric] == best}
    return marked if len(marked) < len(rows) else set()  # a mark on every row singles nobody out


def _cell(text: str) -> str:
    """Model output made safe for one markdown table cell: shown as written, never as HTML or markdown (a
    stray ``` or ** would swallow the rest of the table), with line breaks as <br>."""
    text = text if len(text) <= CELL_CHARS else text[:CELL_CHARS].rstrip() + " …"
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    text = "".join("\\" + c if c in _MARKDOWN else c for c in text)
    lines = [("&nbsp;" * (len(x) - len(x.lstrip(" ")))) + x.lstrip(" ") for x in text.splitlines()]  # keep indents
    return "<br>".join(lines) or "*(empty)*"


def _table(header: list[str], rows: list[list[str]], align: str = "l") -> str:
    sep = ["---"] + (["---:"] if align == "r" else ["---"]) * (len(header) - 1)
    return "\n".join("| " + " | ".join(r) + " |" for r in [header, sep, *rows])


def verdicts(run: Run) -> list[str]:
    """One line per student: does it beat the baseline on teacher-agreement (KL), and by how much?"""
    base = next((r for r in run.results if r.kind == "baseline"), None)
    lines = []
    for r in run.results:
        if r.kind != "student" or base is None:
            continue
        a, b = base.metrics["kl"], r.metrics["kl"]
        if a is None or b is None:
            ra, rb = base.metrics["rouge_l"], r.metrics["rouge_l"]
            word = "beats" if rb > ra else "does not beat"
            lines.append(f"`{r.name}` {word} the baseline on ROUGE-L vs the teacher ({ra:.3f} → {rb:.3f}); "
                         f"KL not measured (its tokenizer differs from the teacher's)")
        else:
            word = "beats" if b < a else "does not beat"
            lines.append(f"`{r.name}` {word} the baseline on teacher-agreement (KL {a:.2f} → {b:.2f})")
    return lines


def _bars(run: Run, metric: str, width: int = 30) -> str:
    rows = [(r.name, r.metrics[metric]) for r in run.results if r.metrics[metric] is not None]
    top = max((abs(v) for _, v in rows), default=0.0) or 1.0
    pad = max(len(n) for n, _ in rows)
    return "\n".join(f"{n:<{pad}}  {'█' * round(width * abs(v) / top):<{width}}  {_num(metric, v)}" for n, v in rows)


def _about(r: ModelResult) -> list[str]:
    """model | what | objective | training data | git commit | MLflow run"""
    a = r.about
    if r.kind == "teacher":
        return [f"`{r.name}`", f"teacher `{a['teacher']}` (`{a['path']}`, {a['dtype']}, digest `{a['digest'][:16]}`)",
                "—", "—", "—", "—"]
    if r.kind == "baseline":
        init = ", ".join(f"{k}: {v}" for k, v in a["init"].items())
        return [f"`{r.name}`", f"untrained initialisation of `{a['student']}` ({init})", "—", "—", "—", "—"]
    data = ", ".join(f"`{d['name']}`" for d in a.get("datasets", []))
    if a.get("logits"):
        data += f" + logits `{a['logits']['name']}`"
    run_id = (a.get("mlflow") or {}).get("run_id")
    return [f"`{r.name}`", f"`models/{r.name}`", str(a.get("objective", "?")), data or "—",
            f"`{str(a.get('git_commit') or 'unknown')[:12]}`", f"`{run_id}`" if run_id else "—"]


def _datasets(run: Run, root: Path) -> list[list[str]]:
    """Every dataset a student was trained on, its fingerprint, and whether it is still the current one."""
    seen: dict[tuple[str, str], list[str]] = {}
    for r in run.results:
        if r.kind != "student":
            continue
        logits = [r.about["logits"]] if r.about.get("logits") else []
        for d in list(r.about.get("datasets", [])) + logits:
            seen.setdefault((d["name"], d["fingerprint"]), []).append(r.name)
    rows = []
    for (name, fp), users in sorted(seen.items()):
        manifest = root / DATA_DIR / name / MANIFEST_FILE
        if not manifest.is_file():
            current = "not built here"
        else:
            now = json.loads(manifest.read_text(encoding="utf-8")).get("fingerprint", "")
            current = "yes" if now == fp else f"**no** (now `{now[:16]}`; the student is stale)"
        rows.append([f"`{name}`", f"`{fp}`", current, ", ".join(f"`{u}`" for u in users)])
    return rows


def _examples(run: Run) -> list[str]:
    """~5 prompts spread over the file (so over its categories), each with every model's answer in a row."""
    n = len(run.prompts)
    picks = sorted({round(i * (n - 1) / (EXAMPLES - 1)) for i in range(EXAMPLES)}) if n > 1 else [0]
    out = []
    for i in picks:
        p = run.prompts[i]
        out += [f"### {p.id} · {p.category}", "", f"> {_cell(p.instruction)}", ""]
        if p.reference:
            out += [f"Seed reference: {_cell(p.reference)}", ""]
        out += [_table([f"`{r.name}`" for r in run.results], [[_cell(r.outputs[i].text) for r in run.results]]), ""]
    return out


def report_md(run: Run, root: Path, curves: list[str]) -> str:
    students = [r for r in run.results if r.kind == "student"]
    base = next((r for r in run.results if r.kind == "baseline"), None)
    targets = [p for p in run.prompts if p.exact_target]
    lines = [
        "# Evaluation report",
        "",
        f"The teacher `{run.teacher}`, the untrained baseline"
        + (f" (the initialisation of `{base.about['student']}`)" if base else "")
        + f" and {len(students)} student(s) answered the {len(run.prompts)} held-out prompts of "
        f"`{run.prompts_path}` (sha256 `{run.prompts_sha256[:16]}`; no generation stage reads them) greedily, "
        f"with at most {run.max_new_tokens} new tokens each.",
        "",
        "## Results",
        "",
    ]
    best = {m: _best(run, m) for m in METRICS}
    header = ["model"] + [LABELS[m] + (f" ({len(targets)})" if m in ("exact_match", "contains_match") else "")
                          for m in METRICS]
    rows = [[f"`{r.name}`"] + [f"**{_num(m, r.metrics[m])}**" if r.name in best[m] else _num(m, r.metrics[m])
                               for m in METRICS] for r in run.results]
    lines += [_table(header, rows, align="r"), "",
              "Best per column in **bold**. KL, log-prob and ROUGE-L are measured against the teacher, so they rank "
              "the other models; the teacher's row is the reference point. KL(teacher‖model): full vocabulary, "
              "teacher-forced on the teacher's answers, mean over their tokens. Teacher log-prob: mean per token "
              "of each model's own answers under the teacher. Exact match: the answer equals the reference after "
              "lower-casing and removing punctuation; contains: the reference appears as whole words in the answer "
              f"(both over the {len(targets)} prompts whose reference has at most 3 words).", ""]
    if v := verdicts(run):
        lines += ["## Verdicts", "", *[f"- {x}" for x in v], ""]
    if run.feedback is not None:
        lines += _feedback(run)
    if targets:
        cats = sorted({p.category for p in targets}, key=[p.category for p in targets].index)
        cat_rows = []
        for c in cats:
            idx = [i for i, p in enumerate(run.prompts) if p.exact_target and p.category == c]
            cat_rows.append([c, str(len(idx))] + [
                f"{sum(_exact(run, r, i) for i in idx)}/{len(idx)}" for r in run.results])
        lines += ["## Exact match by category", "",
                  _table(["category", "prompts"] + [f"`{r.name}`" for r in run.results], cat_rows, align="r"), ""]
    lines += ["## Plots", "",
              "`dvc plots show` renders `reports/plots/`: one chart per metric across models (`<metric>.csv`)"
              + (", and each student's training curve (" + ", ".join(f"`{c}`" for c in curves) + ")" if curves
                 else "; no student training curves (`plots/<student>.csv`) were found") + ".", ""]
    for m in ("kl", "rouge_l"):
        if any(r.metrics[m] is not None for r in run.results):
            lines += [f"{LABELS[m]}", "", "```text", _bars(run, m), "```", ""]
    lines += ["## What was evaluated", "", "### Models", "",
              _table(["model", "what", "objective", "training data", "git commit", "MLflow run"],
                     [_about(r) for r in run.results]), ""]
    if ds := _datasets(run, root):
        lines += ["### Datasets (the students' training data)", "",
                  _table(["dataset", "fingerprint", "current manifest", "used by"], ds), ""]
    lines += ["## Example generations", "", *_examples(run)]
    return "\n".join(lines).rstrip() + "\n"


def _feedback(run: Run) -> list[str]:
    """The reward model's view (its held-out accuracy, each model's mean reward) and the judge's (win rates)."""
    fb = run.feedback
    lines = []
    if fb.reward_model is not None:
        rm, n = fb.reward_model, len(run.prompts)
        train = "" if rm.accuracy_train is None else f"; {rm.accuracy_train:.3f} on its training pairs"
        top = max((m for m, _ in fb.rewards.values() if m is not None), default=None)
        rows = [[f"`{r.name}`", "n/a" if m is None else f"**{m:.3f}**" if m == top else f"{m:.3f}",
                 f"{k}/{n}"] for r in run.results for m, k in [fb.rewards[r.name]]]
        lines += ["## Reward model", "",
                  f"`{rm.name}` (`models/{rm.name}`): held-out pair accuracy **{rm.accuracy:.3f}** over "
                  f"{rm.pairs_held_out} pairs (chance = 0.5{train}). It prefers the chosen answer of that share of "
                  "preference pairs it never trained on; the rewards below mean little when it is near chance.", "",
                  _table(["model", "mean reward ↑", "answers scored"], rows, align="r"), "",
                  "Mean reward: the reward model's score of each model's answer to each held-out prompt (prompt + "
                  "answer through its chat template, as it was trained), averaged over the answers scored (longer "
                  f"than {REWARD_MAX_LENGTH} tokens: not scored). Scores only compare within one reward model; best "
                  "in **bold**.", ""]
    if fb.judge is not None:
        who = "the untrained baseline" if fb.against == BASELINE else f"`{fb.against}`"
        rows = [[f"`{name}`", "n/a" if w.rate is None else f"{w.rate:.3f}", str(w.wins), str(w.ties),
                 str(w.losses), str(w.unparseable), str(w.inconsistent), str(w.identical)]
                for name, w in fb.win_rates.items()]
        lines += [f"## Win rate against {who}", "",
                  f"The judge, teacher `{fb.judge.teacher}`, compared each student's answer with {who}'s on each held-out "
                  f"prompt, with `{fb.template.path}` (sha256 `{fb.template.sha256[:16]}`), asked in both orders "
                  "(A/B swapped) because judges favour a position.", "",
                  _table(["student", "win rate ↑", "wins", "ties", "losses", "unparseable", "inconsistent",
                          "identical"], rows, align="r"), "",
                  "A win or a loss needs both verdicts to agree; two ties, or two verdicts that disagree "
                  "(*inconsistent*: the judge followed the position), are a tie, and so are identical answers "
                  "(*identical*, never asked). Win rate = (wins + 0.5 ties) / (wins + ties + losses); a pair whose "
                  "verdicts were unusable (*unparseable*: off-format, or cut off at `sampling.max_tokens`) is neither a "
                  "win nor a loss and is left out.",
                  ""]
    return lines


def _exact(run: Run, r: ModelResult, i: int) -> bool:
    return exact_match(r.outputs[i].text, run.prompts[i].reference)


def write_reports(run: Run, out_dir: Path, root: Path) -> list[Path]:
    """Write metrics.json, generations.jsonl, plots/ and report.md under `out_dir`, each atomically (the
    plots directory as a whole), and return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    curves = training_curves(run, root)
    tmp = Path(tempfile.mkdtemp(prefix=".plots.", suffix=".tmp", dir=out_dir))
    try:
        for name, text in plot_tables(run).items():
            (tmp / name).write_text(text, encoding="utf-8")
        for name, src in curves.items():
            shutil.copyfile(src, tmp / name)
        replace_dir(tmp, out_dir / "plots")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = {"metrics.json": metrics_json(run), "generations.jsonl": generations_jsonl(run),
             "report.md": report_md(run, root, sorted(curves))}
    for name, text in files.items():
        atomic_write_text(out_dir / name, text)
    return [out_dir / n for n in files] + [out_dir / "plots"]


def metrics_for_mlflow(run: Run) -> dict[str, float]:
    """`<model>.<metric>` -> value (MLflow takes flat keys), plus the wall times the reports leave out."""
    out = {f"{r.name}.{k}": v for r in run.results for k, v in r.metrics.items() if v is not None}
    for r in run.results:
        out |= {f"{r.name}.generate_s": round(r.generate_s, 2), f"{r.name}.score_s": round(r.score_s, 2)}
    if run.feedback is not None:
        if run.feedback.reward_model is not None:
            out |= {f"{REWARD_ROW}.{k}": v for k, v in run.feedback.reward_model.metrics().items()}
        for role, (cached, new) in run.feedback.requests.items():
            out |= {f"{role}.requests_cached": cached, f"{role}.requests_new": new}
    return out | {"seconds": round(run.seconds, 2)}


def log_mlflow(run: Run, root: Path, project: str, section: dict[str, Any]) -> str:
    """One MLflow run for the evaluation: its params, the prompts as its input (by sha256), the training runs
    of the students it judged, and every metric; returns the run id."""
    models = {r.name: {"mlflow_run_id": (r.about.get("mlflow") or {}).get("run_id"),
                       "git_commit": r.about.get("git_commit")} for r in run.results if r.kind == "student"}
    prompts = {"name": "eval_prompts", "path": str(root / run.prompts_path), "fingerprint": run.prompts_sha256}
    tracked = start_run(root, project, "evaluate", {"evaluation": section, "models": models}, [prompts],
                        context="evaluation")
    try:
        tracked.log_metrics(metrics_for_mlflow(run), step=0)
    except BaseException:
        tracked.end("FAILED")
        raise
    tracked.end()
    return tracked.run_id
