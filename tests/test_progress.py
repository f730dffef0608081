"""Progress while answers arrive: plain lines in logs (done/total, rate, ETA, tokens and cost so far), a bar on a
terminal, nothing extra for a stage of seconds, and the closing summary line as before."""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import pytest
from fake_openai import FakeOpenAI

from kd.config import Price
from kd.runtime import ask
from kd.runtime.ask import Progress

REPO = Path(__file__).resolve().parents[1]


class Clock:
    """A clock the test moves by hand."""

    now = 0.0

    def __call__(self) -> float:
        return self.now


def lines(total: int, step: float, price: Price | None = None) -> list[str]:
    """The plain lines of `total` requests, one every `step` seconds, 3 prompt + 5 completion tokens each."""
    out, clock = io.StringIO(), Clock()
    progress = Progress("qa: teacher", total, price, stream=out, clock=clock)
    for n in range(1, total + 1):
        clock.now += step
        progress.update({"prompt_tokens": 3 * n, "completion_tokens": 5 * n})
    progress.close()
    return out.getvalue().splitlines()


# Regression: a 9-minute stage printed nothing between its forecast and its summary.
def test_a_long_stage_prints_a_line_at_each_tenth() -> None:
    got = lines(100, 1.0, Price(input_per_mtok=1000.0, output_per_mtok=2000.0))
    assert len(got) == 10
    assert got[0] == ("qa: teacher: 10/100 requests (10%), 1.00 req/s, ETA 1m30s; "
                      "so far 30 prompt + 50 completion tokens, $0.1300")
    assert got[-1].startswith("qa: teacher: 100/100 requests (100%), 1.00 req/s, ETA 0s; so far 300 prompt")


def test_no_price_no_cost_and_a_slow_stage_prints_at_least_every_minute() -> None:
    got = lines(1000, 61.0)  # a tenth takes 100 minutes: a line each minute instead
    assert len(got) == 1000
    assert got[0].endswith("so far 3 prompt + 5 completion tokens")  # no price: no cost figure
    assert "ETA 16h55m" in got[0]


def test_a_stage_of_seconds_prints_no_progress_lines() -> None:
    assert lines(100, 0.05) == []


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_bar_with_tokens() -> None:
    out = Terminal()
    progress = Progress("qa: teacher", 4, None, stream=out)
    for n in range(1, 5):
        progress.update({"prompt_tokens": n, "completion_tokens": 2 * n})
    progress.close()
    assert "4/4" in out.getvalue() and "4 prompt + 8 completion tokens" in out.getvalue()


# Regression: the non-terminal lines come from where answers arrive, and the closing summary line is unchanged.
def test_a_build_logs_progress_lines_and_the_same_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from kd.elicit.build import build_dataset
    from kd.elicit.labeling import label

    monkeypatch.setattr(ask, "PROGRESS_MIN_S", 0.0)  # every tenth gets its line, however fast
    for d in ("prompts", "seeds"):
        shutil.copytree(REPO / d, tmp_path / d)
    with FakeOpenAI() as server:
        teacher = {"backend": "openai", "base_url": server.url, "model": "fake", "api_key_env": None,
                   "concurrency": 1, "timeout_s": 2}
        dataset = {"method": "labeling", "teacher": "fake", "inputs": [{"seeds": "seeds/instructions.jsonl", "limit": 4}],
                   "template": "prompts/labeling/answer.jinja", "sampling": {"max_tokens": 32}}
        (tmp_path / "params.yaml").write_text(json.dumps({"teachers": {"fake": teacher}, "datasets": {"qa": dataset}}))
        line = build_dataset("qa", "labeling", label, tmp_path)
    err = capsys.readouterr().err.splitlines()
    progress = [x for x in err if x.startswith("qa: teacher: ")]
    assert [x.split(" requests")[0] for x in progress] == [f"qa: teacher: {n}/4" for n in (1, 2, 3, 4)]
    assert all(re.search(r"req/s, ETA \S+; so far \d+ prompt \+ \d+ completion tokens$", x) for x in progress)
    assert re.fullmatch(r"qa: 4 records \(0 cached, 4 new, 0 rejected\) in \d+ s; paid for 4 requests: \d+ prompt \+ "
                        r"\d+ completion tokens, cost unknown \(no price in params\)", line)
