"""Charts beside report.md, rendered locally to SVG: they open in a browser with the network off.

`dvc plots show` writes HTML that loads Vega from a CDN, so on a machine without internet access its page is
blank; the DVC plot definitions stay (online users and Studio), and these SVGs are what report.md embeds.

Bytes are a pure function of the numbers (a fixed `svg.hashsalt` for the ids matplotlib would draw at random,
no date or other metadata), so the same results render the same files and DVC sees no change. matplotlib is
imported here only, when the evaluation writes its reports (it costs about a second).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from kd.evaluation.results import METRICS, Run

METRICS_FIGURE = "metrics.svg"
CURVE_FIELDS = ("loss", "kd", "ce", "hidden", "reward", "kl", "margin")  # what a training curve may draw, in order
PANEL_COLUMNS = 3
# No date (byte-stable), and no RDF block at all: the file's only URLs are then XML identifiers (the SVG and xlink
# namespaces, the DTD's system id), which browsers never fetch.
NO_METADATA = {"Date": None, "Creator": None, "Format": None, "Type": None}
_RC = {"svg.hashsalt": "kd", "svg.fonttype": "path", "font.size": 8}


def curve_figure(name: str) -> str:
    return f"train_{name}.svg"


def _svg(fig: Any) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata=NO_METADATA)
    return buf.getvalue()


def metrics_svg(run: Run) -> str | None:
    """One panel per metric: each model's value and its 95% interval (where it has one); None without values."""
    import matplotlib
    from matplotlib.figure import Figure

    metrics = [m for m in METRICS if any(r.value(m) is not None for r in run.results)]
    if not metrics:
        return None
    rows = (len(metrics) + PANEL_COLUMNS - 1) // PANEL_COLUMNS
    names = [r.name for r in run.results]
    with matplotlib.rc_context(_RC):
        fig = Figure(figsize=(4 * PANEL_COLUMNS, 0.35 * len(names) * rows + 1.2 * rows), layout="constrained")
        axes = fig.subplots(rows, PANEL_COLUMNS, squeeze=False).ravel()
        for ax, metric in zip(axes, metrics, strict=False):
            for y, r in enumerate(run.results):
                v, ci = r.value(metric), r.interval(metric)
                if v is None:
                    continue
                err = [[v - ci[0]], [ci[1] - v]] if ci else None
                ax.errorbar([v], [y], xerr=err, fmt="o", color="C0" if r.kind == "student" else "C7", capsize=3)
            ax.set_yticks(range(len(names)), names)
            ax.set_ylim(len(names) - 0.5, -0.5)
            ax.set_title(METRICS[metric].label)
            ax.grid(axis="x", alpha=0.3)
        for ax in axes[len(metrics):]:
            ax.set_visible(False)
        return _svg(fig)


def curve_svg(name: str, table: str) -> str | None:
    """A student's training curve from its `plots/<name>.csv` (step, loss and the loss's parts); None if empty."""
    import matplotlib
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    rows = list(csv.DictReader(io.StringIO(table)))
    fields = [f for f in CURVE_FIELDS if rows and f in rows[0]]
    if not rows or "step" not in rows[0] or not fields:
        return None
    # a part equal to the loss on every step (ce of an SFT run) would hide under it: one line is enough
    fields = [f for f in fields if f == fields[0] or any(not r[f] or not r[fields[0]] or
                                                          abs(float(r[f]) - float(r[fields[0]])) > 1e-5 for r in rows)]
    steps = [int(r["step"]) for r in rows]
    with matplotlib.rc_context(_RC):
        fig = Figure(figsize=(6, 3.2), layout="constrained")
        ax = fig.subplots()
        for f in fields:
            points = [(s, float(r[f])) for s, r in zip(steps, rows, strict=True) if r.get(f)]
            ax.plot([p[0] for p in points], [p[1] for p in points], label=f, linewidth=1.2 if f == "loss" else 0.8)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{name}: training loss")
        ax.grid(alpha=0.3)
        ax.legend()
        return _svg(fig)


def figures(run: Run, curves: dict[str, Path]) -> dict[str, str]:
    """File name -> SVG text: the evaluation's metrics, and each student's training curve.

    Args:
        curves: `<student>` -> its `plots/<student>.csv`.
    """
    out = {}
    if svg := metrics_svg(run):
        out[METRICS_FIGURE] = svg
    for name, path in sorted(curves.items()):
        if svg := curve_svg(name, path.read_text(encoding="utf-8")):
            out[curve_figure(name)] = svg
    return out
