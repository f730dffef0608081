"""The environment in provenance (issue 21): recorded once per manifest and model, never in records or request keys,
and named by `kd diff` and `kd status` when it changed."""

from __future__ import annotations

import importlib.metadata
import json
import shutil
from pathlib import Path

import pytest
from fake_openai import FakeOpenAI

from kd.runtime import environment

REPO = Path(__file__).resolve().parents[1]


def other_transformers(monkeypatch: pytest.MonkeyPatch, fake: str = "99.0.0") -> None:
    """Make the collector see another transformers version, as on a machine where `make repro` installed it."""
    real = importlib.metadata.version
    monkeypatch.setattr(environment, "version", lambda name: fake if name == "transformers" else real(name))


def build_qa(root: Path, data: str) -> str:
    from kd.elicit.build import build_dataset
    from kd.elicit.labeling import label

    return build_dataset("qa", "labeling", label, root, data_dir=root / data, metrics_dir=root / "metrics")


@pytest.fixture
def project(tmp_path: Path):
    for d in ("prompts", "seeds"):
        shutil.copytree(REPO / d, tmp_path / d)
    with FakeOpenAI() as server:
        teacher = {"backend": "openai", "base_url": server.url, "model": "fake", "api_key_env": None,
                   "concurrency": 2, "timeout_s": 2}
        dataset = {"method": "labeling", "teacher": "fake", "inputs": [{"seeds": "seeds/instructions.jsonl", "limit": 4}],
                   "template": "prompts/labeling/answer.jinja", "sampling": {"max_tokens": 32}}
        (tmp_path / "params.yaml").write_text(json.dumps({"teachers": {"fake": teacher}, "datasets": {"qa": dataset}}))
        yield tmp_path


# Regression (issue 21): a rebuild under transformers 5.25 made other data and nothing recorded why.
def test_manifest_records_the_environment_and_the_records_stay_byte_identical(project, monkeypatch, capsys):
    from kd.provenance.diff import diff, render, sides

    build_qa(project, "a")
    other_transformers(monkeypatch)
    line = build_qa(project, "b")
    assert "(4 cached, 0 new" in line  # same request keys: the cache answered every one
    a, b = project / "a" / "qa", project / "b" / "qa"
    assert (a / "records.jsonl").read_bytes() == (b / "records.jsonl").read_bytes()
    assert b"transformers" not in (b / "records.jsonl").read_bytes()
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
    assert ma["fingerprint"] == mb["fingerprint"]
    real = importlib.metadata.version("transformers")
    assert ma["environment"]["libraries"]["transformers"] == real
    assert mb["environment"]["libraries"]["transformers"] == "99.0.0"
    assert ma["environment"]["cpu"] == environment.cpu_kind() and "device" not in ma["environment"]  # no local model
    assert f"transformers {real}" in (a / "README.md").read_text()  # the dataset card names it too

    # kd diff names the change; a record answered differently to the same request is put down to it
    record = json.loads((b / "records.jsonl").read_text().splitlines()[0])
    from kd.records import finalize

    edited = finalize({k: v for k, v in record.items() if k != "id"} |
                      {"completion": [{"role": "assistant", "content": "another answer"}]})
    lines = [json.dumps(edited, sort_keys=True) + "\n", *(x + "\n" for x in (b / "records.jsonl").read_text().splitlines()[1:])]
    (b / "records.jsonl").write_text("".join(lines))
    report = diff(*sides(project, str(a), str(b), None), project)
    change = f"transformers {real} -> 99.0.0"
    assert report["environment"] == [change]
    [cause] = report["causes"]
    assert cause["kind"] == "environment" and cause["records"] == 1 and change in cause["description"]
    assert f"environment: {change}" in render(report, _Plain())


class _Plain:
    def __getattr__(self, name):
        return lambda text, *a: text


def test_changes_name_library_dtype_and_cpu_kind():
    old = {"libraries": {"transformers": "5.24.0", "torch": "2.13.0"}, "cpu": "x86_64 AVX2", "dtype": "float32",
           "device": "cpu"}
    new = {"libraries": {"transformers": "5.25.0", "torch": "2.13.0"}, "cpu": "x86_64 AMX", "dtype": "bfloat16",
           "device": "cpu"}
    assert environment.changes(old, new) == ["transformers 5.24.0 -> 5.25.0", "dtype float32 -> bfloat16",
                                             "CPU x86_64 AVX2 -> x86_64 AMX"]
    assert environment.changes(old, new, machine_only=True) == ["transformers 5.24.0 -> 5.25.0",
                                                                "CPU x86_64 AVX2 -> x86_64 AMX"]
    assert environment.changes(None, new) == []  # an output of an older kd recorded none: nothing to name


# The decision in docs/provenance.md: library versions are not part of a local teacher's request-cache identity.
def test_a_local_teachers_request_key_ignores_library_versions(tmp_path, monkeypatch):
    from kd.cache.store import RequestCache
    from kd.config import LocalTeacher as LocalConfig
    from kd.config.datasets import Sampling
    from kd.prompts import load_prompt
    from kd.runtime.ask import Asker
    from kd.runtime.local import LocalTeacher

    model = tmp_path / "teacher"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"weights")
    cfg = LocalConfig.model_validate({"backend": "local", "path": "teacher", "device": "cpu", "dtype": "float32"})
    prompt = load_prompt(REPO, "prompts/labeling/answer.jinja", ("instruction", "category"))

    def key_and_environment() -> tuple[str, dict]:
        teacher = LocalTeacher("t", cfg, tmp_path)
        call = Asker(teacher, RequestCache(tmp_path / "cache"), "t").call(prompt, Sampling(), 0, instruction="2+2?",
                                                                         category="math")
        return call.key, environment.collect(*environment.resolved([teacher]))

    key, env = key_and_environment()
    other_transformers(monkeypatch)
    key2, env2 = key_and_environment()
    assert key2 == key
    assert env["dtype"] == "float32" and env["device"] == "cpu"
    assert environment.changes(env, env2) == [f"transformers {env['libraries']['transformers']} -> 99.0.0"]


def test_status_warns_in_one_line_when_the_recorded_environment_differs(tmp_path, monkeypatch):
    from kd.pipeline.status import drift_line, environment_drift, render

    here = environment.collect()
    for d in ("data/qa", "models/student", "data/old"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "data/qa/manifest.json").write_text(json.dumps({"environment": here}))
    (tmp_path / "models/student/kd_model.json").write_text(json.dumps({"environment": {**here, "device": "cpu"}}))
    (tmp_path / "data/old/manifest.json").write_text(json.dumps({"name": "old"}))  # made before kd recorded it
    assert environment_drift(tmp_path) is None
    other_transformers(monkeypatch, "5.0.0")
    drift = environment_drift(tmp_path)
    assert drift == {"changes": [f"transformers {here['libraries']['transformers']} -> 5.0.0"],
                     "outputs": ["qa", "student"]}
    text = render({"stages": [], "total": {}, "environment": drift}, _Plain())
    assert text.splitlines() == [drift_line(drift), "kd status: every stage is up to date; `dvc repro` would run nothing"]
    assert "qa, student" in text and "-> 5.0.0" in text


def test_model_card_and_run_tags_name_the_environment():
    from kd.runtime.models import ModelInfo, model_card
    from kd.tracking import environment_tags

    env = environment.collect("cpu", "bfloat16")
    info = ModelInfo(name="s", objective="sft", init={}, datasets=[], environment=env)
    card = model_card(info)
    assert "device cpu, dtype bfloat16" in card and f"transformers {env['libraries']['transformers']}" in card
    assert json.loads(info.model_dump_json())["environment"] == env  # kd_model.json carries it
    tags = environment_tags(env)
    assert tags["kd.env.dtype"] == "bfloat16" and tags["kd.env.cpu"] == env["cpu"]
    assert tags["kd.env.transformers"] == env["libraries"]["transformers"]


def test_the_evaluation_report_names_the_machine_and_libraries_it_ran_with(tmp_path: Path) -> None:
    # issue 21: the figures move with the CPU kind and dtype, and the report did not say which made them
    from test_gameable import gamed_run

    from kd.evaluation.report import report_md
    from kd.tracking import environment_tags

    run = gamed_run()
    run.environment = {"libraries": {"transformers": "5.25.0", "torch": "2.13.0"}, "cpu": "x86_64 AMX",
                       "cpu_model": "Intel Xeon", "device": "cpu", "dtype": "bfloat16"}
    head = report_md(run, tmp_path, []).split("## Results")[0]
    assert "- environment: device cpu, dtype bfloat16, CPU x86_64 AMX (Intel Xeon)" in head
    assert "transformers 5.25.0" in head
    assert environment_tags(run.environment)["kd.env.dtype"] == "bfloat16"
