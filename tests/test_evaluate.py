"""The evaluation stage on tiny random models: a copy of the teacher agrees with it perfectly, another model
does not, exact match normalises as documented, and the reports are complete and byte-stable."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from conftest import REPO, copy_project

from kd.config import load_params
from kd.errors import KdError
from kd.evaluation.evaluate import TeacherView, contains_match, evaluate, exact_match, normalise, summary
from kd.evaluation.outputs import write_reports
from kd.evaluation.results import NOT_ROWS

FP = {"sft": "ab" * 32, "sft_logits": "cd" * 32}
NEWLINE = 198  # "\n" in the teacher's tokenizer
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
    # A random model greedily emits newlines forever; without the newline token the tiny teacher emits one word
    # on repeat, which is no loop yet within max_new_tokens < quality.RUN: sound answers for the sanity set.
    teacher = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        teacher.get_input_embeddings().weight[NEWLINE] = 0
    teacher.save_pretrained(root / "models/teacher")
    for f in tiny_model_dir.iterdir():  # the tokenizer and its chat template
        if not (root / "models/teacher" / f.name).exists():
            shutil.copy(f, root / "models/teacher")
    _student_dir(root / "models/teacher", root / "models/student_same", "student_same")
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
                            "students": ["student_same", "student_other"], "max_new_tokens": 5, "batch_size": 3}  # < quality.RUN: the tiny teacher loops, but not yet
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


@pytest.fixture(scope="module")
def result(project: Path):
    run = evaluate(load_params(project), project, log=lambda _: None)
    write_reports(run, project / "reports", project)
    return run


def metrics(project: Path, out: str = "reports") -> dict:
    return json.loads((project / out / "metrics.json").read_text())


def test_copy_of_teacher_agrees_exactly(project, result):
    m = metrics(project)
    assert m["student_same"]["kl"] == 0.0
    assert m["student_same"]["rouge_l"] == 1.0
    for k in ("judge", "length", "terminates_cleanly", "eos_rate", "distinct_2"):
        assert m["student_same"][k] == m["teacher"][k]


def test_different_models_have_positive_kl_and_the_context_free_row_generates_nothing(project, result):
    m = metrics(project)
    assert m["student_other"]["kl"] > 0 and m["baseline"]["kl"] > 0 and m["context_free"]["kl"] > 0
    assert set(m["context_free"]) == {"kl", "kl_lo", "kl_hi"}
    assert result.row("context_free").outputs is None
    assert summary(result).startswith("evaluate: 5 rows x 4 prompts in ")
    assert summary(result).endswith("best teacher-agreement: student_same (KL 0.00)")


def test_kl_and_the_context_free_kl_match_direct_float64_computations(project, result):
    import torch
    from transformers import AutoModelForCausalLM

    t = AutoModelForCausalLM.from_pretrained(project / "models/teacher").eval()
    s = AutoModelForCausalLM.from_pretrained(project / "models/student_other").eval()
    teacher = result.row("teacher")
    tv = TeacherView(t, None, [chat_ids_of(project, p) for p in result.prompts], teacher.outputs, 3, "cpu")
    with torch.no_grad():
        lts, kl, n = [], 0.0, 0
        for p, o in zip(tv.prompt_ids, teacher.outputs, strict=True):
            ids = torch.tensor([p + o.ids])
            lt, ls = (torch.log_softmax(m(ids).logits[0, len(p) - 1:-1].double(), -1) for m in (t, s))
            lts.append(lt)
            kl += (lt.exp() * (lt - ls)).sum().item()
            n += len(o.ids)
        mean = torch.cat(lts).exp().mean(0).log()
        cf = sum((lt.exp() * (lt - mean)).sum().item() for lt in lts) / n
    assert sum(x for x, _ in tv.kl(s)) / n == pytest.approx(kl / n, rel=1e-4)
    assert result.row("student_other").value("kl") == pytest.approx(kl / n, abs=1e-4)
    assert result.row("context_free").value("kl") == pytest.approx(cf, abs=1e-4)


def chat_ids_of(project: Path, prompt) -> list[int]:
    from transformers import AutoTokenizer

    from kd.evaluation.evaluate import chat_ids

    return chat_ids(AutoTokenizer.from_pretrained(project / "models/teacher"), prompt.messages)


@pytest.mark.parametrize(("answer", "reference", "exact", "contains"), [
    ("56", "56", True, True),
    (" **56.** ", "56", True, True),
    ("`12`", "12", True, True),
    ("AU", "Au", True, True),
    ("1,969", "1969", True, True),  # thousands separators are not a different number
    ("Merci beaucoup !", "Merci beaucoup.", True, True),
    ("The answer is 56.", "56", True, True),  # the extracted final answer, not the whole text
    ("7 x 8: first 7 x 4 = 28, then 28 x 2 = 56.", "56", True, True),
    ("7 x 8 = 54, so the answer is 54.", "56", False, False),
    ("The answer is: Au", "Au", True, True),
    ("The symbol for gold is Au.", "Au", True, True),  # what it says last, after "is", is its answer
    ("Today is Wednesday.", "Saturday", False, False),
    ("The first emperor of Rome was Augustus Caesar.", "Augustus", False, True),
    ("560", "56", False, False),  # whole words only
    ("Gaul", "Au", False, False),
    ("", "56", False, False),
    ("", "", False, False),  # an empty reference matches nothing
])
def test_exact_match_compares_the_extracted_final_answer(answer, reference, exact, contains):
    assert exact_match(answer, reference) is exact
    assert contains_match(answer, reference) is contains


def test_normalise():
    assert normalise("  Hello,\n  World!  ") == "hello world"


def test_metrics_json_shape_with_intervals(project, result):
    m = metrics(project)
    assert list(m)[:5] == ["teacher", "context_free", "baseline", "student_same", "student_other"]
    for name in ("baseline", "student_same", "student_other"):
        row = m[name]
        assert {"kl", "terminates_cleanly", "eos_rate", "judge", "rouge_l", "distinct_2", "length"} <= set(row)
        for k in ("kl", "terminates_cleanly", "judge", "rouge_l"):
            assert row[f"{k}_lo"] <= row[k] <= row[f"{k}_hi"], (name, k, row)
    assert m["teacher"]["kl"] == 0.0 and m["teacher"]["rouge_l"] == 1.0
    assert "likelihood judge `smollm2`" in m["sanity"]
    plots = {p.name for p in (project / "reports/plots").iterdir()}
    assert {"kl.csv", "terminates_cleanly.csv", "judge.csv"} <= plots
    assert (project / "reports/plots/kl.csv").read_text().splitlines()[0] == "model,kl,low,high"


def test_report_names_every_model_fingerprint_and_verdict(project, result):
    text = (project / "reports/report.md").read_text()
    for name in ("teacher", "context_free", "baseline", "student_same", "student_other", FP["sft"], FP["sft_logits"],
                 "run-student_same"):
        assert name in text
    assert "`student_same`: KL 0.000 [0.000, 0.000], beats the context-free baseline" in text
    assert "## Exact match by category" in text and "| math | 1 |" in text
    assert "## Judges and reward models: the sanity set" in text
    assert text.count("### eval-") == 4  # ~5 examples, capped by the 4 prompts
    # the tiny random students loop: the report says so before anything else
    first = text.split("## Results")[0]
    assert "## Read this first" in first and "`student_other` terminates cleanly on only" in first


def test_degenerate_answers_are_counted_and_flagged(project, result):
    for r in result.results:
        if r.outputs is None:
            continue
        for o, s in zip(r.outputs, r.scores, strict=True):
            assert s.stopped is o.stopped and s.length == o.length
            if not o.text:
                assert s.degenerate == "empty"
    ok = result.row("student_other").value("terminates_cleanly")
    assert ok == sum(s.stopped and s.degenerate is None for s in result.row("student_other").scores) / 4


def test_stage_is_deterministic_and_logs_one_mlflow_run(project, result):
    # Reports must not carry times or run-dependent order: the same models give the same bytes.
    import mlflow

    before = {p.relative_to(project / "reports"): p.read_bytes()
              for p in sorted((project / "reports").rglob("*")) if p.is_file()}
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the project's sqlite store
    proc = subprocess.run([sys.executable, "stages/evaluate.py", "--out", "reports2"], cwd=project, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1].startswith("evaluate: 5 rows x 4 prompts in ")
    after = {p.relative_to(project / "reports2"): p.read_bytes()
             for p in sorted((project / "reports2").rglob("*")) if p.is_file()}
    assert after == before
    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    (run,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert run.data.metrics["student_same.kl"] == 0.0 and "baseline.generate_s" in run.data.metrics
    # one child run per row, the same metric names in each: MLflow's compare view lines the models up
    children = {r.info.run_name: r.data.metrics for r in runs if r.data.tags.get("mlflow.parentRunId") == run.info.run_id}
    assert set(children) == {r.name for r in result.results} and children["student_same"]["kl"] == 0.0
    assert run.data.tags["dvc_stage"] == "evaluate" and run.data.params["evaluation.max_new_tokens"] == "5"
    assert run.data.params["models.student_other.mlflow_run_id"] == "run-student_other"


def test_student_named_like_a_report_row_is_rejected(project):
    params = load_params(project)
    for row in ("teacher", "context_free"):
        params = params.model_copy(update={"evaluation": params.evaluation.model_copy(update={"students": [row]})})
        with pytest.raises(KdError, match="built-in row"):
            evaluate(params, project)


def test_comparison_states_the_claim_only_when_the_interval_excludes_zero(project, result):
    from kd.evaluation.evaluate import compare
    from kd.evaluation.report import report_md

    better = compare(result, ["student_other"], ["student_same"], "copies help")  # KL 0 vs > 0 on every prompt
    lo, hi = better.differences["kl"][1]
    assert better.differences["kl"][0] < 0 and hi < 0
    same = compare(result, ["student_same"], ["student_same"], "nothing helps")
    assert same.differences["kl"] == (0.0, (0.0, 0.0))
    text = report_md(replace(result, comparisons=[better, same]), project, [])
    assert "**copies help**" in text
    assert "These data do not show that nothing helps" in text


# --- feedback figures: reward model and pairwise judge (kd/eval_feedback.py) -------------------------------

RM_METRICS = {"accuracy": 0.75, "pairs_held_out": 12, "accuracy_train": 0.9375}
NEW_KEYS = {"reward", "win_rate", "wins", "ties", "losses", "unparseable", "inconsistent", "judge_consistency"}


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
    survey = yaml.safe_load((REPO / "profiles/survey.yaml").read_text())
    params["datasets"]["prefs"] = survey["datasets"]["prefs"] | {"generator": "smollm2"}
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
    assert [k for k in m if k not in NOT_ROWS] == [*[k for k in base if k not in NOT_ROWS], "reward_model"]
    assert m["reward_model"] == RM_METRICS
    for name, row in base.items():
        if name in NOT_ROWS:
            continue
        assert {k: v for k, v in m[name].items() if not k.startswith(tuple(NEW_KEYS))} == row  # generation unchanged
        if name != "context_free":
            assert isinstance(m[name]["reward"], float) and m[name]["reward_lo"] <= m[name]["reward"]
    for name in ("student_same", "student_other"):  # 4 prompts, each judged, identical or unparseable
        w = m[name]
        assert w["wins"] + w["ties"] + w["losses"] + w["unparseable"] == 4
        shown = w.get("judge_consistency", 0) >= 0.75 and w["unparseable"] < 4
        assert ("win_rate" in w) == shown
    # every judge and the reward model went through the sanity set
    assert {"likelihood judge `smollm2`", "pairwise judge `smollm2`", "reward model `rm`"} <= set(m["sanity"])
    assert not any(NEW_KEYS & set(row) for row in base.values()) and "reward_model" not in base
    assert "reward.csv" in {p.name for p in (project / "reports_fb/plots").iterdir()}


def test_mean_reward_is_the_reward_scorers_mean(project, fb_result):
    from kd.runtime.scoring import RewardScorer

    run, _ = fb_result
    m = json.loads((project / "reports_fb/metrics.json").read_text())
    rows = [r for r in run.results if r.outputs is not None]
    items = [(f"{r.name}/{i}", {"messages": list(p.messages), "completion": o.text, "max_length": 2048})
             for r in rows for i, (p, o) in enumerate(zip(run.prompts, r.outputs, strict=True))]
    scores: dict[str, float] = {}
    RewardScorer(project / "models/rm", batch_size=3).generate(
        items, lambda key, response: scores.__setitem__(key, response["score"]))
    for r in rows:
        mine = [v for k, v in scores.items() if k.startswith(f"{r.name}/")]
        assert m[r.name]["reward"] == round(sum(mine) / len(run.prompts), 4)
    assert m["teacher"]["reward"] == m["student_same"]["reward"]  # same answers, same reward


def test_feedback_section_in_report_and_mlflow_keys(project, fb_result):
    from kd.evaluation.outputs import metrics_for_mlflow

    run, logs = fb_result
    text = (project / "reports_fb/report.md").read_text()
    assert "## Reward model" in text and "held-out pair accuracy **0.750** over 12 pairs (chance = 0.5" in text
    assert "## Win rate against the untrained baseline" in text and "prompts/feedback/pairwise.jinja" in text
    assert "| `student_other` |" in text.split("## Win rate")[1]
    assert "| reward model `rm` |" in text.split("## Judges and reward models")[1]
    assert "## Reward model" not in (project / "reports/report.md").read_text()
    flat = metrics_for_mlflow(run)
    assert flat["reward_model.accuracy"] == 0.75 and "student_other.wins" in flat and "teacher.reward" in flat
    assert flat["judge.requests_new"] == run.feedback.requests["judge"][1]
    assert any(line.startswith("evaluate: judge: ") for line in logs)
    assert any(line.startswith("evaluate: sanity set: reward model `rm`") for line in logs)


def test_rerun_asks_the_judge_and_reward_model_nothing_new(project, fb_params, fb_result):
    from kd.evaluation.feedback import add_feedback, reward_model_info
    from kd.evaluation.results import Scores

    run, _ = fb_result
    # the same answers, as a second `evaluate` generates them (greedy), before any feedback figure
    again = replace(run, feedback=None, sanity=[], results=[
        replace(r, scores=[replace(s, reward=None) for s in r.scores]) for r in run.results])
    assert all(isinstance(s, Scores) for r in again.results for s in r.scores)
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
    from kd.evaluation.feedback import add_feedback
    from kd.evaluation.outputs import metrics_json
    from kd.evaluation.results import EvalPrompt, ModelResult, Output, Run, Scores

    pairs = [("win 1", "lose 1"), ("win 2", "lose 2"), ("lose 3", "win 3"), ("even 4", "even four"),
             ("biased 5", "biased five"), ("garbage 6", "fine 6"), ("same", "same")]

    def row(name: str, kind: str, texts: list[str]) -> ModelResult:
        # answers marked degenerate: the sanity set (sound teacher answers) stays empty here
        return ModelResult(name, kind, {}, [Output([1], False, t) for t in texts],
                           [Scores(stopped=False, degenerate="repetition") for _ in texts])

    def make_run() -> Run:
        prompts = [EvalPrompt(f"p{i}", "c", f"Question {i}?", "", ({"role": "user", "content": f"Question {i}?"},))
                   for i in range(len(pairs))]
        mine, theirs = [p[0] for p in pairs], [p[1] for p in pairs]
        return Run(prompts, "seeds/eval_prompts.jsonl", "0" * 64, None, 8, "smollm2",
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
    assert w.per_prompt == [1.0, 1.0, 0.0, 0.5, 0.5, None, 0.5] and w.consistency == 4 / 5
    m = json.loads(metrics_json(run))
    assert m["s"] == {"win_rate": round(3.5 / 6, 4), "win_rate_lo": m["s"]["win_rate_lo"],
                           "win_rate_hi": m["s"]["win_rate_hi"], "wins": 2, "ties": 3, "losses": 1,
                           "unparseable": 1, "inconsistent": 1, "judge_consistency": 0.8, "terminates_cleanly": 0.0,
                           "eos_rate": 0.0, "terminates_cleanly_lo": 0.0, "terminates_cleanly_hi": 0.0, "eos_rate_lo": 0.0,
                           "eos_rate_hi": 0.0}
    assert m["copycat"]["ties"] == 7 and "judge_consistency" not in m["copycat"]  # all identical: never asked
    assert "wins" not in m["baseline"] and run.feedback.against == "baseline"
    assert again.feedback.win_rates["s"] == run.feedback.win_rates["s"]


def test_a_judge_that_follows_the_position_is_shown_unreliable(project, result):
    from kd.evaluation.outputs import metrics_json
    from kd.evaluation.results import Feedback, WinRate

    biased = WinRate(wins=0, ties=4, losses=0, inconsistent=4, per_prompt=[0.5] * 4)
    fb = Feedback(judge=load_params(project).evaluation.judge, against="baseline", win_rates={"student_other": biased})
    assert biased.consistency == 0.0
    assert "win_rate" not in json.loads(metrics_json(replace(result, feedback=fb)))["student_other"]


def test_feedback_config_mistakes_fail_before_generating(project, fb_params):
    from kd.evaluation.feedback import check

    params = load_params(project, fb_params)
    ev = params.evaluation
    assert check(params, project).accuracy == 0.75
    clash = params.model_copy(update={"evaluation": ev.model_copy(update={"students": ["reward_model"]})})
    with pytest.raises(KdError, match="'reward_model' is the name of a built-in row of the report; rename the student"):
        evaluate(clash, project, log=lambda _: None)
    away = params.model_copy(update={"evaluation": ev.model_copy(update={"against": "student_x"})})
    with pytest.raises(KdError, match="evaluation.against: 'student_x' is not in evaluation.students"):
        check(away, project)
    missing = params.model_copy(update={"evaluation": ev.model_copy(update={"reward_model": "nope"})})
    with pytest.raises(KdError, match="models/nope is not built"):
        check(missing, project)
