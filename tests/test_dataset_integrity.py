"""A dataset's records are re-checked against its manifest wherever they are read (DESIGN.md §3)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kd.cli.main import main
from kd.distill.envelope import read_training_data
from kd.errors import KdError
from kd.records import MANIFEST_FILE, RECORDS_FILE, iter_dataset, read_dataset, write_dataset


def rec(i: int) -> dict:
    return {"prompt": [{"role": "user", "content": f"q{i}"}], "completion": [{"role": "assistant", "content": "c"}],
            "provenance": {"method": "labeling", "stage": "sft", "requests": [], "parents": [], "seeds": [],
                           "filters": []}}


@pytest.fixture
def project(tmp_path: Path) -> Path:
    write_dataset(tmp_path / "data/sft", "sft", "labeling", [rec(i) for i in range(16)], [], {}, None)
    return tmp_path


def _cut(project: Path, keep: int) -> None:
    path = project / "data/sft" / RECORDS_FILE
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:keep]))


# Bug: records.jsonl cut at a line boundary (12 of 16) was read as a whole dataset; a student trained on 12 records
# and named the manifest's 16-record fingerprint.
def test_truncated_records_stop_every_reader(project: Path) -> None:
    _cut(project, 12)
    with pytest.raises(KdError) as e:
        read_dataset(project / "data/sft")
    msg = str(e.value)
    assert "\n" not in msg and "data/sft" in msg and "12 records" in msg and "says 16" in msg
    assert "dvc checkout data/sft" in msg and "dvc repro -f sft" in msg
    with pytest.raises(KdError, match="12 records"):
        read_training_data(project, ["sft"])  # what a student trains on
    with pytest.raises(KdError, match="12 records.*says 16"):
        list(iter_dataset(project / "data/sft"))  # what a streamed stage reads its inputs through


# Bug: reordered or hand-edited records passed as the dataset the manifest fingerprints.
def test_reordered_or_edited_records_are_refused(project: Path) -> None:
    path = project / "data/sft" / RECORDS_FILE
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join([lines[1], lines[0], *lines[2:]]))
    with pytest.raises(KdError, match="fingerprint"):
        read_dataset(project / "data/sft")
    with pytest.raises(KdError, match="fingerprint"):
        list(iter_dataset(project / "data/sft"))
    row = json.loads(lines[3])
    row["completion"][0]["content"] = "edited"
    path.write_text("".join([*lines[:3], json.dumps(row, sort_keys=True) + "\n", *lines[4:]]))
    with pytest.raises(KdError, match=r"record 4 .*not the hash of its content"):
        read_dataset(project / "data/sft")
    with pytest.raises(KdError, match=r"record 4 .*not the hash of its content"):
        list(iter_dataset(project / "data/sft"))


# Bug: `kd show` printed the manifest's 16 records for a 12-record file, as if whole.
def test_show_prints_the_real_state(project: Path, capsys: pytest.CaptureFixture) -> None:
    _cut(project, 12)
    with pytest.raises(SystemExit) as e:
        main(["--root", str(project), "show", "sft"])
    out = capsys.readouterr().out
    assert e.value.code == 1
    assert "sft (labeling): 12 records" in out and "DAMAGED" in out and "says 16" in out
    assert "dvc checkout data/sft" in out


# Bug: a truncated manifest.json made `kd show` end in a JSONDecodeError traceback.
def test_show_truncated_manifest_is_one_line(project: Path, capsys: pytest.CaptureFixture) -> None:
    path = project / "data/sft" / MANIFEST_FILE
    path.write_text(path.read_text()[:40])
    with pytest.raises(SystemExit) as e:
        main(["--root", str(project), "show", "sft"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and "manifest.json: not a valid manifest" in err


# Bug: a truncated manifest.json made `kd diff` and `kd audit` end in a JSONDecodeError traceback.
@pytest.mark.parametrize("command", ["diff", "audit"])
def test_diff_and_audit_on_a_truncated_manifest_are_one_line(project: Path, command: str,
                                                             capsys: pytest.CaptureFixture) -> None:
    good = project / "data/copy"
    write_dataset(good, "copy", "labeling", [rec(i) for i in range(16)], [], {}, None)
    record_id = json.loads((project / "data/sft" / RECORDS_FILE).read_text().splitlines()[0])["id"]
    path = project / "data/sft" / MANIFEST_FILE
    path.write_text(path.read_text()[:40])
    model = project / "models/student"  # audit checks each model's datasets against today's manifests
    model.mkdir(parents=True)
    (model / "kd_model.json").write_text(json.dumps({"name": "student", "objective": "sft", "init": {},
                                                    "datasets": [{"name": "sft", "fingerprint": "f" * 64}]}))
    argv = ["diff", str(good), str(project / "data/sft")] if command == "diff" else ["audit", f"sft:{record_id[:12]}"]
    with pytest.raises(SystemExit) as e:
        main(["--root", str(project), *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and "manifest.json: not a valid manifest" in err
