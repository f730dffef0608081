"""params.yaml is read strictly: no coercion, no infinities, no duplicate keys; each mistake is one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from kd.config import load_params
from kd.config.students import Hidden
from kd.config.yamlfile import read_params_yaml
from kd.errors import KdError


def replace(project: Path, old: str, new: str) -> None:
    text = (project / "params.yaml").read_text()
    assert old in text
    (project / "params.yaml").write_text(text.replace(old, new, 1))


def error_of(project: Path) -> str:
    with pytest.raises(KdError) as e:
        load_params(project)
    return str(e.value)


# Bug: `lr: .inf` passed `kd check` and crashed in run_hash with a traceback (and .nan anywhere likewise).
@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "1e400"])
def test_non_finite_floats_are_refused(project: Path, value: str) -> None:
    replace(project, "lr: 3.0e-4", f"lr: {value}")
    assert error_of(project) == ("params.yaml: students.student_sft.training.lr: must be a finite number, "
                                 "not .inf or .nan")


# Bug: `epochs: "1"` and `samples: true` were silently coerced to numbers.
def test_no_coercion_of_strings_or_booleans(project: Path) -> None:
    replace(project, "epochs: 2", 'epochs: "1"')
    assert error_of(project) == ("params.yaml: students.student_sft.training.epochs: must be a valid number, "
                                 "not a string (quoted in YAML?)")
    replace(project, 'epochs: "1"', "epochs: 2")
    replace(project, "samples: 1 ", "samples: true ")
    assert error_of(project) == "params.yaml: datasets.sft.samples: must be a valid integer, not true"


# PyYAML reads `3e-4` as the string "3e-4" (YAML 1.1 wants a dot); DVC reads it as a float, and so does kd now.
# An int where a float is expected stays fine.
def test_yaml_numbers_still_validate(project: Path) -> None:
    replace(project, "lr: 3.0e-4", "lr: 3e-4")
    replace(project, "temperature: 0.9", "temperature: 1")
    params = load_params(project)
    assert params.students["student_sft"].training.lr == 3e-4
    assert params.datasets["instructions"].sampling.temperature == 1.0
    assert read_params_yaml("a: 1e3\nb: -2E-1\nc: .5\nd: 7\ne: '3e-4'\n", "f") == \
        {"a": 1000.0, "b": -0.2, "c": 0.5, "d": 7, "e": "3e-4"}
    assert Hidden.model_validate({"teacher": "t", "pairs": [[0, 1]]}).pairs == [(0, 1)]  # YAML lists as pairs


# Bug: a key written twice kept the last value silently.
def test_duplicate_keys_name_key_and_lines(project: Path) -> None:
    text = (project / "params.yaml").read_text()
    line = text[: text.index("    samples: 1 ")].count("\n") + 1
    replace(project, "    samples: 1 ", "    samples: 2\n    samples: 1 ")
    assert error_of(project) == (f"params.yaml:{line + 1}: duplicate key 'samples' (first at line {line}); "
                                 f"PyYAML would keep the last one silently")
    # merges (`<<: *anchor`) with overrides are not duplicates
    assert read_params_yaml("a: &x {p: 1, q: 2}\nb:\n  <<: *x\n  q: 3\n", "f")["b"] == {"p": 1, "q": 3}


def test_every_shipped_params_file_goes_through_the_strict_loader() -> None:
    for path in [REPO / "params.yaml", *sorted((REPO / "profiles").glob("*.yaml"))]:
        read_params_yaml(path.read_text(encoding="utf-8"), path.name)  # no duplicate keys
    load_params(REPO)


# Bug: `kd check` passed `lr: .inf`; it must be one line from the CLI, exit 2, no traceback.
def test_check_prints_one_line(project: Path) -> None:
    replace(project, "lr: 3.0e-4", "lr: .inf")
    r = subprocess.run([sys.executable, "-m", "kd.cli", "check"], cwd=project, capture_output=True, text=True,
                       env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        "kd: error: params.yaml: students.student_sft.training.lr: must be a finite number, not .inf or .nan"]
