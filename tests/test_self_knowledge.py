"""Self-knowledge rounds: self-consistency votes, reward thresholds (likelihood judge, reward model) and
self-judging, with scripted students behind the fake OpenAI server or the tiny local model."""

from __future__ import annotations

import json
import re
import threading
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO, copy_project
from fake_openai import FakeOpenAI

from kd.config import load_params
from kd.elicit.build import build_dataset
from kd.elicit.self_knowledge import self_knowledge
from kd.errors import KdError
from kd.records import read_jsonl


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Any:
    """See tests/test_feedback.py: one thread keeps tiny-model tests fast on a busy shared CPU."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


INSTRUCTIONS = [json.loads(line)["instruction"] for line in (REPO / "seeds" / "instructions.jsonl").read_text().splitlines()[:3]]


def make_project(tmp: Path, dataset: dict[str, Any], url: str = "http://127.0.0.1:9/v1",
                 model_dir: Path | None = None) -> Path:
    root = copy_project(tmp / "project")
    teachers: dict[str, Any] = {"student": {"backend": "openai", "base_url": url, "model": "fake-student",
                                            "api_key_env": None, "concurrency": 4, "timeout_s": 5}}
    if model_dir is not None:
        teachers["tiny"] = {"backend": "local", "path": str(model_dir), "dtype": "float32"}
    base = {"method": "self_knowledge", "generator": "student", "round": 1,
            "inputs": [{"seeds": "seeds/instructions.jsonl", "limit": 3}], "template": "prompts/labeling/answer.jinja",
            "samples": 5, "sampling": {"temperature": 0.8, "max_tokens": 12}, "allow_truncated": True}
    params = {"project": "kd-test", "teachers": teachers, "datasets": {"round1": {**base, **dataset}}}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    return root


def build(root: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.chdir(root)
    return build_dataset("round1", "self_knowledge", self_knowledge, root)


def load(root: Path, file: str = "records.jsonl") -> list[dict[str, Any]]:
    return read_jsonl(root / "data" / "round1" / file)


class Scripted:
    """A fake student: the k-th request about an instruction gets answers[instruction][k] (arrival order does
    not matter to the tests, which look at multisets); judge prompts go to `judge`."""

    def __init__(self, answers: dict[str, list[str]], judge: Any = None) -> None:
        self.answers, self.judge = answers, judge
        self.seen: Counter[str] = Counter()
        self.lock = threading.Lock()

    def __call__(self, messages: list[dict[str, Any]]) -> str:
        user = messages[-1]["content"]
        if self.judge is not None and "Rate the response" in user:
            return self.judge(user)
        with self.lock:
            k = self.seen[user]
            self.seen[user] += 1
        return self.answers[user][k % len(self.answers[user])]


def test_self_consistency_keeps_the_majority(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    student = Scripted({
        INSTRUCTIONS[0]: ["The answer is 36.", "So 36", "It's 35", "Total: 36.0", "I don't know"],  # 36: 3 of 5
        INSTRUCTIONS[1]: ["x = 5", "x = 5.", "x = 4", "x = 4.0", "no idea"],  # 5 and 4 tie: no majority
        INSTRUCTIONS[2]: ["1", "2", "3", "4", "4!"],  # 4 has 2 of 5 < min_share 0.5
    })
    with FakeOpenAI(answer=student) as server:
        root = make_project(tmp_path, {"filter": "self_consistency", "answer": "last_number"}, server.url)
        line = build(root, monkeypatch)
        assert server.received == 15
        assert "(15 cached, 0 new" in build(root, monkeypatch) and server.received == 15
    records = load(root)
    assert sorted(r["completion"][0]["content"] for r in records) == ["So 36", "The answer is 36.", "Total: 36.0"], line
    assert {(r["answer"], r["vote_share"]) for r in records} == {("36", 0.6)}
    assert all(r["provenance"]["round"] == 1 and r["provenance"]["seeds"][0]["file"] == "seeds/instructions.jsonl"
               for r in records)
    assert Counter(r["reason"] for r in load(root, "rejected.jsonl")) == {
        "minority_answer": 1, "no_final_answer": 1, "no_majority": 5, "low_agreement": 5}


def test_reward_threshold_with_the_likelihood_judge(tmp_path: Path, tiny_model_dir: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    judge = {"teacher": "tiny", "kind": "likelihood"}
    root = make_project(tmp_path, {"generator": "tiny", "filter": "reward_threshold", "judge": judge,
                                   "threshold": -1e9}, model_dir=tiny_model_dir)
    build(root, monkeypatch)
    everything = load(root)
    scores = sorted(r["score"] for r in everything)
    assert len(everything) + Counter(r["reason"] for r in load(root, "rejected.jsonl"))["duplicate"] == 15
    assert all(q.get("kind") == "loglik" for r in everything for q in r["provenance"]["requests"][1:])

    median = scores[len(scores) // 2]
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["datasets"]["round1"]["threshold"] = median
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    line = build(root, monkeypatch)
    assert "generator: 15 cached, 0 new; judge: 15 cached, 0 new" in line  # a new threshold re-asks nothing
    kept = load(root)
    assert len(kept) == sum(s >= median for s in scores) and all(r["score"] >= median for r in kept)
    assert Counter(r["reason"] for r in load(root, "rejected.jsonl"))["below_threshold"] == sum(s < median for s in scores)


def test_reward_threshold_with_a_reward_model(tmp_path: Path, tiny_model_dir: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        LlamaConfig,
        LlamaForSequenceClassification,
    )

    from kd.runtime.tokenize import encode

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = LlamaConfig.from_pretrained(tiny_model_dir, num_labels=1)
    torch.manual_seed(1)
    rm_dir = tmp_path / "rm"  # as TRL's RewardTrainer leaves one: a 1-label classifier and its tokenizer
    LlamaForSequenceClassification(config).save_pretrained(rm_dir)
    tok.save_pretrained(rm_dir)
    student = Scripted({i: ["Short.", "A longer answer with more words in it.", "Middling answer here.", "Nope",
                            "Yes indeed."] for i in INSTRUCTIONS})
    with FakeOpenAI(answer=student) as server:
        root = make_project(tmp_path, {"filter": "reward_threshold", "reward_model": str(rm_dir), "threshold": -1e9},
                            server.url)
        build(root, monkeypatch)
    records = load(root)
    assert len(records) == 15
    rm = AutoModelForSequenceClassification.from_pretrained(rm_dir, dtype=torch.float32).eval()
    for rec in records[:3]:
        ids, _ = encode(tok, rec, 10**9)
        with torch.no_grad():
            want = rm(torch.tensor([ids])).logits[0, 0].item()
        assert rec["score"] == pytest.approx(want, abs=1e-4)
        assert rec["provenance"]["requests"][1]["kind"] == "reward"
        assert rec["provenance"]["requests"][1]["teacher"]["backend"] == "reward_model"


def test_self_judge_keeps_what_the_student_rates_highly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def rate(user: str) -> str:
        good = "36" in user.split("Response:", 1)[1]
        return f"helpfulness: {5 if good else 2}\nhonesty: 4"

    student = Scripted(defaultdict(lambda: ["It is 36.", "Maybe 40.", "36 for sure", "I think 12", "Answer: 36"]),
                       judge=rate)
    judge = {"teacher": "student", "kind": "rubric", "template": "prompts/feedback/rubric.jinja",
             "aspects": ["helpfulness", "honesty"]}
    with FakeOpenAI(answer=student) as server:
        root = make_project(tmp_path, {"filter": "self_judge", "judge": judge, "threshold": 4.0, "round": 2},
                            server.url)
        line = build(root, monkeypatch)
    records = load(root)
    assert len(records) == 9 and all("36" in r["completion"][0]["content"] for r in records), line
    assert {r["score"] for r in records} == {4.5} and {r["provenance"]["round"] for r in records} == {2}
    judge_request = records[0]["provenance"]["requests"][1]
    assert judge_request["template"]["path"] == "prompts/feedback/rubric.jinja"
    assert Counter(r["reason"] for r in load(root, "rejected.jsonl")) == {"below_threshold": 6}


@pytest.mark.parametrize(("dataset", "message"), [
    ({"filter": "reward_threshold", "judge": {"teacher": "tiny", "kind": "likelihood"}}, "needs a `threshold`"),
    ({"filter": "reward_threshold", "threshold": 0.0}, "exactly one of `judge`"),
    ({"filter": "self_consistency", "threshold": 0.5}, "remove threshold"),
    ({"filter": "self_judge", "threshold": 3.0, "judge": {"teacher": "tiny", "kind": "rubric",
                                                          "template": "prompts/feedback/rubric.jinja"}},
     "must be 'student', not 'tiny'"),
    ({"filter": "reward_threshold", "threshold": 0.0, "min_share": 0.9,
      "judge": {"teacher": "tiny", "kind": "likelihood"}}, "min_share: for filter: self_consistency"),
    ({"filter": "reward_threshold", "threshold": 0.0, "judge": {"teacher": "student", "kind": "likelihood"}},
     "needs a local (white-box) one"),
    ({"filter": "self_consistency", "sampling": {"temperature": 0.0}}, "temperature must be > 0"),
])
def test_config_rejects_contradictions(tmp_path: Path, dataset: dict[str, Any], message: str) -> None:
    root = make_project(tmp_path, dataset, model_dir=tmp_path / "no-model-needed")
    with pytest.raises(KdError, match=re.escape(message)):
        load_params(root)
