"""A params mistake under `dvc repro` stops the build before DVC removes any stage's outputs (README's promise)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from fake_openai import FakeOpenAI
from kdproject import commit, labeling, make_project, repro, sh

from kd.config import PARAMS_STAGE, load_params
from kd.errors import KdError
from kd.paths import PARAMS_CHECKED
from kd.pipeline.spec import stages
from kd.stage import run

REPO = Path(__file__).resolve().parents[1]


# Bug: a typo in a dataset's params under `dvc repro` deleted data/<name> (DVC removes a stage's outs before its
# command runs, and the stage only then found the typo).
def test_typo_under_dvc_repro_keeps_the_built_dataset(tmp_path: Path) -> None:
    with FakeOpenAI() as server:
        root = make_project(tmp_path / "p", server.url, {"qa": labeling(4)})
        repro(root)
        commit(root, "built")
        records = (root / "data/qa/records.jsonl").read_bytes()
        checked = (root / PARAMS_CHECKED).read_bytes()
        asked = server.received
        params = yaml.safe_load((root / "params.yaml").read_text())
        params["datasets"]["qa"]["sampling"]["temprature"] = 0.3
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        r = sh(root, "dvc", "repro", check=False)
        assert r.returncode != 0
        errors = [line for line in (r.stdout + r.stderr).splitlines() if line.startswith("kd: error:")]
        assert len(errors) == 1 and errors[0].startswith("kd: error: params.yaml: datasets.qa.sampling.temprature: "
                                                         "unknown key; allowed: temperature")
        assert "Traceback" not in r.stdout + r.stderr
        assert (root / "data/qa/records.jsonl").read_bytes() == records  # still there, byte-identical
        # fixed, and another key of the dataset edited: the check reruns with the same bytes; only qa is rebuilt
        del params["datasets"]["qa"]["sampling"]["temprature"]
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        r = repro(root)
        assert (root / PARAMS_CHECKED).read_bytes() == checked
        assert server.received == asked and (root / "data/qa/records.jsonl").read_bytes() == records
        assert "Running stage 'qa'" not in r.stdout  # its deps and params did not change: not stale


def test_every_stage_depends_on_the_params_check() -> None:
    graph = stages(load_params(REPO), REPO)
    assert graph[0].name == PARAMS_STAGE and graph[0].outs == [str(PARAMS_CHECKED)]
    assert {"params.yaml", "prompts/labeling/explain.jinja", "seeds/instructions.jsonl"} <= set(graph[0].deps)
    assert all(str(PARAMS_CHECKED) in s.deps for s in graph[1:])


def test_params_is_not_a_dataset_name(project: Path) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["datasets"]["params"] = params["datasets"].pop("sft")
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    with pytest.raises(KdError, match="datasets.params: 'params' names a stage of its own"):
        load_params(project)


# Bug: a stage failing under `dvc repro` left the user without its outputs and without a word on getting them back.
def test_stage_error_under_dvc_says_how_to_restore(monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture) -> None:
    def fail() -> str:
        raise KdError("seeds/x.jsonl: no seed records")

    monkeypatch.setenv("DVC_STAGE", "sft")
    with pytest.raises(SystemExit) as e:
        run(fail)
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "kd: error: seeds/x.jsonl: no seed records; `dvc checkout sft` brings back the outputs dvc repro removed "
        "before running the stage"]
    monkeypatch.delenv("DVC_STAGE")
    with pytest.raises(SystemExit):
        run(fail)
    assert "dvc checkout" not in capsys.readouterr().err  # not under dvc: nothing was removed


def test_params_stage_script_runs(project: Path) -> None:
    r = subprocess.run([sys.executable, "stages/params.py"], cwd=project, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("params: OK")
    assert (project / PARAMS_CHECKED).is_file()
