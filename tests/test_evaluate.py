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
from kd.evaluation.evaluate import contains_match, evaluate, exact_match, normalise, summary, token_kl
from kd.evaluation.report import write_reports
from kd.evaluation.results import METRICS

FP = {"sft": "ab" * 32, "sft_logits": "cd" * 32}
EVAL_IDS = ("eval-001", "eval-004", "eval-013", "eval-023")  # 3 short references, 1 long (code)


def _student_dir(src: Path, out: Path, name: str) -> None:
    shutil.copytree(src, out)
    info = {"name": name, "objective": "kd", "init": {"kind": "from_teacher"}, "params": {},
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


# --- feedback figures: reward model and pairwise judge (kd/eval_feedback.py) -------------------------------

RM_METRICS = {"accuracy": 0.75, "pairs_held_out": 12, "accuracy_train": 0.9375}
NEW_KEYS = {"reward", "win_rate", "wins", "ties", "losses", "unparseable", "inconsistent"}


def _reward_dir(tiny_model_dir: Path, out: Path) -> None:
    """A reward model as its stage writes one: a one-label classifier on the tiny model, tokenizer, card."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(2)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    info = {"name": out.name, "kind": "reward_model", "section": "reward_models", "objective": "bradley_terry",
            "init": {"kind": "from_pretrained", "path": str(tiny_model_dir)}, "datasets": [], "metrics": RM_METRICS}
    (out / "kd_model.json").write_text(json.dumps(info, indent=2))


@pytest.fixture(scope="module")
def fb_params(project: Path, tiny_model_dir: Path) -> str:
    """params_fb.yaml: the same evaluation plus a reward model and the tiny teacher as a pairwise judge."""
    _reward_dir(tiny_model_dir, project / "models/rm")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["reward_models"] = {"rm": {"init": params["students"]["student_same"]["init"], "datasets": ["prefs"]}}
    params["evaluation"] |= {"reward_model": "rm", "judge": {
        "teacher": "smollm2", "kind": "pairwise", "template": "prompts/feedback/pairwise.jinja",
        "sampling": {"temperature": 0.0, "max_tokens": 4}}}
    (project / "params_fb.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return "params_fb.yaml"


@pytest.fixture(scope="module")
def fb_result(project: Path, fb_params: str, result):
    logs: list[str] = []
    run = evaluate(load_params(project, fb_params), project, log=logs.append)
    write_reports(run, project / "reports_fb", project)
    return run, logs


def test_feedback_adds_its_keys_and_changes_nothing_else(project, result, fb_result):
    base = metrics(project)
    m = json.loads((project / "reports_fb/metrics.json").read_text())
    assert list(m) == [*base, "reward_model"]
    assert m["reward_model"] == RM_METRICS
    for name, row in base.items():
        assert {k: v for k, v in m[name].items() if k not in NEW_KEYS} == row  # generation is unchanged
        assert isinstance(m[name]["reward"], float)
    for name in ("student_same", "student_other"):  # 4 prompts, each judged, identical or unparseable
        w = m[name]
        assert w["wins"] + w["ties"] + w["losses"] + w["unparseable"] == 4
        assert w.get("win_rate") == (round((w["wins"] + 0.5 * w["ties"]) / (4 - w["unparseable"]), 4)
                                     if w["unparseable"] < 4 else None)
    for name in ("teacher", "baseline"):  # only students have a win rate
        assert set(m[name]) - set(METRICS) == {"reward"}
    # evaluation without reward_model/judge: no new keys at all (the existing test pins the exact shape)
    assert not any(NEW_KEYS & set(row) for row in base.values()) and "reward_model" not in base
    plots = {p.name for p in (project / "reports_fb/plots").iterdir()}
    assert "reward.csv" in plots and ("win_rate.csv" in plots) == any("win_rate" in m[s] for s in base)


def test_mean_reward_is_the_reward_scorers_mean(project, fb_result):
    from kd.runtime.scoring import RewardScorer

    run, _ = fb_result
    m = json.loads((project / "reports_fb/metrics.json").read_text())
    items = [(f"{r.name}/{i}", {"messages": p.messages, "completion": o.text, "max_length": 2048})
             for r in run.results for i, (p, o) in enumerate(zip(run.prompts, r.outputs, strict=True))]
    scores: dict[str, float] = {}
    RewardScorer(project / "models/rm", batch_size=3).generate(
        items, lambda key, response: scores.__setitem__(key, response["score"]))
    for r in run.results:
        mine = [v for k, v in scores.items() if k.startswith(f"{r.name}/")]
        assert m[r.name]["reward"] == round(sum(mine) / len(run.prompts), 4)
    assert m["teacher"]["reward"] == m["student_same"]["reward"]  # same answers, same reward


def test_feedback_section_in_report_and_mlflow_keys(project, fb_result):
    from kd.evaluation.report import metrics_for_mlflow

    run, logs = fb_result
    text = (project / "reports_fb/report.md").read_text()
    assert "## Reward model" in text and "held-out pair accuracy **0.750** over 12 pairs (chance = 0.5" in text
    assert "## Win rate against the untrained baseline" in text and "prompts/feedback/pairwise.jinja" in text
    assert "| `student_other` |" in text.split("## Win rate")[1]
    assert "## Reward model" not in (project / "reports/report.md").read_text()
    flat = metrics_for_mlflow(run)
    assert flat["reward_model.accuracy"] == 0.75 and "student_other.wins" in flat and "teacher.reward" in flat
    assert flat["judge.requests_new"] == run.feedback.requests["judge"][1]
    assert any(line.startswith("evaluate: judge: ") for line in logs)


def test_rerun_asks_the_judge_and_reward_model_nothing_new(project, fb_params, fb_result):
    from dataclasses import replace

    from kd.evaluation.feedback import add_feedback, reward_model_info

    run, _ = fb_result
    # the same answers, as a second `evaluate` generates them (greedy), before any feedback figure
    again = replace(run, feedback=None, results=[replace(r, metrics={k: r.metrics[k] for k in METRICS})
                                                 for r in run.results])
    params = load_params(project, fb_params)
    add_feedback(again, params, project, reward_model_info(params, project, "rm"), log=lambda _: None)
    cached, new = again.feedback.requests["judge"]
    assert new == 0 and cached == sum(run.feedback.requests["judge"])
    assert again.feedback.requests["reward"][1] == 0
    write_reports(again, project / "reports_fb2", project)
    for name in ("metrics.json", "report.md"):
        assert (project / "reports_fb2" / name).read_bytes() == (project / "reports_fb" / name).read_bytes()


def _scripted_verdict(messages: list[dict]) -> str:
    """A judge that reads the two responses: `win` beats `lose`, two `even` tie, `biased` always picks the
    first position, `garbage` gets no verdict."""
    import re

    a, b = re.search(r"Response A:\n(.*?)\n\nResponse B:\n(.*?)\n\n", messages[-1]["content"], re.S).groups()
    if "garbage" in a + b:
        return "Both have merit."
    if "biased" in a:
        return "A"
    if "even" in a:
        return "tie"
    return "A" if "win" in a else "B"


def test_win_rate_counts_with_a_scripted_judge(tmp_path, project):
    from fake_openai import FakeOpenAI

    from kd.config import Judge, OpenAITeacher
    from kd.evaluation.evaluate import EvalPrompt, ModelResult, Output, Run
    from kd.evaluation.feedback import add_feedback

    pairs = [("win 1", "lose 1"), ("win 2", "lose 2"), ("lose 3", "win 3"), ("even 4", "even four"),
             ("biased 5", "biased five"), ("garbage 6", "fine 6"), ("same", "same")]

    def row(name: str, kind: str, texts: list[str]) -> ModelResult:
        return ModelResult(name, kind, {}, [Output([1], True, t) for t in texts], {})

    def make_run() -> Run:
        prompts = [EvalPrompt(f"p{i}", "c", f"Question {i}?", "") for i in range(len(pairs))]
        mine, theirs = [p[0] for p in pairs], [p[1] for p in pairs]
        return Run(prompts, "seeds/eval_prompts.jsonl", "0" * 64, 8, "smollm2",
                   [row("teacher", "teacher", theirs), row("baseline", "baseline", theirs),
                    row("s", "student", mine), row("copycat", "student", theirs)])

    root = copy_project(tmp_path / "p")
    base = load_params(project)
    with FakeOpenAI(answer=_scripted_verdict) as server:
        judge_teacher = OpenAITeacher(backend="openai", base_url=server.url, model="fake-judge", api_key_env=None,
                                      timeout_s=5, max_attempts=1)
        params = base.model_copy(update={
            "teachers": {**base.teachers, "judge": judge_teacher},
            "evaluation": base.evaluation.model_copy(update={"judge": Judge(
                teacher="judge", kind="pairwise", template="prompts/feedback/pairwise.jinja")})})
        run = make_run()
        add_feedback(run, params, root, None, log=lambda _: None)
        assert server.received == 12  # 6 differing pairs x 2 orders; identical answers are never asked
        again = make_run()
        add_feedback(again, params, root, None, log=lambda _: None)
        assert server.received == 12 and again.feedback.requests["judge"] == (12, 0)
    w = run.feedback.win_rates["s"]
    assert (w.wins, w.ties, w.losses, w.unparseable, w.inconsistent, w.identical) == (2, 3, 1, 1, 1, 1)
    assert run.results[2].metrics == {"win_rate": round(3.5 / 6, 4), "wins": 2, "ties": 3, "losses": 1,
                                      "unparseable": 1, "inconsistent": 1}
    assert run.results[3].metrics["win_rate"] == 0.5 and run.results[3].metrics["ties"] == 7  # all identical
    assert run.results[1].metrics == {} and run.feedback.against == "baseline"
    assert again.results[2].metrics == run.results[2].metrics


def test_feedback_config_mistakes_fail_before_generating(project, fb_params):
    from kd.evaluation.feedback import check

    params = load_params(project, fb_params)
    ev = params.evaluation
    assert check(params, project, {"teacher", "baseline", *ev.students}).accuracy == 0.75
    with pytest.raises(KdError, match="rename the student"):
        check(params, project, {"teacher", "baseline", "reward_model"})
    away = params.model_copy(update={"evaluation": ev.model_copy(update={"against": "student_x"})})
    with pytest.raises(KdError, match="evaluation.against: 'student_x' is not in evaluation.students"):
        check(away, project, set())
    missing = params.model_copy(update={"evaluation": ev.model_copy(update={"reward_model": "nope"})})
    with pytest.raises(KdError, match="models/nope is not built"):
        check(missing, project, set())
