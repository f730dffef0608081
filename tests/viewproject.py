"""A small built kd project for `kd view`'s tests, made without a teacher: datasets written with
kd.records.write_dataset, their rendered requests put in the request cache, committed with `dvc commit` in two
git commits (v2 edits explain.jinja, which changes the math records), plus a model, a training curve and an
evaluation report. One record's answer is `<script>alert(1)</script>`; the workspace then changes
`datasets.qa.sampling.max_tokens`, so the pipeline page has a stale stage to forecast.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml
from kdproject import ANSWER, EDIT_FROM, EDIT_TO, EXPLAIN, REPO, labeling, sh

from kd.cache.store import RequestCache, request_key
from kd.records import finalize, sha256_text, write_dataset

SCRIPT = "<script>alert(1)</script>"
SEEDS = [
    {"id": "math-001", "category": "math", "instruction": "What is 15% of 240?"},
    {"id": "math-002", "category": "math", "instruction": "Solve for x: 3x + 7 = 22."},
    {"id": "code-001", "category": "coding", "instruction": "Reverse a string in Python."},
    {"id": "html-001", "category": "writing", "instruction": "Write an HTML alert."},
]
TEACHER = {"backend": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "fake", "api_key_env": None}


def _git(root: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True)


def _request(cache: RequestCache, template: str, tsha: str, user: str, answer: str) -> dict[str, Any]:
    request = {"backend": "openai", "teacher": {"model": "fake"}, "sampling": {"max_tokens": 64, "temperature": 0.0},
               "sample_index": 0, "messages": [{"role": "user", "content": user}]}
    key = request_key(request)
    usage = {"prompt_tokens": len(user) // 4, "completion_tokens": len(answer) // 4}
    cache.put(key, request, {"text": answer, "finish_reason": "stop", "usage": usage})
    return {"key": key, "template": {"path": template, "sha256": tsha}, "teacher": request["teacher"],
            "sampling": request["sampling"], "sample_index": 0, "usage": usage, "finish_reason": "stop"}


def _build(root: Path, cache: RequestCache) -> None:
    """data/qa (one record per seed, rendered with today's explain.jinja) and data/derived (over qa)."""
    explain = (root / EXPLAIN).read_text()
    tsha, asha = sha256_text(explain), sha256_text((root / ANSWER).read_text())
    step = EDIT_TO if EDIT_TO in explain else EDIT_FROM
    qa = []
    for s in SEEDS:
        user = s["instruction"] + (f"\n{step}" if s["category"] == "math" else "")
        answer = SCRIPT if s["id"] == "html-001" else f"The answer to {s['id']} ({step.split()[-1]})"
        req = _request(cache, EXPLAIN, tsha, user, answer)
        qa.append(finalize({
            "prompt": [{"role": "user", "content": s["instruction"]}],
            "completion": [{"role": "assistant", "content": answer}], "category": s["category"],
            "provenance": {"method": "labeling", "stage": "qa", "requests": [req], "parents": [],
                           "seeds": [{"file": "seeds/instructions.jsonl", "id": s["id"]}],
                           "filters": [{"name": "non_empty", "passed": True, "detail": "answer has text"}]}}))
    rejected = [{"reason": "length", "text": "a raw answer cut <b>short</b>", "template": EXPLAIN,
                 "finish_reason": "length", "request_key": "0" * 64}]
    write_dataset(root / "data/qa", "qa", "labeling", qa, rejected, {EXPLAIN: tsha}, {"model": "fake"})
    derived = []
    for r in finalize_all(qa)[:2]:
        answer = f"Restated: {r['completion'][0]['content']}"
        req = _request(cache, ANSWER, asha, r["prompt"][0]["content"], answer)
        derived.append(finalize({
            "prompt": r["prompt"], "completion": [{"role": "assistant", "content": answer}], "category": r["category"],
            "provenance": {"method": "labeling", "stage": "derived", "requests": [req],
                           "parents": [{"dataset": "qa", "id": r["id"]}], "seeds": [], "filters": []}}))
    write_dataset(root / "data/derived", "derived", "labeling", derived, [], {ANSWER: asha}, {"model": "fake"})


def finalize_all(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(records, key=lambda r: r["id"])


def _commit(root: Path, message: str) -> None:
    sh(root, "dvc", "commit", "-f", "-q")
    _git(root, "add", "-A")
    _git(root, "commit", "-q", "-m", message)


def shared_view_project(factory: Any) -> Path:
    """The view project, built once per test session (it takes seconds) under pytest's base temporary directory:
    the modules that read it share it (one that changes it restores it, or works on a copy)."""
    root = factory.getbasetemp() / "view-shared" / "project"
    if not (root.parent / "built").is_file():
        if root.parent.exists():
            shutil.rmtree(root.parent)
        build_view_project(root)
        (root.parent / "built").touch()
    return root


def build_view_project(root: Path) -> Path:
    from kd.config import load_params
    from kd.pipeline.spec import dvc_yaml

    root.mkdir(parents=True)
    for d in ("prompts", "stages"):
        shutil.copytree(REPO / d, root / d)
    (root / "seeds").mkdir()
    (root / "seeds/instructions.jsonl").write_text("".join(json.dumps(s) + "\n" for s in SEEDS))
    params = {"project": "kd-view-test", "teachers": {"fake": TEACHER},
              "datasets": {"qa": labeling(len(SEEDS)), "derived": labeling(0, ANSWER, source="qa")}}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / "dvc.yaml").write_text(dvc_yaml(load_params(root), root))
    (root / ".gitignore").write_text(".kd/\n")
    for name in ("params.checked",):
        (root / "data").mkdir(exist_ok=True)
        (root / "data" / name).write_text("checked\n")
    (root / "metrics").mkdir()
    for ds in ("qa", "derived"):
        (root / f"metrics/{ds}.json").write_text("{}\n")
    _git(root, "init", "-q")
    _git(root, "config", "user.email", "test@example.com")
    _git(root, "config", "user.name", "kd test")
    sh(root, "dvc", "init", "-q")
    (root / ".dvc/config").write_text("[core]\n    analytics = false\n")  # what `dvc config` writes, 3 s sooner
    cache = RequestCache(root / ".kd/cache")
    _build(root, cache)
    _commit(root, "v1: build")
    file = root / EXPLAIN
    file.write_text(file.read_text().replace(EDIT_FROM, EDIT_TO))
    _build(root, cache)
    _models_and_reports(root)
    _commit(root, "v2: math answers show one step per line")
    params["datasets"]["qa"]["sampling"]["max_tokens"] = 80  # the workspace: qa and derived would run again
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def _models_and_reports(root: Path) -> None:
    fingerprint = json.loads((root / "data/qa/manifest.json").read_text())["fingerprint"]
    model = root / "models/student_sft"
    model.mkdir(parents=True)
    (model / "kd_model.json").write_text(json.dumps({
        "name": "student_sft", "objective": "sft", "init": {"kind": "from_teacher", "teacher": "fake"},
        "datasets": [{"name": "qa", "fingerprint": fingerprint}, {"name": "derived", "fingerprint": "f" * 64}],
        "params": {"training": {"epochs": 1}}, "git_commit": "0" * 40, "mlflow": {"run_id": None},
        "metrics": {"train_loss": 1.25}}))
    (model / "README.md").write_text(f"# student_sft\n\nTrained on qa ({fingerprint}). {SCRIPT}\n")
    (root / "plots").mkdir()
    (root / "plots/student_sft.csv").write_text("step,loss\n" + "".join(f"{i},{3 / i:.3f}\n" for i in range(1, 21)))
    (root / "reports").mkdir()
    (root / "reports/metrics.json").write_text(json.dumps({
        "teacher": {"rouge_l": 1.0, "rouge_l_lo": 1.0, "rouge_l_hi": 1.0},
        "student_sft": {"rouge_l": 0.41, "rouge_l_lo": 0.3, "rouge_l_hi": 0.52, "kl": 1.8, "kl_lo": 1.6, "kl_hi": 2.0}}))
    (root / "reports/generations.jsonl").write_text("".join(
        json.dumps({"prompt": p, "model": m, "text": f"{m} says {p}"}) + "\n"
        for p in ("math-001", "code-001") for m in ("teacher", "student_sft")))
