"""Rank-optimisation students (dpo, rrhf, pro) trained on the tiny project's preference records through the
whole student stage: the chosen answers gain on the rejected ones, DPO's reference is the untouched init, a
killed rrhf run resumes to the same weights, and params/dvc know the objectives."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from studentproject import PREFS, make_student_project, student

from kd.config import load_params
from kd.distill.loop import STOP_ENV, TrainingStopped
from kd.distill.students import train_student
from kd.errors import KdError

# Every step sees all eight preference records; three steps at a high lr move the margin clearly.
TRAINING = {"max_steps": 3, "batch_size": 8, "grad_accum": 1, "lr": 1e-2}
# Two micro-batches of two prompts a step, four prompts a step: epochs end at steps 2 and 4, checkpoint at 2.
RESUME = {"max_steps": 4, "batch_size": 2, "grad_accum": 2, "checkpoint_every": 2, "warmup_ratio": 0.25}



def _spec(objective: str, **extra) -> dict:
    return student(objective, datasets=["prefs"], training={**TRAINING, **extra.pop("training", {})}, **extra)


def _init(root: Path):
    from kd.config.students import FromTeacher
    from kd.runtime.init import init_student

    return init_student(FromTeacher(kind="from_teacher", teacher="tiny", layers=[0]), load_params(root), root)


def _margin(model, tok, normalise: bool) -> float:
    """Mean over the training prefs of log p(chosen) − log p(rejected) (per token with `normalise`)."""
    from kd.distill.preference import sequence_logprobs
    from kd.runtime.tokenize import encode

    out = []
    for r in PREFS:
        rows = [encode(tok, {"prompt": r["prompt"], "completion": r[k]}, 64) for k in ("chosen", "rejected")]
        width = max(len(ids) for ids, _ in rows)
        ids = torch.zeros((2, width), dtype=torch.long)
        attn, comp = torch.zeros_like(ids), torch.zeros_like(ids)
        for i, (x, start) in enumerate(rows):
            ids[i, :len(x)], attn[i, :len(x)], comp[i, start:len(x)] = torch.tensor(x), 1, 1
        with torch.no_grad():
            lp = sequence_logprobs(model.eval(), ids, attn, comp, length_normalise=normalise)
        out.append((lp[0] - lp[1]).item())
    return sum(out) / len(out)


@pytest.mark.parametrize("objective,rank", [
    ("dpo", {"beta": 0.1, "loss_type": "sigmoid"}),
    ("rrhf", {"rank_weight": 1.0}),
    ("pro", {"score_weighted": True}),
])
def test_rank_objective_widens_the_chosen_margin(objective, rank, tmp_path: Path, tiny_model_dir: Path,
                                                 monkeypatch: pytest.MonkeyPatch, tracking: str) -> None:
    import mlflow
    import trl
    from transformers import AutoModelForCausalLM

    seen: dict = {}

    class SpyDPO(trl.DPOTrainer):
        def __init__(self, *a, **kw):
            seen.update(kw)
            super().__init__(*a, **kw)

    monkeypatch.setattr(trl, "DPOTrainer", SpyDPO)
    root = make_student_project(tmp_path, tiny_model_dir, {"s": _spec(objective, rank=rank)}, logits=False)
    monkeypatch.chdir(root)
    line = train_student("s", root)

    assert line.startswith("s: 3 steps, loss ")
    init, tok = _init(root)
    trained = AutoModelForCausalLM.from_pretrained(root / "models" / "s", dtype=torch.float32)
    normalise = objective != "dpo"  # DPO ranks summed log-probs, RRHF and PRO per-token means
    before, after = _margin(init, tok, normalise), _margin(trained, tok, normalise)
    assert after > before + 0.05, (before, after)
    info = json.loads((root / "models" / "s" / "kd_model.json").read_text())
    assert info["objective"] == objective and info["params"]["rank"] == {**info["params"]["rank"], **rank}
    metrics = json.loads((root / "metrics" / "s.json").read_text())
    assert metrics["steps"] == 3 and metrics["tokens"] > 0
    header = (root / "plots" / "s.csv").read_text().splitlines()[0].split(",")
    assert {"step", "loss", "lr", "tokens"} <= set(header)
    # the ranking metrics of each step reach MLflow: TRL's implicit-reward margin for dpo, kd's own for rrhf/pro
    client = mlflow.MlflowClient(tracking)
    keys = ["rewards/margins", "rewards/accuracies"] if objective == "dpo" else ["margin", "rank_acc"]
    margins, accs = ([m.value for m in client.get_metric_history(info["mlflow"]["run_id"], k)] for k in keys)
    assert len(margins) == len(accs) == 3 and margins[-1] > margins[0] and 0 <= accs[-1] <= 1, (margins, accs)
    if objective == "dpo":
        # the reference DPO trained against is a separate, frozen model that still holds the init's weights
        ref, model = seen["ref_model"], seen["model"]
        assert ref is not model and not any(p.requires_grad for p in ref.parameters())
        assert {p.data_ptr() for p in ref.parameters()}.isdisjoint(p.data_ptr() for p in model.parameters())
        ref_state, init_state = ref.state_dict(), init.state_dict()
        assert all(torch.equal(ref_state[k], v) for k, v in init_state.items())
        assert not torch.equal(trained.model.layers[0].mlp.up_proj.weight, init.model.layers[0].mlp.up_proj.weight)
    else:
        assert "ref_model" not in seen  # rrhf and pro need no reference (kd's own loop)


def test_rrhf_resume_equals_uninterrupted(tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                          tracking: str) -> None:
    root = make_student_project(tmp_path, tiny_model_dir, {"s": _spec("rrhf", training=RESUME)}, logits=False)
    monkeypatch.chdir(root)
    train_student("s", root)
    plots = (root / "plots" / "s.csv").read_text()
    weights = (root / "models" / "s" / "model.safetensors").read_bytes()

    monkeypatch.setenv(STOP_ENV, "3")  # dies before step 4: the last checkpoint is step 2, step 3 is redone
    with pytest.raises(TrainingStopped):
        train_student("s", root)
    monkeypatch.delenv(STOP_ENV)
    line = train_student("s", root)
    assert "resumed at step 2" in line
    assert (root / "plots" / "s.csv").read_text() == plots  # every step's loss, repr of each float: bit-exact
    assert (root / "models" / "s" / "model.safetensors").read_bytes() == weights


def test_params_and_dvc_stage_know_rank_students(tmp_path: Path, tiny_model_dir: Path) -> None:
    from kd.pipeline.spec import student_stage

    root = make_student_project(tmp_path / "ok", tiny_model_dir, {"s": _spec("dpo")}, logits=False)
    params = load_params(root)
    stage = student_stage("s", params.students["s"], params, root).as_dvc()
    assert {"stages/student.py", "data/prefs", str(tiny_model_dir)} <= set(stage["deps"])
    assert stage["params"] == ["students.s", "teachers.tiny.path"]
    # DPO on prompt + completion data: there is no pair to prefer
    bad = make_student_project(tmp_path / "bad", tiny_model_dir, {"s": student("dpo")}, logits=False)
    with pytest.raises(KdError, match=r"students\.s\.datasets\.0: objective dpo trains on preference"):
        load_params(bad)


def test_records_without_two_usable_candidates_are_refused(tmp_path: Path, tiny_model_dir: Path,
                                                           monkeypatch: pytest.MonkeyPatch, tracking: str) -> None:
    # max_length 8 keeps only part of each prompt: no candidate has a completion token left
    root = make_student_project(tmp_path, tiny_model_dir, {"s": _spec("pro", training={"max_length": 8})},
                                logits=False)
    monkeypatch.chdir(root)
    with pytest.raises(KdError, match=r"students\.s: no feedback record keeps two candidates"):
        train_student("s", root)
    assert not (root / "models" / "s").exists()
