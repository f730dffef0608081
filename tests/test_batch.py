"""`mode: batch` of an openai teacher, end to end through `stages/labeling.py` against the fake server's Batch API
(tests/fake_openai.py): same dataset bytes as online, a killed stage polls the same batch, per-request errors are
rejections, a batch that ends badly fails in one line, and cost is shown at the batch price."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from fake_openai import FakeOpenAI
from test_pipeline_openai import LIMIT, NAME, make_project, outputs, run_stage, stage_env

from kd.config import OpenAITeacher, billed_price, load_params
from kd.provenance.forecast import cost_of

KEY = "sk-batch-test-key-0123456789"
BATCH = {"mode": "batch", "poll_s": 0.01, "poll_max_s": 0.02}
PRICE = "{input_per_mtok: 200.0, output_per_mtok: 400.0}"


def port(server: FakeOpenAI) -> int:
    return int(server.url.split(":")[-1].split("/")[0])


def cost(stdout: str) -> float:
    return float(re.search(r"\$(\d+\.\d+)", stdout).group(1))


# bug guarded: batch mode did not exist; a batch build must give the online build's dataset, byte for byte,
# at half the cost
def test_batch_build_equals_online_build_at_the_batch_price(tmp_path: Path) -> None:
    with FakeOpenAI(api_key=KEY) as online:
        ref = make_project(tmp_path / "online", online.url, price=PRICE)
        first = run_stage(ref, KEY)
        assert first.returncode == 0, first.stderr
    with FakeOpenAI(api_key=KEY, port=port(online)) as server:  # the same endpoint: records name who answered
        server.batch_polls = 2
        root = make_project(tmp_path / "batch", server.url, price=PRICE, **BATCH)
        built = run_stage(root, KEY)
        assert built.returncode == 0, built.stderr
        assert server.received == 0, "batch mode sends no online request"
        assert (server.uploads, server.batches_created, server.batch_lines) == (1, 1, LIMIT)
        assert server.polls == 3  # validating/in_progress twice, then completed
        assert not list((root / ".kd" / "batches").glob("*.json")), "a collected batch leaves no record"
        assert f"{NAME}: {LIMIT} records (0 cached, {LIMIT} new, 0 rejected)" in built.stdout
        assert cost(built.stdout) == pytest.approx(cost(first.stdout) / 2, rel=1e-3), built.stdout
        assert run_stage(root, KEY).returncode == 0 and server.uploads == 1, "a rerun is served by the cache"
        assert cost_of(load_params(root), "fake", 1e6, 0) == 100.0  # forecasts (kd status): half of 200 per Mtok
    got, want = outputs(root), outputs(ref)
    for f in ("records.jsonl", "manifest.json", "rejected.jsonl"):
        assert got[f"data/{NAME}/{f}"] == want[f"data/{NAME}/{f}"], f
    metrics, online_metrics = json.loads(got[f"metrics/{NAME}.json"]), json.loads(want[f"metrics/{NAME}.json"])
    assert metrics.pop("cost") == pytest.approx(online_metrics.pop("cost") / 2, abs=1e-4)  # the only difference
    assert metrics == online_metrics
    assert not any(KEY.encode() in b for b in got.values()) and KEY not in built.stdout + built.stderr


# bug guarded: the forecast and progress priced a batch teacher at the online price
def test_billed_price_applies_the_batch_discount() -> None:
    base = {"backend": "openai", "base_url": "http://x/v1", "model": "m",
            "price": {"input_per_mtok": 2.0, "output_per_mtok": 8.0}}
    assert billed_price(OpenAITeacher(**base)).cost(1e6, 1e6) == 10.0
    assert billed_price(OpenAITeacher(**base, mode="batch")).cost(1e6, 1e6) == 5.0
    discounted = {**base, "price": {**base["price"], "batch_discount": 0.25}}
    assert billed_price(OpenAITeacher(**discounted, mode="batch")).cost(1e6, 1e6) == 2.5


# bug guarded: a stage killed while its batch ran would submit (and pay for) the same requests again
def test_killed_stage_resumes_by_polling_the_same_batch(tmp_path: Path) -> None:
    with FakeOpenAI(api_key=KEY) as server:
        server.kill_on_poll = True
        root = make_project(tmp_path / "p", server.url, **BATCH)
        proc = subprocess.Popen([sys.executable, "stages/labeling.py", NAME], cwd=root, env=stage_env(KEY),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        server.kill_pid = proc.pid
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == -9, err
        records = list((root / ".kd" / "batches").glob("*.json"))
        assert len(records) == 1 and json.loads(records[0].read_text())["batch_id"] == "batch_0"
        assert (server.uploads, server.batches_created) == (1, 1)

        resumed = run_stage(root, KEY)
        assert resumed.returncode == 0, resumed.stderr
        assert (server.uploads, server.batches_created, server.received) == (1, 1, 0), "nothing resubmitted"
        assert server.batches["batch_0"]["status"] == "completed" and server.batch_lines == LIMIT
        assert f"(0 cached, {LIMIT} new, 0 rejected)" in resumed.stdout
        assert not list((root / ".kd" / "batches").glob("*.json"))


# bug guarded: a per-request error in the batch's error file must reject that record, as an online 400 does
def test_error_file_lines_become_rejections(tmp_path: Path) -> None:
    with FakeOpenAI(api_key=KEY) as server:
        server.batch_faults = ["ok", "context", "ok", "filter"]
        root = make_project(tmp_path / "p", server.url, **BATCH)
        built = run_stage(root, KEY)
        assert built.returncode == 0, built.stderr
        assert f"{NAME}: {LIMIT - 2} records (0 cached, {LIMIT - 2} new, 2 rejected)" in built.stdout
        rejected = [json.loads(line) for line in (root / "data" / NAME / "rejected.jsonl").read_text().splitlines()]
        assert sorted(r["reason"] for r in rejected) == ["refused_by_server", "too_long"]
        assert all(r["error"].startswith("HTTP 400: ") for r in rejected)


# bug guarded: an expired (or failed) batch must fail the stage in one line, not a traceback, and free its record
@pytest.mark.parametrize("end", ["expired", "failed"])
def test_a_batch_that_ends_badly_fails_in_one_line(tmp_path: Path, end: str) -> None:
    with FakeOpenAI(api_key=KEY) as server:
        server.batch_end = end
        root = make_project(tmp_path / "p", server.url, **BATCH)
        failed = run_stage(root, KEY)
        assert failed.returncode == 2, failed.stderr
        lines = failed.stderr.strip().splitlines()
        assert len(lines) == 1 and f"batch batch_0 {end}" in lines[0] and "Traceback" not in failed.stderr, lines
        assert not (root / "data" / NAME).exists()
        assert not list((root / ".kd" / "batches").glob("*.json")), "a rerun submits the missing requests anew"
        server.batch_end = "completed"
        assert run_stage(root, KEY).returncode == 0 and server.batches_created == 2
