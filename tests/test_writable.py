"""A stage that cannot write its outputs fails when it starts, before any teacher is asked."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from fake_openai import FakeOpenAI
from kdproject import labeling, make_project

from kd.elicit.build import build_dataset
from kd.elicit.labeling import label
from kd.errors import KdError
from kd.records import ensure_writable


# Bug: with a read-only data/ the teacher answered every request, then the stage crashed writing the dataset.
def test_unwritable_data_dir_fails_before_any_request(tmp_path: Path) -> None:
    with FakeOpenAI() as server:
        root = make_project(tmp_path / "p", server.url, {"qa": labeling(4)})
        (root / "blocked").write_text("a file where a directory should be")
        with pytest.raises(KdError) as e:
            build_dataset("qa", "labeling", label, root, data_dir=root / "blocked" / "data")
        assert server.received == 0
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{root / 'blocked' / 'data'}: cannot write there")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_directory_is_named(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    os.chmod(tmp_path / "data", stat.S_IRUSR | stat.S_IXUSR)
    try:
        with pytest.raises(KdError, match=r"data: cannot write there \(Permission denied\)"):
            ensure_writable(tmp_path / "data")
    finally:
        os.chmod(tmp_path / "data", stat.S_IRWXU)


def test_probe_leaves_nothing_behind(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    ensure_writable(tmp_path / "data", tmp_path / "metrics" / "deeper")  # a missing one: its parent is probed
    assert sorted(os.listdir(tmp_path)) == ["data"] and os.listdir(tmp_path / "data") == []
