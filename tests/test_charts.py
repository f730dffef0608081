"""The report's charts: SVG rendered locally, byte-stable, embedded by report.md, loading nothing from the network."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from kd.evaluation.charts import METRICS_FIGURE, curve_figure, figures
from kd.evaluation.outputs import write_reports
from kd.evaluation.results import EvalPrompt, ModelResult, Run, Scores

CURVE = "step,loss,ce,lr,tokens\n1,3.9,3.9,0.0002,942\n2,3.7,3.7,0.0003,1958\n3,3.3,3.3,0.0002,3039\n"
# an external reference a browser would fetch: href/src attributes, CSS url() and @import
FETCHES = re.compile(r"""(?:href|src)\s*=\s*["']\s*(?:https?:)?//|url\(\s*["']?\s*(?:https?:)?//|@import""", re.I)
# URLs an SVG names without fetching them: its namespaces and the DTD's system id
XML_IDS = {"http://www.w3.org/2000/svg", "http://www.w3.org/1999/xlink", "http://www.w3.org/Graphics/SVG/1.1/DTD/svg11.dtd"}


def _run() -> Run:
    def row(name: str, kind: str, rouge: list[float]) -> ModelResult:
        about = {"teacher": "t", "path": "models/t", "dtype": "float32", "digest": "cd" * 32} if kind == "teacher" else {}
        return ModelResult(name, kind, about, None, [Scores(rouge=r, stopped=True, length=5, longest_run=1)
                                                     for r in rouge])

    prompts = [EvalPrompt(f"p{i}", "c", f"question {i}", "", ()) for i in range(4)]
    return Run(prompts=prompts, prompts_path="p.jsonl", prompts_sha256="ab" * 32, template=None, max_new_tokens=4,
               teacher="t", results=[row("teacher", "teacher", [1.0, 1.0, 1.0, 1.0]),
                                     row("student_a", "student", [0.1, 0.5, 0.3, 0.2]),
                                     row("student_b", "student", [0.4, 0.6, 0.2, 0.7])])


def _project(tmp_path: Path) -> Path:
    (tmp_path / "plots").mkdir(parents=True)
    for name in ("student_a", "student_b"):
        (tmp_path / "plots" / f"{name}.csv").write_text(CURVE)
    return tmp_path


# report.md embeds the metrics chart and each student's training curve with links relative to it.
def test_report_embeds_local_svgs(tmp_path: Path) -> None:
    root = _project(tmp_path)
    write_reports(_run(), root / "reports", root)
    report = (root / "reports" / "report.md").read_text()
    svgs = sorted(p.name for p in (root / "reports" / "figures").iterdir())
    assert svgs == sorted([METRICS_FIGURE, curve_figure("student_a"), curve_figure("student_b")])
    for name in svgs:
        assert f"](figures/{name})" in report
        text = (root / "reports" / "figures" / name).read_text()
        assert text.lstrip().startswith("<?xml") and "<svg" in text
    metrics = (root / "reports" / "figures" / METRICS_FIGURE).read_text()
    assert metrics.count("<g id=\"axes_") >= 2  # a panel per metric (ROUGE-L, answered, EOS, length, ...)


# Offline: neither the charts nor the report reference anything a browser would fetch over the network.
def test_charts_and_report_fetch_nothing(tmp_path: Path) -> None:
    root = _project(tmp_path)
    write_reports(_run(), root / "reports", root)
    for path in [root / "reports" / "report.md", *(root / "reports" / "figures").iterdir()]:
        text = path.read_text()
        assert not FETCHES.search(text), (path.name, FETCHES.search(text))
        assert not re.search(r"\]\(\s*https?://", text)  # no markdown image or link to the web
        assert set(re.findall(r"https?://[^\s\"'<>)]+", text)) <= XML_IDS, path.name
    assert FETCHES.search('<image href="https://cdn.example/x.png"/>')  # the pattern does catch one


# Byte-identical re-render, in another process too: DVC must see no change when nothing changed.
def test_rerender_is_byte_identical(tmp_path: Path) -> None:
    root = _project(tmp_path)
    curves = {n: root / "plots" / f"{n}.csv" for n in ("student_a", "student_b")}
    first = figures(_run(), curves)
    assert figures(_run(), curves) == first
    code = ("import sys; sys.path.insert(0, 'tests'); from pathlib import Path; from test_charts import _run;"
            "from kd.evaluation.charts import figures; import json;"
            f"print(json.dumps(figures(_run(), {{n: Path({str(root)!r}) / 'plots' / f'{{n}}.csv' "
            "for n in ('student_a', 'student_b')})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout
    import json

    assert json.loads(out) == first
