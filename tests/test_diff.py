"""`kd diff`: record-level diffs across git revisions (read through DVC), the workspace, and directories."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from kdproject import (
    EDIT_FROM,
    EDIT_TO,
    EXPLAIN,
    QA_LIMIT,
    git_sha256,
    kd,
    kd_json,
    math_seeds,
    records,
    sh,
    shared_history,
)


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return shared_history(tmp_path_factory)



def test_template_edit_is_named_as_the_cause_of_exactly_the_records_it_changed(history):
    root = history["root"]
    report = kd_json(root, "diff", "data/qa", "HEAD~1", "HEAD")
    n_math = math_seeds(QA_LIMIT)
    assert n_math > 0
    c = report["counts"]
    # exactly the records whose rendered request changed, which is exactly what the run paid for
    assert c["changed"] == c["requests_changed"] == n_math == history["new_requests"]
    assert c["added"] == c["removed"] == 0
    assert c["unchanged"] == QA_LIMIT - n_math
    assert all("seeds/instructions.jsonl:math-" in row["identity"] for row in report["changed"])
    [cause] = report["causes"]
    assert cause["kind"] == "template" and cause["path"] == EXPLAIN and cause["records"] == n_math
    assert cause["old"] == git_sha256(root, "HEAD~1", EXPLAIN)
    assert cause["new"] == git_sha256(root, "HEAD", EXPLAIN)
    assert f"-{{% if category == \"math\" %}}{EDIT_FROM}" in cause["template_diff"]
    assert f"+{{% if category == \"math\" %}}{EDIT_TO}" in cause["template_diff"]
    # the other records were not re-asked: same content, only the template hash in their provenance moved
    assert report["provenance_only"] == [{"fields": "requests.template", "records": QA_LIMIT - n_math}]
    assert len(report["examples"]) == 3
    for ex in report["examples"]:
        [prompt] = ex["prompt_diffs"]
        assert f"-  {EDIT_FROM}" in prompt["diff"] and f"+  {EDIT_TO}" in prompt["diff"]
        assert f"+  {EDIT_TO}" in ex["output_diff"]


def test_datasets_the_template_does_not_reach_show_no_change(history):
    root = history["root"]
    other = kd_json(root, "diff", "data/other", "HEAD~1", "HEAD")
    assert other["counts"] == {"added": 0, "removed": 0, "changed": 0, "unchanged": 6, "provenance_only": 0,
                               "requests_changed": 0}
    # derived answers qa's prompts: its inputs did not change, only the ids of the parents they came from
    derived = kd_json(root, "diff", "derived", "HEAD~1", "HEAD")
    assert derived["counts"]["changed"] == derived["counts"]["added"] == derived["counts"]["removed"] == 0
    assert derived["provenance_only"] == [{"fields": "parents", "records": math_seeds(QA_LIMIT)}]


def test_revision_against_workspace_and_the_defaults(history):
    root = history["root"]
    to_workspace = kd_json(root, "diff", "data/qa", "HEAD~1")
    assert to_workspace["new"]["version"] == "workspace"
    assert to_workspace["counts"] == kd_json(root, "diff", "data/qa", "HEAD~1", "HEAD")["counts"]
    nothing = kd_json(root, "diff", "data/qa")  # HEAD against the workspace
    assert nothing["counts"]["unchanged"] == QA_LIMIT and nothing["causes"] == []


def test_readable_output_is_plain_when_not_a_terminal_and_coloured_on_request(history):
    root = history["root"]
    code, text = kd(root, "diff", "data/qa", "HEAD~1", "HEAD")
    assert code == 0
    n = math_seeds(QA_LIMIT)
    assert f"{n} changed" in text and f"template {EXPLAIN}" in text and "\033[" not in text
    assert f"+  {EDIT_TO}" in text and "rendered request 1:" in text
    code, coloured = kd(root, "diff", "data/qa", "HEAD~1", "HEAD", "--color", "always")
    assert "\033[32m" in coloured


def write_dataset_dir(path: Path, rows: list[dict[str, Any]]) -> None:
    path.mkdir(parents=True)
    (path / "records.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    (path / "manifest.json").write_text(json.dumps({"name": path.name, "files": {"records": "records.jsonl"},
                                                    "fingerprint": "x", "rejected": {}}))


def test_two_directories_match_records_by_input_not_by_id(history, tmp_path):
    from kd.records import finalize

    rows = records(history["root"], "qa")
    edited = [dict(r) for r in rows]
    # a new answer to the same input is a change (the bug this guards: removal + addition)
    edited[0] = finalize({k: v for k, v in edited[0].items() if k != "id"} |
                         {"completion": [{"role": "assistant", "content": "another answer"}]})
    del edited[1]
    write_dataset_dir(tmp_path / "a" / "qa", rows)
    write_dataset_dir(tmp_path / "b" / "qa", edited)
    report = kd_json(history["root"], "diff", str(tmp_path / "a" / "qa"), str(tmp_path / "b" / "qa"))
    assert report["counts"] == {"added": 0, "removed": 1, "changed": 1, "unchanged": QA_LIMIT - 2,
                                "provenance_only": 0, "requests_changed": 0}
    assert report["causes"][0]["kind"] == "answer"
    assert report["removed"][0]["id"] == rows[1]["id"]
    assert "+  another answer" in report["examples"][0]["output_diff"]


def test_a_version_removed_by_dvc_gc_asks_the_user_to_fetch(history, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(history["root"], root, symlinks=True)
    sh(root, "dvc", "gc", "--workspace", "--force", "-q")
    code, out = kd(root, "diff", "data/qa", "HEAD~1", "HEAD")
    assert code == 2
    assert "not in the local cache" in out and "dvc fetch" in out and "Traceback" not in out
    code, out = kd(root, "diff", "data/qa", "no-such-rev", "HEAD")
    assert code == 2 and "no-such-rev: not a git revision" in out
