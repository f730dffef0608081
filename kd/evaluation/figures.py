"""The README's result figures, written from the committed `reports/metrics.json`: one source for the numbers.

A block between `<!-- figures:start NAME -->` and `<!-- figures:end NAME -->` in a doc of FIGURE_DOCS is written
by `python -m kd.evaluation.figures --write` (`make figures`); without --write it lists what is stale and exits 1.
tests/test_figures.py fails, naming the block and the row, when a committed block differs from what the committed
metrics say, so a figure in the README is always the build's own.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from kd.errors import KdError
from kd.evaluation.results import BASELINE, CONTEXT_FREE, METRICS, NOT_ROWS, REWARD_ROW, TEACHER
from kd.paths import REPORTS_DIR
from kd.records import atomic_write_text

METRICS_JSON = REPORTS_DIR / "metrics.json"
FIGURE_DOCS = ("README.md",)  # the docs whose figure blocks come from the default build's metrics
BLOCK = re.compile(r"(<!-- figures:start (?P<name>[a-z_]+) -->\n)(?P<body>.*?)(<!-- figures:end (?P=name) -->)", re.S)
TABLE_METRICS = ("kl", "terminates_cleanly")  # the results table's columns
COMPARED = ("kl", "terminates_cleanly", "rouge_l")  # the comparison line's figures
ROW_LABELS = {CONTEXT_FREE: "context-free baseline", BASELINE: "untrained baseline (the students' init)"}
# metrics.json before issue 20 named the terminates-cleanly rate `ok_rate`: its tables cannot be written from it
OLD_KEY = "ok_rate"


def load(root: Path) -> dict[str, Any]:
    """The committed metrics; a KdError naming the file when it is missing, not JSON, or of the old format."""
    path = root / METRICS_JSON
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KdError(f"{METRICS_JSON}: not found (build the report first: `dvc repro evaluate`)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise KdError(f"{METRICS_JSON}: not JSON ({e})") from None
    if not isinstance(metrics, dict):
        raise KdError(f"{METRICS_JSON}: not a JSON object")
    if (why := old_format(metrics)) is not None:
        raise KdError(why)
    return metrics


def old_format(metrics: dict[str, Any]) -> str | None:
    """Why the metrics predate `terminates_cleanly` (issue 20), or None when they are the current format."""
    old = [name for name, row in metrics.items() if isinstance(row, dict) and OLD_KEY in row]
    if not old:
        return None
    return (f"{METRICS_JSON}: row `{old[0]}` has `{OLD_KEY}`, the format before `terminates_cleanly`: rebuild the "
            "report (`dvc repro evaluate`), then `make figures`")


def _rows(metrics: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The models the table shows: the context-free and untrained baselines, then every student in file order."""
    rows = {name: row for name, row in metrics.items()
            if isinstance(row, dict) and name not in (TEACHER, REWARD_ROW, *NOT_ROWS) and "kl" in row}
    first = [n for n in (CONTEXT_FREE, BASELINE) if n in rows]
    return [(n, rows[n]) for n in first] + [(n, r) for n, r in rows.items() if n not in first]


def _cell(row: dict[str, Any], metric: str) -> str:
    if metric not in row:
        return "—"
    fmt = "{:.2f}" if metric == "kl" else "{:.0%}"
    ci = f" [{fmt.format(row[metric + '_lo'])}, {fmt.format(row[metric + '_hi'])}]" if metric + "_lo" in row else ""
    return fmt.format(row[metric]) + ci


def _name(metric: str) -> str:
    return METRICS[metric].label.rstrip(" ↑↓")


def _signed(x: float) -> str:
    return f"{x:+.3f}".replace("-", "−")


def results_table(metrics: dict[str, Any]) -> str:
    header = ["model", METRICS["kl"].label, METRICS["terminates_cleanly"].label + " (EOS, not degenerate; form, not "
              "quality)"]
    lines = ["| " + " | ".join(header) + " |", "| --- | ---: | ---: |"]
    for name, row in _rows(metrics):
        label = ROW_LABELS.get(name, f"`{name}`")
        lines.append("| " + " | ".join([label, *(_cell(row, m) for m in TABLE_METRICS)]) + " |")
    return "\n".join(lines) + "\n"


def comparisons(metrics: dict[str, Any]) -> str:
    """One line per `compare.<b>_vs_<a>`: b − a on each compared figure, and where the interval excludes 0."""
    lines = []
    for key, diffs in metrics.get("compare", {}).items():
        b, _, a = key.partition("_vs_")
        shown = [m for m in COMPARED if m in diffs]
        figures = ", ".join(f"{_name(m)} {_signed(diffs[m]['difference'])} "
                            f"[{_signed(diffs[m]['lo'])}, {_signed(diffs[m]['hi'])}]" for m in shown)
        apart = [_name(m) for m in shown if diffs[m]["lo"] > 0 or diffs[m]["hi"] < 0]
        verdict = f"the interval excludes 0 on {', '.join(apart)} only" if apart else "every interval includes 0"
        lines.append(f"`{b}` − `{a}` (95% bootstrap over prompts): {figures}; {verdict}.")
    return "\n\n".join(lines) + "\n"


def render(name: str, metrics: dict[str, Any], doc: str) -> str:
    match name:
        case "results":
            return results_table(metrics)
        case "compare":
            return comparisons(metrics)
        case _:
            raise KdError(f"{doc}: unknown figures block `{name}` (known: results, compare)")


def refreshed(text: str, metrics: dict[str, Any], doc: str) -> str:
    """`text` with every figures block rewritten from `metrics`."""
    return BLOCK.sub(lambda m: m.group(1) + render(m.group("name"), metrics, doc) + m.group(4), text)


def _key(line: str) -> str:
    """A table row's first cell (the model), else the line's first words: what a difference is reported by."""
    if line.startswith("| ---"):
        return "(separator)"
    return line.split("|")[1].strip(" `") if line.startswith("|") else " ".join(line.split()[:3]).replace("`", "")


def differences(text: str, metrics: dict[str, Any], doc: str) -> list[str]:
    """Each line of each figures block in `text` that differs from what `metrics` gives, named by block and row."""
    out = []
    blocks = list(BLOCK.finditer(text))
    if not blocks:
        return [f"{doc}: no figures block (`<!-- figures:start results -->` … `<!-- figures:end results -->`)"]
    for m in blocks:
        name, have = m.group("name"), m.group("body").splitlines()
        want = render(name, metrics, doc).splitlines()
        for i in range(max(len(have), len(want))):
            h, w = (have[i] if i < len(have) else "(nothing)"), (want[i] if i < len(want) else "(nothing)")
            if h != w:
                row = _key(w if w != "(nothing)" else h)
                out.append(f"{doc}, figures `{name}`, row `{row}`: says {h!r}; {METRICS_JSON} gives {w!r}")
    return out


def stale(root: Path) -> list[str]:
    metrics = load(root)
    return [d for doc in FIGURE_DOCS for d in differences((root / doc).read_text(encoding="utf-8"), metrics, doc)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kd.evaluation.figures", description=__doc__.splitlines()[0])
    p.add_argument("--write", action="store_true", help="rewrite the figures blocks (else list the stale ones)")
    p.add_argument("--root", default=".", help="the project root")
    args = p.parse_args(argv)
    root = Path(args.root)
    try:
        metrics = load(root)
        for doc in FIGURE_DOCS:
            path = root / doc
            text = path.read_text(encoding="utf-8")
            new = refreshed(text, metrics, doc)
            if not BLOCK.search(text):
                raise KdError(f"{doc}: no figures block to write (`<!-- figures:start results -->` … "
                              "`<!-- figures:end results -->`)")
            if new == text:
                print(f"figures: {doc} is up to date")
            elif args.write:
                atomic_write_text(path, new)
                print(f"figures: wrote {doc} from {METRICS_JSON}")
            else:
                print("\n".join(differences(text, metrics, doc)))
                return 1
    except KdError as e:
        print(f"figures: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
