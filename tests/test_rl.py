"""RL students (objectives grpo, rloo): TRL trains them with kd's rewards and a frozen reference."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from studentproject import RECORDS, make_student_project, student

from kd.config import load_params
from kd.errors import KdError

RM = {"rm": {"init": {"kind": "from_teacher", "teacher": "tiny", "layers": [0]}, "datasets": ["prefs"]}}



def rl_student(objective: str, **rl: Any) -> dict[str, Any]:
    spec = student(objective, training={"max_steps": 2, "batch_size": 4, "checkpoint_every": 10})
    spec["rl"] = {"num_generations": 2, "max_new_tokens": 6, "beta": 0.0, **rl}
    return spec


def write_reward_model(root: Path, teacher_dir: Path) -> Path:
    """models/rm as the reward-model stage leaves it: a 1-label classifier (random head), tokenizer, kd_model.json."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = root / "models" / "rm"
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    torch.manual_seed(1)
    model = AutoModelForSequenceClassification.from_pretrained(teacher_dir, num_labels=1)
    model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "kd_model.json").write_text(json.dumps({"name": "rm"}))
    return out


class Spy:
    """Keeps the TRL trainer and kd's Result of a train_rl call."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import kd.distill.rl as rl

        real_trainer, real_train = rl._trainer, rl.train_rl

        def trainer(*a: Any, **kw: Any) -> Any:
            self.trainer = real_trainer(*a, **kw)
            return self.trainer

        def train_rl(*a: Any, **kw: Any) -> Any:
            self.model = a[4]
            self.result = real_train(*a, **kw)
            return self.result

        monkeypatch.setattr(rl, "_trainer", trainer)
        monkeypatch.setattr(rl, "train_rl", train_rl)


def _train(root: Path, monkeypatch: pytest.MonkeyPatch) -> Spy:
    from kd.distill.students import train_student

    spy = Spy(monkeypatch)
    monkeypatch.chdir(root)
    train_student("s", root)
    return spy


def _trained_outputs(root: Path, spy: Spy) -> None:
    assert (root / "models" / "s" / "model.safetensors").is_file()
    metrics = json.loads((root / "metrics" / "s.json").read_text())
    assert metrics["steps"] == 2 and metrics["loss_final"] is not None
    assert len(spy.result.history) == 2
    assert all({"reward", "reward_std", "loss", "lr"} <= h.keys() for h in spy.result.history), spy.result.history
    assert not (root / ".kd" / "checkpoints" / "s").exists()  # the saved reference went with the checkpoints


def test_grpo_with_a_reward_model_keeps_a_frozen_reference(tmp_path: Path, tiny_model_dir: Path, monkeypatch,
                                                          tracking: str) -> None:
    from safetensors.torch import load_file

    from kd.runtime.init import frozen_init

    root = make_student_project(tmp_path, tiny_model_dir, {"s": rl_student("grpo", reward_model="rm", beta=0.1)},
                                logits=False, reward_models=RM)
    write_reward_model(root, tiny_model_dir)
    spy = _train(root, monkeypatch)
    _trained_outputs(root, spy)
    assert "kl" in spy.result.history[0] and "rewards/reward_model/mean" in spy.result.history[0]
    params = load_params(root)
    init = frozen_init(params.students["s"].init, params, root, None, 0, "students.s.init").state_dict()
    ref, trained = spy.trainer.ref_model, load_file(root / "models" / "s" / "model.safetensors")
    # regression guard: TRL rebuilds the reference from config._name_or_path, which for a from_teacher student is
    # the two-layer teacher, not the one-layer init
    assert ref is not None and ref is not spy.model and ref is not spy.trainer.model
    assert not any(p.requires_grad for p in ref.parameters())
    assert ref.state_dict().keys() == init.keys()
    assert all(torch.equal(v, init[k]) for k, v in ref.state_dict().items()), "the reference moved or is not the init"
    assert any(not torch.equal(v, init[k]) for k, v in trained.items() if k in init), "the policy did not train"
    assert "reference" not in spy.model.config._name_or_path  # restored once TRL has loaded the reference


def test_rloo_with_the_teacher_likelihood(tmp_path: Path, tiny_model_dir: Path, monkeypatch, tracking: str) -> None:
    root = make_student_project(tmp_path, tiny_model_dir, {"s": rl_student("rloo", teacher="tiny")}, logits=False)
    spy = _train(root, monkeypatch)
    _trained_outputs(root, spy)
    assert spy.trainer.ref_model is None  # beta 0 loads no reference
    assert all(h["reward"] < 0 for h in spy.result.history)  # a mean log-probability


def test_rewards_are_the_scores_kd_reports(tmp_path: Path, tiny_model_dir: Path, monkeypatch) -> None:
    from kd.distill.rl import likelihood_reward, model_reward
    from kd.runtime.local import LocalTeacher
    from kd.runtime.models import load_teacher
    from kd.runtime.scoring import SCORE_DIGITS, LoglikScorer, RewardScorer, load_reward_model

    root = make_student_project(tmp_path, tiny_model_dir, {}, logits=False)
    monkeypatch.chdir(root)
    path = write_reward_model(root, tiny_model_dir)
    params = load_params(root)
    rewards = [model_reward(*load_reward_model(path), 4), likelihood_reward(*load_teacher(params, "tiny", root), 4)]
    scorers = [RewardScorer(path, 4), LoglikScorer(LocalTeacher("tiny", params.teachers["tiny"], root), 4)]
    for r in RECORDS[:3]:
        for reward, scorer in zip(rewards, scorers, strict=True):
            got = {}
            request = {"messages": r["prompt"], "completion": r["completion"][0]["content"], "max_length": 10**6}
            scorer.generate([("k", request)], lambda k, out, got=got: got.update(out))
            assert round(reward([r["prompt"]], [r["completion"]])[0], SCORE_DIGITS) == got["score"]


def test_unknown_reward_model_key_is_refused(tmp_path: Path, tiny_model_dir: Path) -> None:
    root = make_student_project(tmp_path, tiny_model_dir, {"s": rl_student("grpo", reward_model="nope")},
                                logits=False, reward_models=RM)
    with pytest.raises(KdError, match=r"students\.s\.rl\.reward_model: unknown reward model 'nope'"):
        load_params(root)


def test_missing_reward_model_dir_and_bad_batch_are_kd_errors(tmp_path: Path, tiny_model_dir: Path, monkeypatch,
                                                             tracking: str) -> None:
    spec = rl_student("grpo", reward_model="rm")
    odd = rl_student("rloo", teacher="tiny", num_generations=3)  # 4 completions a step: no whole groups of 3
    root = make_student_project(tmp_path, tiny_model_dir, {"s": spec, "odd": odd}, logits=False, reward_models=RM)
    monkeypatch.chdir(root)
    from kd.distill.students import train_student

    with pytest.raises(KdError, match=r"students\.s\.rl\.reward_model: models/rm does not exist"):
        train_student("s", root)
    with pytest.raises(KdError, match=r"students\.odd\.training\.batch_size: .* multiple of rl\.num_generations \(3\)"):
        train_student("odd", root)
    assert not (root / "models" / "s").exists() and not (root / "models" / "odd").exists()
