"""A model names the commit it learned from, and says so when the worktree's tracked inputs were not committed."""

from __future__ import annotations

import subprocess
from pathlib import Path

from kd.runtime.models import ModelInfo, model_card
from kd.tracking import DIRTY_SUFFIX, git_commit, git_modified


def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True).stdout.strip()


def _repo(root: Path) -> str:
    _git(root, "init", "-q")
    for f, text in {"prompts/a.jinja": "{{ x }}\n", "dvc.lock": "a\n", "metrics/sft.json": "{}\n",
                    "data/.gitignore": "/sft\n", "params.yaml": "project: kd\n"}.items():
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        (root / f).write_text(text)
    _git(root, "add", ".")
    _git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    return _git(root, "rev-parse", "HEAD")


# Bug: edit -> `dvc repro` -> commit gave the model the commit *before* the templates it learned from, as clean.
def test_uncommitted_template_edit_marks_the_commit_dirty(tmp_path: Path) -> None:
    head = _repo(tmp_path)
    assert git_commit(tmp_path) == head and git_modified(tmp_path) == []
    # what a build rewrites itself does not make the inputs dirty
    (tmp_path / "dvc.lock").write_text("b\n")
    (tmp_path / "metrics/sft.json").write_text('{"loss": 1}\n')
    (tmp_path / "data/.gitignore").write_text("/sft\n/qa\n")
    (tmp_path / "untracked.txt").write_text("x")
    assert git_commit(tmp_path) == head
    (tmp_path / "prompts/a.jinja").write_text("{{ x }} edited\n")
    _git(tmp_path, "add", "params.yaml")
    assert git_modified(tmp_path) == ["prompts/a.jinja"]
    assert git_commit(tmp_path) == head + DIRTY_SUFFIX
    (tmp_path / "params.yaml").write_text("project: other\n")
    _git(tmp_path, "add", "params.yaml")  # staged but not committed is still not the commit
    assert git_modified(tmp_path) == ["params.yaml", "prompts/a.jinja"]


# Bug: the model card claimed a clean commit whatever the worktree held.
def test_card_says_when_the_commit_is_not_clean() -> None:
    info = ModelInfo(name="s", objective="sft", init={"kind": "from_config"}, datasets=[],
                     git_commit="abc123" + DIRTY_SUFFIX)
    card = model_card(info)
    assert "abc123+dirty" in card and "not a clean commit" in card
    assert "not a clean commit" not in model_card(info.model_copy(update={"git_commit": "abc123"}))
