"""Distilled reward models: the held-out split, the pairs, the init, training with TRL's RewardTrainer, metrics
that RewardScorer reproduces on the saved directory, resume, errors and the dvc.yaml stage."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from studentproject import PREFS, TRAINING, make_student_project

from kd.config import load_params
from kd.distill import reward
from kd.distill.loop import STOP_ENV, TrainingStopped
from kd.errors import KdError
from kd.records import read_dataset, write_dataset

# Every step sees the whole training split; a high rate moves a one-layer model in a few steps.
RM_TRAINING = {**TRAINING, "max_steps": 4, "batch_size": 6, "checkpoint_every": 2}


def rm(pairs: str = "all", **extra) -> dict:
    return {"init": {"kind": "from_teacher", "teacher": "tiny", "layers": [0]}, "datasets": ["prefs"],
            "pairs": pairs, **extra, "training": {**RM_TRAINING, **extra.pop("training", {})}}



def _records(ids_prompts: list[tuple[str, str]]) -> list[dict]:
    return [{"id": i, "prompt": [{"role": "user", "content": p}]} for i, p in ids_prompts]


def test_split_is_by_prompt_stable_and_never_one_sided() -> None:
    recs = _records([(f"r{i}", f"question {i}") for i in range(40)])
    trained, held = reward.split(recs, 0.25)
    assert 4 <= len(held) <= 16 and len(trained) + len(held) == 40  # about a quarter
    again = reward.split(list(reversed(recs)), 0.25)  # order does not move a record
    assert {r["id"] for r in again[1]} == {r["id"] for r in held}
    more = reward.split(recs + _records([("new", "another question")]), 0.25)  # nor does new data
    assert {r["id"] for r in held} <= {r["id"] for r in more[1]}
    for fraction in (0.01, 0.99):  # at least one prompt on each side
        t, h = reward.split(recs[:2], fraction)
        assert len(t) == len(h) == 1
    # one prompt in two records (two feedback datasets) is never trained on and tested on
    t, h = reward.split(recs + _records([("dup", "question 0")]), 0.25)
    assert ("dup" in {r["id"] for r in h}) == ("r0" in {r["id"] for r in h})
    with pytest.raises(KdError, match=r"reward_models\.rm\.datasets: 2 records with 1 distinct prompt"):
        reward.split(_records([("a", "same"), ("b", "same")]), 0.25, "reward_models.rm.datasets")


def test_pairs_best_worst_and_all() -> None:
    recs = [{**p, "id": f"r{i}"} for i, p in enumerate(PREFS[:2])]
    bw = reward.make_pairs(recs, "best_worst")
    assert [(p.record, p.chosen, p.rejected) for p in bw] == [
        ("r0", "It is 2.", "No idea, maybe 10 or so, hard to say."),
        ("r1", "It is 4.", "No idea, maybe 13 or so, hard to say.")]
    every = reward.make_pairs(recs, "all")
    assert len(every) == 6  # three differently-scored candidates: three pairs a record
    assert ("It is 3.", "No idea, maybe 10 or so, hard to say.") in [(p.chosen, p.rejected) for p in every]
    tied = {**recs[0], "candidates": [{**c, "score": 1.0} for c in recs[0]["candidates"]]}
    assert reward.make_pairs([tied], "all") == []  # equal scores: no order to learn
    # candidates listed worst first: the scores, not the order, decide which side is chosen
    flipped = {**recs[0], "candidates": list(reversed(recs[0]["candidates"]))}
    assert {(p.chosen, p.rejected) for p in reward.make_pairs([flipped], "all")} == {
        (p.chosen, p.rejected) for p in every if p.record == "r0"}
    with pytest.raises(KdError, match=r"reward_models\.rm\.pairs: 'all' needs"):
        reward.make_pairs([{k: v for k, v in recs[0].items() if k != "candidates"}], "all", "reward_models.rm.pairs")


def test_init_keeps_base_weights_and_seeds_the_head(tmp_path: Path, tiny_model_dir: Path, monkeypatch) -> None:
    from transformers import AutoModelForCausalLM

    root = make_student_project(tmp_path / "p", tiny_model_dir, {}, logits=False,
                                reward_models={"rm": rm(), "rm2": rm(training={"seed": 1}),
                                               "pre": {**rm(), "init": {"kind": "from_pretrained",
                                                                        "path": str(tmp_path / "saved")}},
                                               "lm": {**rm(), "init": {"kind": "from_pretrained",
                                                                       "path": str(tiny_model_dir)}}})
    monkeypatch.chdir(root)
    params = load_params(root)
    a, tok = reward.init_reward_model(params.reward_models["rm"], params, root, "rm")
    b, _ = reward.init_reward_model(params.reward_models["rm"], params, root, "rm")
    c, _ = reward.init_reward_model(params.reward_models["rm2"], params, root, "rm2")
    assert a.config.num_labels == 1 and a.config.pad_token_id == tok.pad_token_id is not None
    assert torch.equal(a.score.weight, b.score.weight) and not torch.equal(a.score.weight, c.score.weight)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).state_dict()
    for key, value in a.model.state_dict().items():  # student layer 0 is teacher layer 0; no weight is random
        assert torch.equal(value, teacher[f"model.{key}"]), key
    # a causal LM directory: its base weights under a head drawn from the seed, the same on every load
    e, _ = reward.init_reward_model(params.reward_models["lm"], params, root, "lm")
    f, _ = reward.init_reward_model(params.reward_models["lm"], params, root, "lm")
    assert torch.equal(e.score.weight, f.score.weight) and torch.equal(e.score.weight, a.score.weight)
    assert all(torch.equal(v, teacher[f"model.{k}"]) for k, v in e.model.state_dict().items())
    # a reward model directory loaded again keeps its head (it is not drawn anew)
    with torch.no_grad():
        a.score.weight.add_(1.0)
    a.save_pretrained(tmp_path / "saved")
    tok.save_pretrained(tmp_path / "saved")
    d, _ = reward.init_reward_model(params.reward_models["pre"], params, root, "pre")
    assert torch.equal(d.score.weight, a.score.weight)


def _history(root: Path) -> list[str]:
    return (root / "plots" / "rm.csv").read_text().splitlines()


def test_trains_scores_as_reward_scorer_and_resumes(tmp_path: Path, tiny_model_dir: Path, monkeypatch,
                                                    tracking: str) -> None:
    from kd.runtime.scoring import RewardScorer

    root = make_student_project(tmp_path / "p", tiny_model_dir, {}, logits=False, reward_models={"rm": rm()})
    monkeypatch.chdir(root)
    params = load_params(root)
    cfg = params.reward_models["rm"]
    line = reward.train_reward_model("rm", root)
    assert line.startswith("rm: 4 steps on ") and "held-out accuracy" in line and "mlflow run" in line

    out = root / "models" / "rm"
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "kd_model.json", "README.md"} <= names
    assert names <= {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json",
                     "chat_template.jinja", "special_tokens_map.json", "kd_model.json", "README.md"}, names
    info = json.loads((out / "kd_model.json").read_text())
    manifest, records = read_dataset(root / "data" / "prefs")
    assert (info["kind"], info["objective"]) == ("reward_model", "bradley_terry")
    assert info["datasets"] == [{"name": "prefs", "fingerprint": manifest["fingerprint"]}]
    card = (out / "README.md").read_text()
    for text in ("`reward_models.rm`", manifest["fingerprint"], info["mlflow"]["run_id"], "bradley_terry"):
        assert text in card

    # held-out prompts are never trained on
    held_ids = info["held_out"]
    assert held_ids == sorted(held_ids) and 0 < len(held_ids) < len(records)
    held = [r for r in records if r["id"] in held_ids]
    trained = [r for r in records if r["id"] not in held_ids]
    assert not {json.dumps(r["prompt"]) for r in held} & {json.dumps(r["prompt"]) for r in trained}
    metrics = json.loads((root / "metrics" / "rm.json").read_text())
    assert metrics == info["metrics"] and "seconds" not in json.dumps(metrics)
    assert metrics["pairs_train"] == 3 * len(trained) and metrics["pairs_held_out"] == 3 * len(held)

    # it learned: loss falls, and it orders its training pairs better than the untrained model
    assert metrics["steps"] == 4 and metrics["loss_final"] < metrics["loss_first"]
    untrained, tok = reward.init_reward_model(cfg, params, root, "rm")
    train_pairs = reward.make_pairs(trained, "all")
    before, _ = reward.pair_metrics(reward.score_pairs(untrained, tok, train_pairs, 6))
    assert metrics["accuracy_train"] > before, (metrics["accuracy_train"], before)

    # the metrics are what RewardScorer (self-knowledge filtering, evaluation) computes on the saved directory
    scores = {}
    items = {}
    for r in held:
        for c in r["candidates"]:
            text = c["completion"][0]["content"]
            items[f"{r['id']}:{text}"] = {"messages": r["prompt"], "completion": text, "max_length": 64}
    RewardScorer(out, 6).generate(sorted(items.items()), lambda k, a: scores.__setitem__(k, a["score"]))
    pairs = [(scores[f"{r['id']}:{a['completion'][0]['content']}"], scores[f"{r['id']}:{b['completion'][0]['content']}"])
             for r in held for i, a in enumerate(r["candidates"]) for b in r["candidates"][i + 1:]]  # best first
    assert len(pairs) == metrics["pairs_held_out"]
    assert metrics["accuracy"] == round(sum(c > r for c, r in pairs) / len(pairs), 6)
    assert metrics["margin_held_out"] == pytest.approx(sum(c - r for c, r in pairs) / len(pairs), abs=1e-5)

    # resume equals uninterrupted: killed during step 4 (last checkpoint: step 2), rerun, same weights
    weights = (out / "model.safetensors").read_bytes()
    history = _history(root)
    monkeypatch.setenv(STOP_ENV, "3")
    with pytest.raises(TrainingStopped):
        reward.train_reward_model("rm", root)
    ckpts = [p.name for p in (root / ".kd" / "checkpoints" / "rm").glob("*/*")]
    assert [n for n in ckpts if re.fullmatch(r"checkpoint-0*2", n)], ckpts
    monkeypatch.delenv(STOP_ENV)
    line = reward.train_reward_model("rm", root)
    assert "resumed at step 2" in line
    assert _history(root) == history  # repr of each loss: bit-exact
    assert (out / "model.safetensors").read_bytes() == weights
    again = json.loads((out / "kd_model.json").read_text())
    assert again["held_out"] == held_ids and again["metrics"] == metrics
    assert not (root / ".kd" / "checkpoints" / "rm").exists()


def test_bad_input_names_the_key(tmp_path: Path, tiny_model_dir: Path, monkeypatch, tracking: str) -> None:
    root = make_student_project(tmp_path / "p", tiny_model_dir, {}, logits=False, reward_models={"rm": rm()})
    monkeypatch.chdir(root)
    write_dataset(root / "data" / "prefs", "prefs", "feedback", [], [], {}, None)
    with pytest.raises(KdError, match=r"reward_models\.rm\.datasets: prefs hold no records"):
        reward.train_reward_model("rm", root)
    write_dataset(root / "data" / "prefs", "prefs", "feedback", PREFS[:1], [], {}, None)
    with pytest.raises(KdError, match=r"reward_models\.rm\.datasets: 1 records with 1 distinct prompt"):
        reward.train_reward_model("rm", root)
    with pytest.raises(KdError, match=r"reward_models\.other: not declared"):
        reward.train_reward_model("other", root)
    assert not (root / "models" / "rm").exists()

    other = make_student_project(tmp_path / "q", tiny_model_dir, {}, logits=False,
                                 reward_models={"rm": {**rm(), "datasets": ["sft"]}})
    with pytest.raises(KdError, match=r"reward_models\.rm\.datasets\.0: 'sft' is a labeling dataset"):
        load_params(other)


def test_reward_model_stage_lists_what_it_reads(tmp_path: Path, tiny_model_dir: Path) -> None:
    from kd.pipeline.spec import reward_model_stage

    sft = {"init": {"kind": "from_teacher", "teacher": "tiny", "layers": [0]}, "objective": "sft",
           "datasets": ["sft"], "training": TRAINING}
    root = make_student_project(tmp_path / "p", tiny_model_dir, {"s": sft}, logits=False, reward_models={
        "rm": rm(), "rm_sft": {**rm(), "init": {"kind": "from_pretrained", "path": "models/s"}}})
    params = load_params(root)
    stage = reward_model_stage("rm", params.reward_models["rm"], params, root).as_dvc()
    assert stage["cmd"] == "python stages/reward_model.py rm"
    assert {"stages/reward_model.py", "data/prefs", str(tiny_model_dir)} <= set(stage["deps"])
    assert stage["params"] == ["reward_models.rm", "teachers.tiny.path"]
    assert stage["outs"] == ["models/rm"] and stage["metrics"] == [{"metrics/rm.json": {"cache": False}}]
    # an SFT student it starts from is a dep before it is built
    from_sft = reward_model_stage("rm_sft", params.reward_models["rm_sft"], params, root).as_dvc()
    assert "models/s" in from_sft["deps"] and from_sft["params"] == ["reward_models.rm_sft"]