"""The real pipeline on the embedded teacher, at minimal sizes, through `dvc repro`: the survey profile, which is
the default recipe (instructions, sft, logits, SFT and KD students, evaluation) plus every other stage kind."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import copy_project

pytestmark = pytest.mark.slow
EVAL_PROMPTS = 4
STAGES = ("teacher", "instructions", "topics_qa", "sft", "sft_logits", "student_sft", "student_fkl", "student_jsd",
          "prefs", "self_r1", "reward", "student_dpo", "student_r1", "evaluate")


def sh(project: Path, *cmd: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}  # the project's own sqlite store
    env["PATH"] = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    r = subprocess.run(cmd, cwd=project, capture_output=True, text=True, env=env)
    assert r.returncode == 0, f"{cmd} failed:\n{r.stdout}\n{r.stderr}"
    return r


def shrink(project: Path) -> None:
    shutil.copy(project / "profiles/survey.yaml", project / "params.yaml")
    p = yaml.safe_load((project / "params.yaml").read_text())
    ds = p["datasets"]
    ds["instructions"].update(target=3, per_round=3, max_rounds=2)
    ds["instructions"]["evol"]["count"] = 2
    ds["topics_qa"].update(count=2, allow_truncated=True)
    ds["topics_qa"]["answer_sampling"]["max_tokens"] = 24
    ds["sft"].update(allow_truncated=True, inputs=[{"seeds": "seeds/instructions.jsonl", "limit": 10},
                                                   {"dataset": "instructions"}])
    ds["sft"]["sampling"]["max_tokens"] = 16
    ds["sft_logits"].update(max_length=96)
    ds["prefs"].update(inputs=[{"seeds": "seeds/instructions.jsonl", "limit": 6}], candidates=3, allow_truncated=True)
    ds["prefs"]["sampling"]["max_tokens"] = 8
    ds["self_r1"].update(inputs=[{"seeds": "seeds/instructions.jsonl", "limit": 3}], samples=2, threshold=-100.0,
                         allow_truncated=True)
    ds["self_r1"]["sampling"]["max_tokens"] = 8
    for model in [*p["students"].values(), *p["reward_models"].values()]:
        model["training"].update(max_steps=2, batch_size=2, max_length=96)
    p["evaluation"].update(max_new_tokens=8)
    prompts = project / p["evaluation"]["prompts"]  # a few held-out prompts, one per category where possible
    rows = [json.loads(line) for line in prompts.read_text().splitlines()]
    picked = list({r["category"]: r for r in rows}.values())[:EVAL_PROMPTS]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in picked))
    (project / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))


def summary(stdout: str, name: str) -> tuple[int, int]:
    m = re.search(rf"^{name}: \d+ records \((\d+) cached, (\d+) new", stdout, re.M)
    assert m, stdout
    return int(m.group(1)), int(m.group(2))


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    project = copy_project(tmp_path_factory.mktemp("e2e") / "project")
    shutil.copytree(Path(__file__).resolve().parents[1] / "profiles", project / "profiles")
    shrink(project)
    sh(project, "git", "init", "-q")
    sh(project, "dvc", "init", "-q")
    sh(project, sys.executable, "-m", "kd.cli", "pipeline", "--write")  # shrink() changed what stages read
    sh(project, sys.executable, "-m", "kd.cli", "check")
    r = sh(project, "dvc", "repro")
    for name in STAGES:
        assert f"Running stage '{name}'" in r.stdout
    return project


def test_pipeline_builds_trl_ready_datasets_with_provenance(built):
    import datasets

    for name in ("instructions", "topics_qa", "sft"):
        manifest = json.loads((built / f"data/{name}/manifest.json").read_text())
        ds = datasets.load_dataset("json", data_files=str(built / f"data/{name}/records.jsonl"), split="train")
        assert len(ds) == manifest["records"] > 0
        metrics = json.loads((built / f"metrics/{name}.json").read_text())
        assert metrics["records"] == manifest["records"]
    record = json.loads((built / "data/sft/records.jsonl").read_text().splitlines()[0])
    assert record["completion"][0]["role"] == "assistant"
    request = record["provenance"]["requests"][0]
    assert request["template"]["path"] == "prompts/labeling/explain.jinja"
    assert request["teacher"]["backend"] == "local" and len(request["teacher"]["digest"]) == 64
    assert record["provenance"]["seeds"] or record["provenance"]["parents"]


def test_pipeline_trains_students_and_reports(built):
    params = yaml.safe_load((built / "params.yaml").read_text())
    report = (built / "reports/report.md").read_text()
    metrics = json.loads((built / "reports/metrics.json").read_text())
    for name, cfg in [*params["students"].items(), *params["reward_models"].items()]:
        info = json.loads((built / f"models/{name}/kd_model.json").read_text())
        for dataset in cfg["datasets"]:
            manifest = json.loads((built / f"data/{dataset}/manifest.json").read_text())
            assert {"name": dataset, "fingerprint": manifest["fingerprint"]} in info["datasets"]
        assert (built / f"models/{name}/model.safetensors").exists()
    for name in params["students"]:
        assert name in report and name in metrics
        assert isinstance(metrics[name]["reward"], float)  # scored by the distilled reward model
    assert "teacher" in metrics and "baseline" in metrics
    reward = json.loads((built / "metrics/reward.json").read_text())
    assert metrics["reward_model"]["accuracy"] == pytest.approx(reward["accuracy"], abs=1e-4)
    assert reward["pairs_held_out"] > 0
    assert "## Reward model" in report and "## Win rate" in report
    # every judge and the reward model went through the sanity set; the shipped likelihood judge, on the real
    # teacher's answers, ranks them above empty and looping ones (the cheap tricks it may fail: the report says so)
    sanity = metrics["sanity"]
    assert {"likelihood judge `smollm2`", "pairwise judge `smollm2`", "reward model `reward`"} <= set(sanity)
    assert sum(sanity["likelihood judge `smollm2`"][n] for n in ("empty", "word_loop", "sentence_loop")) / 3 >= 0.9
    assert "## Judges and reward models: the sanity set" in report
    assert {"context_free", "terminates_cleanly"} <= set(metrics) | set(metrics["student_sft"])
    judged = metrics["student_dpo"]
    assert judged["wins"] + judged["ties"] + judged["losses"] + judged["unparseable"] == EVAL_PROMPTS  # each once


def test_pipeline_builds_preferences_and_a_self_knowledge_round(built):
    pair = json.loads((built / "data/prefs/records.jsonl").read_text().splitlines()[0])
    assert pair["chosen"] != pair["rejected"] and pair["score_chosen"] > pair["score_rejected"]
    judge = pair["provenance"]["judge"]
    assert judge["kind"] == "likelihood" and judge["teacher"]["backend"] == "local"
    generators = {r["teacher"]["model"] for r in pair["provenance"]["requests"] if r.get("template")}
    assert generators == {"student_sft"}  # the candidates come from the SFT student
    kept = [json.loads(line) for line in (built / "data/self_r1/records.jsonl").read_text().splitlines()]
    assert kept and {r["provenance"]["round"] for r in kept} == {1}
    assert json.loads((built / "models/student_r1/kd_model.json").read_text())["objective"] == "sft"


def test_second_repro_runs_nothing(built):
    r = sh(built, "dvc", "repro")
    assert "Running stage" not in r.stdout


def test_template_edit_reruns_only_its_stage_and_only_changed_requests(built):
    template = built / "prompts/labeling/explain.jinja"
    template.write_text(template.read_text().replace("Show each calculation.", "Show every calculation step."))
    r = sh(built, "dvc", "repro", "sft")  # the students downstream are covered by their own tests
    assert "Running stage 'sft'" in r.stdout
    assert "Running stage 'instructions'" not in r.stdout and "Running stage 'topics_qa'" not in r.stdout
    cached, new = summary(r.stdout, "sft")
    inputs = (built / "seeds/instructions.jsonl").read_text().splitlines()[:10]
    inputs += (built / "data/instructions/records.jsonl").read_text().splitlines()  # evolved keep a category
    math_inputs = sum(1 for line in inputs if json.loads(line)["category"] == "math")
    assert new == math_inputs > 0  # only math inputs render differently
    assert cached > 0


def test_forced_rebuild_from_cache_is_byte_identical(built):
    lock = (built / "dvc.lock").read_text()
    before = {p: p.read_bytes() for p in (built / "data").rglob("*") if p.is_file()}
    shutil.rmtree(built / "data/sft")
    r = sh(built, "dvc", "repro", "--force", "--single-item", "instructions", "topics_qa", "sft")
    for name in ("instructions", "topics_qa", "sft"):
        assert summary(r.stdout, name)[1] == 0  # nothing new asked of the teacher
    after = {p: p.read_bytes() for p in (built / "data").rglob("*") if p.is_file()}
    assert after == before
    assert (built / "dvc.lock").read_text() == lock
