"""End to end through `stages/labeling.py` against the fake OpenAI server, in a throwaway project directory.

Covers the record-level contract of DESIGN.md §4-6: a rerun asks nothing, a rebuild is byte-identical, a
SIGKILL loses nothing already answered, a damaged cache entry is asked again, a dead teacher fails with one
line and no half-written dataset, and the API key is written nowhere.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from fake_openai import FakeOpenAI
from kdproject import damage

from kd.cache.store import RequestCache

REPO = Path(__file__).resolve().parents[1]
NAME = "qa"
LIMIT = 12


@pytest.fixture
def canary() -> str:
    return f"sk-canary-{secrets.token_hex(16)}"


def make_project(root: Path, url: str, **teacher: Any) -> Path:
    """prompts/, seeds/, stages/ and a params.yaml with one openai teacher and one labeling dataset."""
    root.mkdir(parents=True, exist_ok=True)
    for d in ("prompts", "seeds", "stages"):
        shutil.copytree(REPO / d, root / d)
    settings = {"concurrency": 4, "timeout_s": 2, "max_attempts": 3, "backoff_s": 0.01, "backoff_max_s": 0.05,
                **teacher}
    lines = ["project: kd-test", "teachers:", "  fake:", "    backend: openai", f"    base_url: {url}",
             "    model: fake", "    api_key_env: KD_CANARY_KEY"]
    lines += [f"    {k}: {v}" for k, v in settings.items()]
    lines += ["datasets:", f"  {NAME}:", "    method: labeling", "    teacher: fake", "    inputs:",
              "      - seeds: seeds/instructions.jsonl", f"        limit: {LIMIT}",
              "    template: prompts/labeling/explain.jinja", "    sampling: {temperature: 0.0, max_tokens: 64}"]
    (root / "params.yaml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def stage_env(key: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KD_")}
    return {**env, "KD_CANARY_KEY": key, "PYTHONDONTWRITEBYTECODE": "1"}


def run_stage(root: Path, key: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "stages/labeling.py", NAME], cwd=root, env=stage_env(key),
                          capture_output=True, text=True, timeout=60)


def outputs(root: Path) -> dict[str, bytes]:
    """Every file the stage wrote for the dataset (its outs and its metrics), by relative path."""
    files = sorted((root / "data" / NAME).iterdir()) + [root / "metrics" / f"{NAME}.json"]
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


def files_containing(root: Path, needle: str) -> list[str]:
    return [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and needle.encode() in p.read_bytes()]


def test_build_rerun_rebuild_and_no_secret_anywhere(tmp_path: Path, canary: str) -> None:
    with FakeOpenAI(api_key=canary) as server:
        root = make_project(tmp_path, server.url)
        first = run_stage(root, canary)
        assert first.returncode == 0, first.stderr
        for f in ("records.jsonl", "manifest.json", "rejected.jsonl"):
            assert (root / "data" / NAME / f).is_file()
        assert server.received == LIMIT and server.answered == LIMIT
        assert f"{NAME}: {LIMIT} records (0 cached, {LIMIT} new, 0 rejected)" in first.stdout
        built = outputs(root)
        manifest = json.loads(built[f"data/{NAME}/manifest.json"])
        assert manifest["records"] == LIMIT and manifest["teacher"]["backend"] == "openai"

        second = run_stage(root, canary)  # everything from the cache
        assert second.returncode == 0, second.stderr
        assert server.received == LIMIT, "a rerun must not ask the teacher again"
        assert f"({LIMIT} cached, 0 new" in second.stdout
        assert outputs(root) == built

        shutil.rmtree(root / "data")  # DVC deletes outs before it reruns a stage
        third = run_stage(root, canary)
        assert third.returncode == 0, third.stderr
        assert server.received == LIMIT
        assert outputs(root) == built

    # the key did reach the server, and nothing else
    assert all({k.lower(): v for k, v in h.items()}["authorization"] == f"Bearer {canary}" for h in server.headers)
    assert (root / ".kd" / "cache").is_dir()
    assert files_containing(root, canary) == []
    for run in (first, second, third):
        assert canary not in run.stdout and canary not in run.stderr


def test_kill_9_then_resume_equals_an_uninterrupted_build(tmp_path: Path, canary: str) -> None:
    with FakeOpenAI(api_key=canary) as reference:
        ref_root = make_project(tmp_path / "ref", reference.url, concurrency=1)
        assert run_stage(ref_root, canary).returncode == 0

    # the same endpoint as the reference: each record names the server that answered it (`served_by`)
    with FakeOpenAI(api_key=canary, kill_pid_at=5, port=int(reference.url.split(":")[-1].split("/")[0])) as server:
        root = make_project(tmp_path / "killed", server.url, concurrency=1)
        proc = subprocess.Popen([sys.executable, "stages/labeling.py", NAME], cwd=root, env=stage_env(canary),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        server.kill_pid = proc.pid
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == -9, err
        assert server.answered == 5 and server.received == 6
        assert not (root / "data" / NAME).exists(), "a killed stage must leave no dataset behind"
        assert not (root / "metrics").exists()
        assert RequestCache(root / ".kd" / "cache").count() == 5  # each answer committed as it arrived

        received_before = server.received
        resumed = run_stage(root, canary)
        assert resumed.returncode == 0, resumed.stderr
        assert server.received - received_before == LIMIT - 5
        assert server.answered == LIMIT, "every distinct request answered exactly once over both runs"
        assert f"(5 cached, {LIMIT - 5} new" in resumed.stdout

    assert outputs(root) == outputs(ref_root)
    assert canary not in out + err + resumed.stdout + resumed.stderr


def test_damaged_cache_entry_is_reported_and_asked_again(tmp_path: Path, canary: str) -> None:
    with FakeOpenAI(api_key=canary) as server:
        root = make_project(tmp_path, server.url)
        assert run_stage(root, canary).returncode == 0
        built = outputs(root)
        cache = RequestCache(root / ".kd" / "cache")
        key, raw = list(cache.entries())[3]
        damage(cache, key, lambda b: b[: len(b) // 2])

        again = run_stage(root, canary)
        assert again.returncode == 0, again.stderr
        assert "damaged" in again.stderr and key in again.stderr
        assert server.received == LIMIT + 1, "exactly the damaged entry is asked again"
        assert f"({LIMIT - 1} cached, 1 new" in again.stdout
        assert cache.raw(key) == raw, "the regenerated entry is whole again"
    assert outputs(root) == built


def test_dead_teacher_fails_with_one_line_and_no_dataset(tmp_path: Path, canary: str) -> None:
    with FakeOpenAI(api_key=canary, faults=["500"] * 50) as server:
        root = make_project(tmp_path, server.url, concurrency=1, max_attempts=2, backoff_s=0)
        result = run_stage(root, canary)
    assert result.returncode != 0
    assert server.received == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("kd: error:") and "'fake'" in lines[0] and "HTTP 500" in lines[0]
    assert not (root / "data" / NAME).exists()
    assert canary not in result.stderr + result.stdout
