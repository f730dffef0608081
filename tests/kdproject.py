"""Throwaway git + DVC projects whose generation stages ask the fake OpenAI server (tests/fake_openai.py).

    root = make_project(tmp / "p", server.url, {"qa": labeling(16), "other": labeling(6, "answer.jinja")})
    repro(root); commit(root, "v1")
    code, out = kd(root, "diff", "data/qa", "HEAD~1", "HEAD", "--json")
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
EXPLAIN = "prompts/labeling/explain.jinja"
ANSWER = "prompts/labeling/answer.jinja"
# Only math seeds render this line, so the edit changes exactly their requests.
EDIT_FROM = "Show each calculation."
EDIT_TO = "Show each calculation, one step per line."


def labeling(limit: int, template: str = EXPLAIN, source: str | None = None) -> dict[str, Any]:
    src = {"dataset": source} if source else {"seeds": "seeds/instructions.jsonl", "limit": limit}
    return {"method": "labeling", "teacher": "fake", "inputs": [src], "template": template,
            "sampling": {"temperature": 0.0, "max_tokens": 64}}


def curation(count: int) -> dict[str, Any]:
    return {"method": "curation", "teacher": "fake", "topics": "seeds/topics.jsonl",
            "attributes": "seeds/attributes.jsonl", "count": count,
            "question_template": "prompts/curation/question.jinja", "answer_template": "prompts/curation/answer.jinja"}


def make_project(root: Path, url: str, datasets: dict[str, dict[str, Any]], price: dict | None = None) -> Path:
    """prompts/, seeds/, stages/, params.yaml and dvc.yaml (one stage per dataset), committed in git."""
    import yaml

    root.mkdir(parents=True)
    for d in ("prompts", "seeds", "stages"):
        shutil.copytree(REPO / d, root / d)
    teacher = {"backend": "openai", "base_url": url, "model": "fake", "api_key_env": None, "concurrency": 4,
               "timeout_s": 5, "max_attempts": 2, "backoff_s": 0.01, **({"price": price} if price else {})}
    (root / "params.yaml").write_text(yaml.safe_dump({"project": "kd-test", "teachers": {"fake": teacher},
                                                      "datasets": datasets}, sort_keys=False))
    from kd.config import load_params
    from kd.pipeline.spec import dvc_yaml

    (root / "dvc.yaml").write_text(dvc_yaml(load_params(root), root))
    (root / ".gitignore").write_text(".kd/\n")
    sh(root, "git", "init", "-q")
    sh(root, "git", "config", "user.email", "test@example.com")
    sh(root, "git", "config", "user.name", "kd test")
    sh(root, "dvc", "init", "-q")
    sh(root, "dvc", "config", "core.analytics", "false")
    commit(root, "project")
    return root


def env() -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("KD_", "DVC_"))}
    return {**base, "PATH": f"{BIN}:{base.get('PATH', '')}", "PYTHONDONTWRITEBYTECODE": "1", "NO_COLOR": "1"}


def sh(root: Path, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    exe = str(BIN / cmd[0]) if (BIN / cmd[0]).exists() else cmd[0]
    r = subprocess.run([exe, *cmd[1:]], cwd=root, capture_output=True, text=True, env=env(), timeout=120)
    assert not check or r.returncode == 0, f"{cmd} failed:\n{r.stdout}\n{r.stderr}"
    return r


def repro(root: Path, *targets: str) -> subprocess.CompletedProcess[str]:
    return sh(root, "dvc", "repro", *targets)


def commit(root: Path, message: str) -> None:
    sh(root, "git", "add", "-A")
    sh(root, "git", "commit", "-q", "-m", message)


def edit_template(root: Path, path: str = EXPLAIN) -> None:
    file = root / path
    text = file.read_text()
    assert EDIT_FROM in text
    file.write_text(text.replace(EDIT_FROM, EDIT_TO))


def kd(root: Path, *args: str) -> tuple[int, str]:
    """Run the `kd` CLI in this process (no interpreter start-up); returns (exit code, stdout + stderr)."""
    from kd.cli.main import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            main(["--root", str(root), *args])
            code = 0
        except SystemExit as e:
            code = int(e.code or 0)
    return code, out.getvalue()


def kd_json(root: Path, *args: str) -> dict[str, Any]:
    code, out = kd(root, *args, "--json")
    assert code == 0, out
    return json.loads(out)


def records(root: Path, name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (root / "data" / name / "records.jsonl").read_text().splitlines()]


def math_seeds(limit: int) -> int:
    rows = [json.loads(line) for line in (REPO / "seeds/instructions.jsonl").read_text().splitlines()[:limit]]
    return sum(r.get("category") == "math" for r in rows)


_SHARED: dict[str, Any] = {}
QA_LIMIT = 16


def shared_history(tmp_path_factory: Any) -> dict[str, Any]:
    """One project with two commits, built once per test session and only read by the tests that use it.

    v1 builds qa (16 seeds, explain.jinja), other (answer.jinja) and derived (answer.jinja over qa's
    prompts); v2 edits explain.jinja so that only math seeds render differently, reruns, commits.
    `new_requests` is what the v2 run actually sent to the teacher.
    """
    if not _SHARED:
        from fake_openai import FakeOpenAI

        server = FakeOpenAI().start()  # a daemon thread; lives as long as the test session
        root = make_project(tmp_path_factory.mktemp("history") / "project", server.url,
                            {"qa": labeling(QA_LIMIT), "other": labeling(6, ANSWER),
                             "derived": labeling(0, ANSWER, source="qa")})
        repro(root)
        commit(root, "v1: build")
        edit_template(root)
        before = server.received
        v2 = repro(root)
        commit(root, "v2: math answers show one step per line")
        _SHARED.update(root=root, server=server, new_requests=server.received - before, v2_stdout=v2.stdout)
    return _SHARED


def git_sha256(root: Path, rev: str, path: str) -> str:
    """sha256sum of a file as it was at a git revision (what `git show REV:PATH | sha256sum` prints)."""
    blob = subprocess.run(["git", "-C", str(root), "show", f"{rev}:{path}"], capture_output=True, check=True).stdout
    return hashlib.sha256(blob).hexdigest()


def store_raw(cache: Any, key: str, raw: bytes) -> None:
    """Store `raw` as the entry for `key` behind the cache's back (what a disk error, a hand edit or a buggy or
    older writer could leave)."""
    cache.ensure_writable()  # the database exists
    with contextlib.closing(sqlite3.connect(cache.db, isolation_level=None)) as db:
        if not db.execute("UPDATE entries SET entry = ? WHERE key = ?", (raw, key)).rowcount:  # damaged in place
            db.execute("INSERT INTO entries (key, teacher, prompt_chars, prompt_tokens, completion_tokens, entry) "
                       "VALUES (?, 1, 0, 0, 0, ?)", (key, raw))


def damage(cache: Any, key: str, how) -> None:
    store_raw(cache, key, how(cache.raw(key)))
