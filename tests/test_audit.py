"""`kd audit`: a record's lineage back to its seeds with verifiable template hashes; a model's inputs."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import pytest
from kdproject import EXPLAIN, git_sha256, kd, kd_json, records, shared_history


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return shared_history(tmp_path_factory)



def steps(node: dict[str, Any]) -> list[dict[str, Any]]:
    return [node] + [s for p in node["parents"] for s in steps(p)]


def test_a_random_final_record_reaches_its_seeds_with_hashes_that_git_confirms(history):
    root = history["root"]
    record = random.Random(4).choice(records(root, "derived"))
    report = kd_json(root, "audit", record["id"][:10])
    assert report["dataset"] == "derived" and report["id"] == record["id"]
    chain = steps(report["lineage"])
    assert [s["dataset"] for s in chain] == ["derived", "qa"]  # derived <- qa <- seeds
    assert report["seeds"] and report["seeds"][0]["file"] == "seeds/instructions.jsonl"
    seed_rows = {json.loads(line)["id"] for line in (root / "seeds/instructions.jsonl").read_text().splitlines()}
    assert {s["id"] for s in report["seeds"]} <= seed_rows
    assert chain[-1]["seeds"][0]["row"]["instruction"] == chain[-1]["content"]["prompt"][-1]["content"]
    for step in chain:
        for request in step["requests"]:
            for t in [request["template"], *request["includes"]]:
                assert t["current"] is True
                assert t["sha256"] == git_sha256(root, t["commit"], t["path"])  # `sha256sum` at the named commit
                assert t["sha256"] == git_sha256(root, t["introduced"], t["path"])
            assert request["messages"][-1]["role"] == "user"  # the rendered request, from the cache
            assert request["usage"]["prompt_tokens"] > 0 and request["teacher"]["model"] == "fake"


def test_template_versions_name_the_last_commit_that_had_them(history):
    from kd.provenance.revisions import resolve_rev, template_origin

    root = history["root"]
    old = git_sha256(root, "HEAD~1", EXPLAIN)
    origin = template_origin(root, EXPLAIN, old)
    assert origin == {"introduced": resolve_rev(root, "HEAD~2"), "commit": resolve_rev(root, "HEAD~1"), "current": False}
    assert template_origin(root, EXPLAIN, "0" * 64)["commit"] is None


def test_readable_audit_and_mistakes(history):
    root = history["root"]
    rid = records(root, "qa")[0]["id"]
    code, text = kd(root, "audit", f"qa:{rid[:8]}")
    assert code == 0 and "seeds reached: 1" in text and EXPLAIN in text and "today's file has it" in text
    code, text = kd(root, "audit", "ffffffffffff")
    assert code == 2 and "no record id starts with ffffffffffff" in text
    code, text = kd(root, "audit", "ab")
    assert code == 2 and "at least 4 hex characters" in text


def write_model(path: Path, datasets: list[dict[str, str]], run_id: str | None, uri: str) -> Path:
    path.mkdir(parents=True)
    (path / "kd_model.json").write_text(json.dumps({
        "name": path.name, "objective": "sft", "init": {"kind": "from_teacher", "teacher": "smollm2", "every": 5},
        "datasets": datasets, "logits": None, "params": {"training": {"epochs": 1}}, "git_commit": "0" * 40,
        "mlflow": {"run_id": run_id, "tracking_uri": uri}, "metrics": {"train_loss": 1.25}}))
    return path


def test_model_audit_checks_fingerprints_and_finds_the_mlflow_run(history, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the sqlite store takes ~10 s to create here
    import mlflow

    root = history["root"]
    uri = (tmp_path / "mlruns").as_uri()
    # mlflow.set_tracking_uri would also export MLFLOW_TRACKING_URI to every later test and subprocess
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with mlflow.start_run() as run:
        mlflow.log_metric("eval_loss", 0.5)
    qa = json.loads((root / "data/qa/manifest.json").read_text())["fingerprint"]
    model = write_model(root / "models" / "student", [{"name": "qa", "fingerprint": qa},
                                                      {"name": "other", "fingerprint": "f" * 64}], run.info.run_id, uri)
    try:
        report = kd_json(root, "audit", "models/student")
        assert [(d["name"], d["matches"]) for d in report["datasets"]] == [("qa", True), ("other", False)]
        assert report["mlflow"]["found"] and report["mlflow"]["run_id"] == run.info.run_id
        assert report["mlflow"]["metrics"] == {"eval_loss": 0.5}
        assert report["git_commit"]["in_repository"] is False
        # and from the record side: which models learned from a qa record, directly or through derived
        rid = records(root, "qa")[0]["id"]
        used = kd_json(root, "audit", rid[:12])["models"]
        assert used[0]["model"] == "models/student" and used[0]["via"][0]["matches"] is True
    finally:
        shutil.rmtree(model.parent)
    missing = write_model(tmp_path / "lost", [], "0123456789abcdef", "sqlite:///nowhere.db")
    code, text = kd(root, "audit", str(missing))
    assert code == 0 and "run not found" in text and "tracking store does not exist" in text
