"""The evaluation stage on tiny random models: a copy of the teacher agrees with it perfectly, another model
does not, exact match normalises as documented, and the reports are complete and byte-stable."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, copy_project

from kd.config import load_params
from kd.errors import KdError
from kd.evaluate import METRICS, contains_match, evaluate, exact_match, normalise, summary, token_kl
from kd.report import write_reports

FP = {"sft": "ab" * 32, "sft_logits": "cd" * 32}
EVAL_IDS = ("eval-001", "eval-004", "eval-013", "eval-023")  # 3 short references, 1 long (code)


def _student_dir(src: Path, out: Path, name: str) -> None:
    shutil.copytree(src, out)
    info = {"name": name, "objective": "kd", "init": "from_teacher", "params": {},
            "datasets": [{"name": "sft", "fingerprint": FP["sft"]}],
            "logits": {"name": "sft_logits", "fingerprint": FP["sft_logits"]},
            "git_commit": "0123456789abcdef0123", "mlflow": {"run_id": f"run-{name}", "tracking_uri": "sqlite:///x.db"},
            "metrics": {}}
    (out / "kd_model.json").write_text(json.dumps(info, indent=2))


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """Teacher = the tiny model; `student_same` = a copy of it; `student_other` = another random init;
    the baseline is a 1-layer `from_config` init of `student_same`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    root = copy_project(tmp_path_factory.mktemp("eval") / "project")
    rows = [r for r in map(json.loads, (REPO / "seeds/eval_prompts.jsonl").read_text().splitlines()) if r["id"] in EVAL_IDS]
    (root / "seeds/eval_prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    shutil.copytree(tiny_model_dir, root / "models/teacher")
    _student_dir(tiny_model_dir, root / "models/student_same", "student_same")
    torch.manual_seed(1)
    other = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_model_dir))
    _student_dir(tiny_model_dir, root / "models/student_other", "student_other")
    other.save_pretrained(root / "models/student_other")

    params = yaml.safe_load((root / "params.yaml").read_text())
    params["teachers"]["smollm2"].update(dtype="float32", device="cpu")
    tiny_init = {"kind": "from_config", "teacher": "smollm2", "hidden_size": 16, "num_layers": 1, "num_heads": 2,
                 "num_kv_heads": 1, "intermediate_size": 32}
    params["students"] = {name: {"init": tiny_init, "objective": "kd", "datasets": ["sft"], "logits": "sft_logits"}
                          for name in ("student_same", "student_other")}
    params["evaluation"] = {"prompts": "seeds/eval_prompts.jsonl", "teacher": "smollm2",
                            "students": ["student_same", "student_other"], "max_new_tokens": 6, "batch_size": 3}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


@pytest.fixture(scope="module")
def result(project: Path):
    run = evaluate(load_params(project), project, log=lambda _: None)
    write_reports(run, project / "reports", project)
    return run


def metrics(project: Path) -> dict:
    return json.loads((project / "reports/metrics.json").read_text())


def test_copy_of_teacher_agrees_exactly(project, result):
    m = metrics(project)
    assert m["student_same"]["kl"] == 0.0
    assert m["student_same"]["rouge_l"] == 1.0
    assert m["student_same"]["teacher_logprob"] == m["teacher"]["teacher_logprob"]
    assert m["student_same"]["length"] == m["teacher"]["length"]


def test_different_models_have_positive_kl(project, result):
    m = metrics(project)
    assert m["student_other"]["kl"] > 0 and m["baseline"]["kl"] > 0
    assert summary(result).startswith("evaluate: 4 models x 4 prompts in ")
    assert summary(result).endswith("best teacher-agreement: student_same (KL 0.00)")


def test_kl_matches_a_direct_float64_computation(tiny_model_dir, project):
    import torch
    from transformers import AutoModelForCausalLM

    t = AutoModelForCausalLM.from_pretrained(project / "models/teacher").eval()
    s = AutoModelForCausalLM.from_pretrained(project / "models/student_other").eval()
    seqs = [([1, 2, 3, 4], [5, 6, 7]), ([8, 9], [10, 11, 12, 13])]
    with torch.no_grad():
        want, n = 0.0, 0
        for p, c in seqs:
            ids = torch.tensor([p + c])
            lt, ls = (torch.log_softmax(m(ids).logits[0, len(p) - 1:-1].double(), -1) for m in (t, s))
            want += (lt.exp() * (lt - ls)).sum().item()
            n += len(c)
    assert token_kl(t, s, seqs, batch_size=2, device="cpu") == pytest.approx(want / n, rel=1e-4)


@pytest.mark.parametrize(("answer", "reference", "exact", "contains"), [
    ("56", "56", True, True),
    (" **56.** ", "56", True, True),
    ("`12`", "12", True, True),
    ("AU", "Au", True, True),
    ("1,969", "1969", True, True),  # punctuation is deleted, not turned into a space
    ("Merci beaucoup !", "Merci beaucoup.", True, True),
    ("The answer is 56.", "56", False, True),
    ("The symbol for gold is Au.", "Au", False, True),
    ("560", "56", False, False),  # whole words only
    ("Gaul", "Au", False, False),
    ("", "56", False, False),
    ("", "", False, False),  # an empty reference matches nothing
])
def test_exact_match_normalisation(answer, reference, exact, contains):
    assert exact_match(answer, reference) is exact
    assert contains_match(answer, reference) is contains


def test_normalise():
    assert normalise("  Hello,\n  World!  ") == "hello world"


def test_metrics_json_shape(project, result):
    m = metrics(project)
    assert list(m) == ["teacher", "baseline", "student_same", "student_other"]
    for row in m.values():
        assert set(row) == set(METRICS) and all(isinstance(v, float) for v in row.values())
    assert m["teacher"]["kl"] == 0.0 and m["teacher"]["rouge_l"] == 1.0
    plots = sorted(p.name for p in (project / "reports/plots").iterdir())
    assert plots == sorted(f"{k}.csv" for k in METRICS)
    assert (project / "reports/plots/kl.csv").read_text().splitlines()[0] == "model,kl"


def test_report_names_every_model_and_fingerprint(project, result):
    text = (project / "reports/report.md").read_text()
    for name in ("teacher", "baseline", "student_same", "student_other", FP["sft"], FP["sft_logits"], "run-student_same"):
        assert name in text
    assert "`student_same` beats the baseline on teacher-agreement (KL " in text
    assert "## Exact match by category" in text and "| math | 1 |" in text
    assert text.count("### eval-") == 4  # ~5 examples, capped by the 4 prompts


def test_stage_is_deterministic_and_logs_one_mlflow_run(project, result):
    # Reports must not carry times or run-dependent order: the same models give the same bytes.
    import mlflow

    before = {p.relative_to(project / "reports"): p.read_bytes()
              for p in sorted((project / "reports").rglob("*")) if p.is_file()}
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the project's sqlite store
    proc = subprocess.run([sys.executable, "stages/evaluate.py", "--out", "reports2"], cwd=project, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1].startswith("evaluate: 4 models x 4 prompts in ")
    after = {p.relative_to(project / "reports2"): p.read_bytes()
             for p in sorted((project / "reports2").rglob("*")) if p.is_file()}
    assert after == before
    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.data.metrics["student_same.kl"] == 0.0 and "baseline.generate_s" in run.data.metrics
    assert run.data.tags["dvc_stage"] == "evaluate" and run.data.params["evaluation.max_new_tokens"] == "6"
    assert run.data.params["models.student_other.mlflow_run_id"] == "run-student_other"


def test_student_named_like_a_report_row_is_rejected(project):
    params = load_params(project)
    params = params.model_copy(update={"evaluation": params.evaluation.model_copy(update={"students": ["teacher"]})})
    with pytest.raises(KdError, match="built-in row"):
        evaluate(params, project)
