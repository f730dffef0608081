"""One source for the stage graph: dvc.yaml is written from params.yaml, and `kd check` catches any drift."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import REPO
from kdproject import kd

from kd.config import load_params
from kd.pipeline.code import closure
from kd.pipeline.spec import dvc_yaml, stages


def test_committed_dvc_yaml_is_what_params_yaml_gives():
    # the shipped recipe: regenerating dvc.yaml changes nothing, byte for byte
    assert dvc_yaml(load_params(REPO), REPO) == (REPO / "dvc.yaml").read_text()


def test_code_deps_follow_what_each_stage_imports():
    student = closure(REPO, "stages/student.py")
    assert {"stages/student.py", "kd/distill/loop.py", "kd/distill/losses.py", "kd/runtime/init.py",
            "kd/__init__.py"} <= set(student)
    teacher = closure(REPO, "stages/teacher.py")
    assert "kd/runtime/embedded.py" in teacher
    # editing how kd generates or trains does not rebuild the embedded teacher
    assert not [f for f in teacher if f.startswith(("kd/elicit/", "kd/distill/", "kd/evaluation/"))]
    labeling = closure(REPO, "stages/labeling.py")
    assert "kd/elicit/labeling.py" in labeling and "kd/elicit/feedback.py" not in labeling
    assert not [f for f in labeling if f.startswith("kd/distill/")]


def test_a_stage_lists_templates_seeds_data_models_and_exact_keys():
    by_name = {s.name: s for s in stages(load_params(REPO), REPO)}
    sft = by_name["sft"]
    assert {"prompts/labeling/explain.jinja", "prompts/common/persona.jinja", "seeds/instructions.jsonl",
            "data/instructions", "models/teacher", "stages/labeling.py"} <= set(sft.deps)
    assert sft.params == ["teachers.smollm2", "datasets.sft"] and sft.outs == ["data/sft"]
    student = by_name["student_fkl"].as_dvc()
    assert {"data/sft", "data/sft_logits", "models/teacher"} <= set(student["deps"])
    assert student["params"] == ["students.student_fkl", "teachers.smollm2.path"]


def test_kd_check_names_the_stage_and_the_difference(project: Path):
    assert kd(project, "check")[0] == 0
    spec = yaml.safe_load((project / "dvc.yaml").read_text())
    spec["stages"]["sft"]["deps"].remove("prompts/labeling/explain.jinja")
    spec["stages"]["sft"]["params"].append("datasets.topics_qa")
    (project / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    code, out = kd(project, "check")
    assert code == 2
    assert "dvc.yaml: stage sft: deps lacks prompts/labeling/explain.jinja" in out
    assert "dvc.yaml: stage sft: params has extra datasets.topics_qa" in out
    assert "kd pipeline --write" in out


def test_adding_a_student_is_one_command(project: Path):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["students"]["student_tvd"] = {**params["students"]["student_fkl"],
                                         "kd": {"divergence": "tvd", "temperature": 1.0, "ce_weight": 0.0}}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    code, out = kd(project, "check")
    assert code == 2 and "dvc.yaml: stage student_tvd: missing (params.yaml declares it)" in out
    assert kd(project, "pipeline", "--write")[0] == 0
    assert kd(project, "check")[0] == 0
    written = yaml.safe_load((project / "dvc.yaml").read_text())
    assert written["stages"]["student_tvd"]["cmd"] == "python stages/student.py student_tvd"
    assert "plots/student_tvd.csv" in written["plots"][0]["training loss"]["y"]
    before = (project / "dvc.yaml").read_bytes()
    assert kd(project, "pipeline", "--write") == (0, "kd pipeline: dvc.yaml is up to date\n")
    assert (project / "dvc.yaml").read_bytes() == before


@pytest.mark.parametrize("edit", ["rename", "delete"])
def test_a_missing_or_broken_template_fails_check_with_its_key(project: Path, edit: str):
    path = project / "prompts/labeling/explain.jinja"
    if edit == "rename":
        path.rename(path.with_suffix(".old"))
    else:
        path.write_text("{# vars: instruction #}{% block user %}{{ instruction }{% endblock %}")
    code, out = kd(project, "check")
    assert code == 2 and "prompts/labeling/explain.jinja" in out and "Traceback" not in out


def test_check_warns_about_combinations_that_cannot_show_distillation(project: Path):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["students"]["student_fkl"]["kd"]["divergence"] = "jsd"  # from the untrained slice
    params["evaluation"].pop("template")
    params["evaluation"].pop("compare")
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    kd(project, "pipeline", "--write")
    code, out = kd(project, "check")
    assert code == 0  # warnings, not errors: the build may still run
    assert "kd: warning: students.student_fkl.init: jsd from an untrained from_teacher student" in out
    assert "kd: warning: evaluation.template: the students were trained with the system message of " \
           "prompts/labeling/explain.jinja" in out
    assert "kd: warning: evaluation.compare: several students but no comparison" in out
    assert "kd: warning" not in kd(REPO, "check")[1]  # the shipped recipe has nothing to warn about
