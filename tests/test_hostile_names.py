"""Hostile input, round 2 (issue 19): names that become paths, stage names and command words; alias bombs, huge
integers and deep nesting in params.yaml; deep seed rows. Each is one line, exit 2, nothing written."""

from __future__ import annotations

import contextlib
import copy
import random
import re
import shlex
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from kd.cli.main import main
from kd.config import base as config_base
from kd.config import load_params
from kd.errors import KdError
from kd.pipeline.spec import stages
from kd.records import load_seeds

SECTIONS = ("teachers", "datasets", "students", "reward_models")
FIXED = [
    "sft2;touch PWNED", "student_sft$(id>PWNED3)", "a`id`", "a|b", "a&&b", "a>b", "a b", "a'b", 'a"b', "a\\b", "a*",
    "sft\n", "a\nb", "a\rb", "a\x1b]52;c;aGk=\x07", "a\x00b", "-rf", "a.b", "Sft", "SFT", "é", "ｓｆｔ", "sft\u200b",
    "", " ", "a" * 65, "1abc", "_x", "..", ".", "../prompts", "../../victim", "/tmp/x", "a/b", "~", "$HOME", "%x",
]
RESERVED = ("params", "teacher", "evaluate")  # stage names of their own: refused for stage-making sections only
HOSTILE_CHARS = ";|&$`'\"\\ \n\t\r\x1b\x00/.*?~<>(){}[]!#%^=+,:@-" + "éß中\u200b\u202e"


def generated(n: int, seed: int = 19) -> list[str]:
    """Random names: a plain stem with hostile characters spliced in, or a plain stem made too long."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        stem = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz_0123456789") for _ in range(rng.randint(0, 8)))
        bad = "".join(rng.choice(HOSTILE_CHARS) for _ in range(rng.randint(1, 3)))
        at = rng.randint(0, len(stem))
        out.append(stem[:at] + bad + stem[at:])
    return out


def files(root: Path) -> dict[str, float]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")}


SHIPPED = yaml.safe_load((REPO / "params.yaml").read_text())
DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)  # the fuzz test writes params.yaml ~70 times


def params_with(project: Path, section: str, name: str) -> None:
    """The shipped params.yaml with one more entry under `name` in `section`, its value a valid copy of a shipped
    entry."""
    data = copy.deepcopy(SHIPPED)
    if section == "reward_models":
        value = {"init": {"kind": "from_pretrained", "path": "models/student_sft"}, "datasets": ["sft"]}
    else:
        value = copy.deepcopy(next(iter(data[section].values())))
    data.setdefault(section, {})[name] = value
    (project / "params.yaml").write_text(yaml.dump(data, Dumper=DUMPER, sort_keys=False, allow_unicode=True))


def refusal(project: Path, capsys: pytest.CaptureFixture[str], *argv: str) -> list[str]:
    """The stderr lines of `kd <argv>` run in-process, which must exit 2."""
    with pytest.raises(SystemExit) as e:
        main(["--root", str(project), *argv])
    assert e.value.code == 2
    return capsys.readouterr().err.splitlines()


def test_fuzz_hostile_names_are_refused_in_one_line_and_nothing_is_written(tmp_path, capsys):
    # regression (issue 19, items 1-2): a dataset named `sft2;touch PWNED` reached dvc.yaml's `cmd:` unquoted, and
    # one named `../prompts` made `dvc repro` delete prompts/; `kd check` passed both
    project = tmp_path / "p"  # what params validation reads: params.yaml, templates, seeds
    for d in ("prompts", "seeds"):
        shutil.copytree(REPO / d, project / d)
    cases = [(SECTIONS[i % len(SECTIONS)], name) for i, name in enumerate(FIXED + generated(16))]
    cases += [(section, name) for section in SECTIONS[1:] for name in RESERVED]  # teacher names make no stage
    cases += [(section, "sft2;touch PWNED") for section in SECTIONS]
    for section, name in cases:
        params_with(project, section, name)
        before = files(project)
        with pytest.raises(KdError) as e:
            load_params(project)
        lines = str(e.value).splitlines()
        assert len(lines) == 1 and lines[0].isprintable(), (section, name, lines)
        assert lines[0].startswith(f"params.yaml: {section}."), (section, name, lines)
        assert "not a name" in lines[0] or name in RESERVED or "secret" in lines[0], (section, name, lines)
        assert files(project) == before
    for name in ("sft2;touch PWNED", "../prompts", "a\x1b]0;title\x07"):  # through the CLI: exit 2, one line
        params_with(project, "datasets", name)
        before = files(project)
        for argv in (("check",), ("pipeline", "--write")):
            err = refusal(project, capsys, *argv)
            assert len(err) == 1 and err[0].startswith("kd: error: params.yaml: datasets.") and err[0].isprintable()
        assert files(project) == before


def test_a_dataset_and_a_student_of_one_name_are_refused(project):
    # regression: both became the DVC stage of that name, and dvc.yaml silently kept only the student's
    params_with(project, "students", "sft")
    with pytest.raises(KdError, match=r"^params\.yaml: students\.sft: datasets\.sft has the same name"):
        load_params(project)


def small_params(project: Path, datasets: dict[str, dict], students: dict[str, dict]) -> None:
    """params.yaml with only the shipped teacher and the given datasets and students (a small stage graph)."""
    data = yaml.safe_load((project / "params.yaml").read_text())
    data.update(datasets=datasets, students=students, evaluation=None)
    (project / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


def test_hostile_names_that_get_past_validation_are_still_quoted_and_kept_inside(project, monkeypatch):
    # defence in depth (issue 19, items 1-2): should a hostile name ever pass validation, the generated command
    # still gives it to the stage as one word, and an out leading outside the project still stops dvc.yaml
    monkeypatch.setattr(config_base, "NAME", re.compile(r".+", re.S))
    shipped = yaml.safe_load((project / "params.yaml").read_text())
    ds, st = "sft2;touch PWNED", "student_sft$(id>PWNED3)"
    sft = {**shipped["datasets"]["sft"], "inputs": [{"seeds": "seeds/instructions.jsonl"}]}
    small_params(project, {ds: sft, "sft": sft}, {st: {**shipped["students"]["student_sft"], "datasets": [ds]}})
    graph = {s.name: s for s in stages(load_params(project), project)}
    assert shlex.split(graph[ds].cmd) == ["python", "stages/labeling.py", ds]
    assert shlex.split(graph[st].cmd) == ["python", "stages/student.py", st]
    assert graph["sft"].cmd == "python stages/labeling.py sft"  # a plain name is not quoted: dvc.lock stays
    small_params(project, {"../prompts": sft}, {})
    with pytest.raises(KdError) as e:
        stages(load_params(project), project)
    assert str(e.value).splitlines() == ["dvc.yaml: stage ../prompts: out data/../prompts leads out of its place in the "
                                         "project (`..`, an absolute path, a symlink leading out); DVC deletes a "
                                         "stage's outs before it runs"]


def test_an_out_outside_the_project_is_refused_before_dvc_yaml_is_written(project, capsys):
    # regression (issue 19, item 2): `embedded_teacher.out` is an out path from params; outside the project,
    # `dvc repro` would delete it
    for out, argvs in (("../victim", [("pipeline", "--write"), ("check",)]), ("/tmp/kd_victim", [("pipeline",)]),
                       (".", [("pipeline",)]), ("models/..", [("pipeline",)])):
        small_params(project, {}, {})
        data = yaml.safe_load((project / "params.yaml").read_text())
        data["embedded_teacher"]["out"] = data["teachers"]["smollm2"]["path"] = out
        (project / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
        before = (project / "dvc.yaml").read_bytes()
        for argv in argvs:
            err = refusal(project, capsys, *argv)
            assert err == [f"kd: error: dvc.yaml: stage teacher: out {out} leads out of its place in the project "
                           f"(`..`, an absolute path, a symlink leading out); DVC deletes a stage's outs before it "
                           f"runs"], err
        assert (project / "dvc.yaml").read_bytes() == before and not (project / "data").exists()


def test_an_out_through_a_symlink_leading_out_is_refused(project, tmp_path):
    # a cloned repository may carry a symlink (`data -> ..`); DVC would delete what the out names through it
    small_params(project, {}, {})
    (project / "data").symlink_to(tmp_path)
    with pytest.raises(KdError, match="stage params: out data/params.checked leads out of its place"):
        stages(load_params(project), project)


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Raise TimeoutError in the main thread after `seconds` (the work under test is pure Python: it is interrupted)."""
    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"still running after {seconds} s")
    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def bomb(levels: int) -> str:
    lines = ['lol0: &lol0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"lol{i}: &lol{i} [{', '.join([f'*lol{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(("extra", "says"), [
    (bomb(9), r"params\.yaml:\d+: lol\d: expands to over 50000 values"),  # billion laughs: 10^9 values
    ("x: &r [1, *r]\n", r"params\.yaml:\d+: x\.1: a recursive alias"),
    ("x: &r {a: 1, b: *r}\n", r"params\.yaml:\d+: x\.b: a recursive alias"),
    ("x: " + "[" * 200_000 + "]" * 200_000 + "\n", r"params\.yaml:\d+: nested deeper than 32 levels"),
    ("? [1, 2]\n: x\n", r"params\.yaml:\d+: a key must be a plain value, not a list$"),  # was a TypeError
])
def test_alias_bombs_and_deep_nesting_in_params_end_fast_in_one_line(project, capsys, extra, says):
    # regression (issue 19, item 6): a 9-level alias bomb hung `kd check` (~70 min in the secrets scan), and a
    # recursive alias or deep nesting was a RecursionError traceback
    with (project / "params.yaml").open("a") as f:
        f.write(extra)
    start = time.perf_counter()
    with deadline(5):  # a regression fails here instead of hanging the suite for an hour
        err = refusal(project, capsys, "check")
    assert time.perf_counter() - start < 2
    assert len(err) == 1 and re.match(f"kd: error: {says}", err[0]), err


def test_a_huge_integer_in_params_names_its_key(project, capsys):
    # regression (issue 19, item 13): a 5000-digit integer was a ValueError traceback (Python's int-str limit)
    text = (project / "params.yaml").read_text()
    (project / "params.yaml").write_text(text.replace("    seed: 0 ", "    seed: " + "9" * 5000 + " ", 1))
    err = refusal(project, capsys, "check")
    assert len(err) == 1 and re.match(r"kd: error: params\.yaml:\d+: datasets\.instructions\.seed: an integer of "
                                      r"5000 digits; params take at most 20$", err[0]), err


def test_a_seed_row_nested_deep_names_file_and_row(project, capsys):
    # regression (issue 19, item 13): a seed row nested 200,000 deep was a RecursionError traceback, in the stages
    # and in `kd check`'s seed streaming
    seeds = project / "seeds/instructions.jsonl"
    n = len(seeds.read_text().splitlines()) + 1
    for depth in (200_000, 100):  # beyond what json reads at all; within it, but past the bound
        seeds.write_text("".join(seeds.read_text().splitlines(True)[:n - 1])
                         + '{"instruction": "hi", "x": ' + "[" * depth + "]" * depth + "}\n")
        with pytest.raises(KdError) as e:
            load_seeds(project, "seeds/instructions.jsonl", ("instruction",))
        assert str(e.value).splitlines() == [f"{project}/seeds/instructions.jsonl:{n}: nested deeper than 64 levels"]
        err = refusal(project, capsys, "check")
        assert err and all(re.match(rf"kd: error: datasets\.\w+: .*seeds/instructions\.jsonl:{n}: nested deeper", line)
                           or re.match(rf"datasets\.\w+: .*seeds/instructions\.jsonl:{n}: nested deeper", line)
                           for line in err), err
