"""params.yaml validation: every shipped file validates, every mistake names its key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from kd.config import load_params
from kd.errors import KdError


def edit(project: Path, fn) -> None:
    data = yaml.safe_load((project / "params.yaml").read_text())
    fn(data)
    (project / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


def error_of(project: Path) -> str:
    with pytest.raises(KdError) as e:
        load_params(project)
    return str(e.value)


def test_shipped_params_validate():
    params = load_params(REPO)
    assert set(params.datasets) == {"instructions", "sft", "sft_logits"}
    assert set(params.students) == set(params.evaluation.students) == {"student_sft", "student_fkl"}
    # the default comparison: same init, data, steps, seed and loop; only the loss differs
    sft, fkl = params.students["student_sft"], params.students["student_fkl"]
    assert sft.init == fkl.init and sft.training == fkl.training and sft.datasets == fkl.datasets
    assert sft.loop == "kd" and fkl.objective == "kd"
    assert params.evaluation.compare[0].a == ["student_sft"] and params.evaluation.compare[0].b == ["student_fkl"]
    assert params.evaluation.template == params.datasets["sft"].template  # asked as the students were trained
    assert params.teachers["smollm2"].trust_remote_code is False


@pytest.mark.parametrize("profile", sorted(p.name for p in (REPO / "profiles").glob("*.yaml")))
def test_every_profile_validates_and_writes_its_pipeline(tmp_path, profile):
    # every shipped params file must validate (STYLE.md §11), and its stage graph must build
    import shutil

    from kd.pipeline.spec import dvc_yaml

    for d in ("prompts", "seeds", "stages"):
        shutil.copytree(REPO / d, tmp_path / d)
    shutil.copy(REPO / "profiles" / profile, tmp_path / "params.yaml")
    params = load_params(tmp_path)
    assert params.evaluation is not None and "stages:" in dvc_yaml(params, tmp_path)


def test_unknown_key_names_path_and_allowed_keys(project):
    edit(project, lambda d: d["datasets"]["sft"].update(temprature=0.3))
    msg = error_of(project)
    assert "datasets.sft.temprature: unknown key" in msg
    assert "allowed:" in msg and "sampling" in msg


def test_wrong_type_names_path(project):
    edit(project, lambda d: d["datasets"]["instructions"].update(target="many"))
    assert "datasets.instructions.target:" in error_of(project)


def test_unknown_teacher_lists_declared(project):
    edit(project, lambda d: d["datasets"]["sft"].update(teacher="gpt5"))
    msg = error_of(project)
    assert "datasets.sft.teacher: unknown teacher 'gpt5'" in msg and "smollm2" in msg


def test_missing_template_names_key_and_file(project):
    edit(project, lambda d: d["datasets"]["sft"].update(template="prompts/nope.jinja"))
    msg = error_of(project)
    assert "datasets.sft.template" in msg and "prompts/nope.jinja" in msg


def test_unknown_method_lists_choices(project):
    edit(project, lambda d: d["datasets"]["sft"].update(method="distill"))
    msg = error_of(project)
    assert "datasets.sft" in msg and "labeling" in msg and "expansion" in msg


def test_unknown_upstream_dataset_and_cycles(project):
    edit(project, lambda d: d["datasets"]["sft"]["inputs"].append({"dataset": "missing"}))
    assert "datasets.sft.inputs.2.dataset: unknown dataset 'missing'" in error_of(project)
    edit(project, lambda d: d["datasets"]["sft"].update(inputs=[{"dataset": "sft"}]))
    assert "cycle sft -> sft" in error_of(project)


def test_contradictory_options_name_both(project):
    # (trust_remote_code is checked against the directory's code when it loads: tests/test_secrets.py)
    edit(project, lambda d: d["datasets"]["instructions"].update(generated_demos=9))
    assert "generated_demos (9) cannot exceed demos (3)" in error_of(project)


@pytest.mark.parametrize("teacher", [
    {"backend": "openai", "base_url": "http://x/v1", "model": "m", "api_key": "sk-abcdefghijklmnopqrstuvwxyz"},
    {"backend": "openai", "base_url": "http://x/v1", "model": "m", "api_key_env": "sk-abcdefghijklmnopqrstuvwx"},
])
def test_secrets_in_params_are_refused(project, teacher):
    edit(project, lambda d: d["teachers"].update(remote=teacher))
    msg = error_of(project)
    assert ("looks like a secret" in msg or "looks like an API key itself" in msg) and "teachers.remote" in msg
    assert "abcdefghijklmnop" not in msg  # the secret itself is never echoed


def test_bad_yaml_names_line(project):
    (project / "params.yaml").write_text("teachers:\n  a: [\n")
    assert error_of(project).startswith("params.yaml:")


def test_stage_exits_2_with_one_line_and_writes_nothing(project):
    # a user mistake must not print a traceback or leave outputs behind
    edit(project, lambda d: d["datasets"]["sft"].update(teacher="gpt5"))
    r = subprocess.run([sys.executable, "stages/labeling.py", "sft"], cwd=project, capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        "kd: error: params.yaml: datasets.sft.teacher: unknown teacher 'gpt5' (declared: smollm2)"]
    assert not (project / "data").exists() and not (project / "metrics").exists()


def test_unreadable_seed_line_names_file_and_line(project):
    with (project / "seeds/instructions.jsonl").open("a") as f:
        f.write('{"id": "broken", "instruction": \n')
    r = subprocess.run([sys.executable, "-m", "kd.cli", "check"], cwd=project, capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "seeds/instructions.jsonl:41: not valid JSON" in r.stderr


def test_check_reports_missing_dvc_dep(project):
    dvc = (project / "dvc.yaml").read_text()
    i = dvc.index("  sft:")
    (project / "dvc.yaml").write_text(dvc[:i] + dvc[i:].replace("      - prompts/common/persona.jinja\n", "", 1))
    r = subprocess.run([sys.executable, "-m", "kd.cli", "check"], cwd=project, capture_output=True, text=True)
    assert r.returncode == 2
    assert "dvc.yaml: stage sft: deps lacks prompts/common/persona.jinja" in r.stderr


def test_check_reports_missing_student_dep(project):
    dvc = (project / "dvc.yaml").read_text()
    i = dvc.index("  student_fkl:")
    (project / "dvc.yaml").write_text(dvc[:i] + dvc[i:].replace("      - data/sft_logits\n", "", 1))
    r = subprocess.run([sys.executable, "-m", "kd.cli", "check"], cwd=project, capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "dvc.yaml: stage student_fkl: deps lacks data/sft_logits" in r.stderr


def test_check_survives_an_empty_outs_list(project):
    # regression: `outs:` with no items parsed as None and crashed `kd check` with a TypeError
    dvc = (project / "dvc.yaml").read_text().replace("    outs:\n      - data/sft_logits\n", "    outs:\n", 1)
    (project / "dvc.yaml").write_text(dvc)
    r = subprocess.run([sys.executable, "-m", "kd.cli", "check"], cwd=project, capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "dvc.yaml: stage sft_logits: outs lacks data/sft_logits" in r.stderr


def test_params_reference_is_generated_from_the_models():
    # docs/params.md is generated (`kd docs --write`): a key added to a model without regenerating fails here
    from kd.config.docs import PARAMS_DOC, params_reference

    assert (REPO / PARAMS_DOC).read_text() == params_reference()
    assert "| `temperature` | float |" in params_reference()
