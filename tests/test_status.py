"""`kd status` and the stage's own forecast: predicted teacher requests equal what the run then sends."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fake_openai import FakeOpenAI
from kdproject import (
    commit,
    curation,
    edit_template,
    kd,
    kd_json,
    labeling,
    make_project,
    math_seeds,
    records,
    repro,
)

PRICE = {"input_per_mtok": 1.0, "output_per_mtok": 4.0}


@pytest.fixture(scope="module")
def server() -> FakeOpenAI:
    with FakeOpenAI() as s:
        yield s


def forecasts(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["stage"]: row["forecast"] for row in report["stages"]}


def test_forecast_before_build_then_after_a_template_edit(server, tmp_path):
    root = make_project(tmp_path / "p", server.url, {"qa": labeling(16), "topics": curation(4)}, price=PRICE)
    before = forecasts(kd_json(root, "status"))
    qa, topics = before["qa"], before["topics"]
    assert (qa["new"], qa["cached"], qa["estimated"], qa["approximate"]) == (16, 0, 0, False)
    # curation: 4 questions are known exactly; their answers depend on questions nobody has asked yet
    assert (topics["new"], topics["estimated"], topics["approximate"]) == (8, 4, True)
    assert qa["cost"] == pytest.approx((qa["prompt_tokens"] * 1.0 + qa["completion_tokens"] * 4.0) / 1e6)
    assert qa["prompt_tokens"] > 0 and qa["completion_tokens"] == 16 * 32  # no answers yet: max_tokens / 2
    code, text = kd(root, "status")
    assert "≈8" in text and "qa" in text
    assert server.received == 0 and not (root / ".kd" / "cache").exists()  # a forecast asks and writes nothing

    first = repro(root)
    assert server.received == 16 + 8
    assert "qa: forecast 16 new teacher requests (0 cached)" in first.stdout
    assert "qa: 16 records (0 cached, 16 new, 0 rejected)" in first.stdout and "paid for 16 requests" in first.stdout
    # deterministic totals in metrics: every request that built the dataset, priced from params
    metrics = json.loads((root / "metrics/qa.json").read_text())
    usage = [r["usage"] for rec in records(root, "qa") for r in rec["provenance"]["requests"]]
    assert metrics["prompt_tokens"] == sum(u["prompt_tokens"] for u in usage)
    assert metrics["completion_tokens"] == sum(u["completion_tokens"] for u in usage)
    assert metrics["cost"] == pytest.approx((metrics["prompt_tokens"] + 4 * metrics["completion_tokens"]) / 1e6)
    commit(root, "v1")

    edit_template(root)
    after = kd_json(root, "status")
    assert [row["stage"] for row in after["stages"]] == ["qa"]  # curation does not use the template
    predicted = forecasts(after)["qa"]
    assert predicted["approximate"] is False and predicted["cached"] == 16 - math_seeds(16)
    sent = server.received
    second = repro(root)
    assert server.received - sent == predicted["new"] == math_seeds(16)
    assert f"qa: forecast {predicted['new']} new teacher requests ({predicted['cached']} cached)" in second.stdout
    commit(root, "v2")
    code, text = kd(root, "status")
    assert code == 0 and "up to date" in text
