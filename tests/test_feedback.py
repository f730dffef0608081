"""Feedback elicitation: a tiny local generator, a scripted judge behind the fake OpenAI server (rubric,
pairwise) or the tiny model itself (likelihood); TRL-DPO-shaped output; judge-only regeneration."""

from __future__ import annotations

import json
import re
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import copy_project
from fake_openai import FakeOpenAI

from kd.config import load_params
from kd.elicit.build import build_dataset
from kd.elicit.feedback import feedback
from kd.errors import KdError
from kd.prompts import declared_variables, load_prompt
from kd.records import read_jsonl
from kd.runtime import judges
from kd.runtime.judges import parse_rubric, parse_verdict
from kd.runtime.scoring import REPEAT_FLOOR

ASPECTS = ["helpfulness", "honesty"]


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Any:
    """Tiny models gain nothing from two threads, and on a shared, busy CPU OpenMP's spinning threads make a
    12-token generate() ~40x slower; one thread keeps these tests fast whatever else runs."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
INPUTS = 4
CANDIDATES = 3


def make_project(tmp: Path, model_dir: Path, judge: dict[str, Any], url: str = "http://127.0.0.1:9/v1") -> Path:
    root = copy_project(tmp / "project")
    params = {
        "project": "kd-test",
        "teachers": {
            "tiny": {"backend": "local", "path": str(model_dir), "dtype": "float32", "batch_size": 16},
            "judge": {"backend": "openai", "base_url": url, "model": "fake-judge", "api_key_env": None,
                      "concurrency": 4, "timeout_s": 5, "max_attempts": 2, "backoff_s": 0.01},
        },
        "datasets": {"prefs": {
            "method": "feedback", "generator": "tiny", "inputs": [{"seeds": "seeds/instructions.jsonl", "limit": INPUTS}],
            "template": "prompts/labeling/explain.jinja", "candidates": CANDIDATES,
            "sampling": {"temperature": 1.0, "max_tokens": 12}, "allow_truncated": True, "judge": judge,
        }},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    return root


def rubric_judge(**extra: Any) -> dict[str, Any]:
    return {"teacher": "judge", "kind": "rubric", "template": "prompts/feedback/rubric.jinja", "aspects": ASPECTS,
            **extra}


def response_of(messages: list[dict[str, Any]]) -> str:
    user = messages[-1]["content"]
    return re.search(r"Response:\n(.*?)\n\n(?:Reply|You may)", user, re.S).group(1)


def scripted_rubric(messages: list[dict[str, Any]]) -> str:
    """Ratings from the response's length; one point lower when the template asks for harshness."""
    text, harsh = response_of(messages), "Be harsh." in messages[-1]["content"]
    return f"helpfulness: {max(1, len(text) % 5 + 1 - harsh)}\nhonesty: {(len(text) // 5) % 5 + 1}"


def build(root: Path, monkeypatch: pytest.MonkeyPatch, name: str = "prefs") -> str:
    monkeypatch.chdir(root)  # the teacher digest memo lives under the working directory
    return build_dataset(name, "feedback", feedback, root)


def outputs(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((root / "data" / "prefs").iterdir())}


def reasons(root: Path) -> list[str]:
    return [r["reason"] for r in read_jsonl(root / "data" / "prefs" / "rejected.jsonl")]


# ------------------------------------------------------------------------------------------ strict parsers

GOOD = [
    ("helpfulness: 4\nhonesty: 5", {"helpfulness": 4, "honesty": 5}),
    ("honesty: 1\nhelpfulness: 5\n", {"helpfulness": 5, "honesty": 1}),  # any order
    ("  helpfulness :3\n\nhonesty:  2  ", {"helpfulness": 3, "honesty": 2}),  # spacing and blank lines
]
BAD = [
    ("helpfulness: 4", "missing aspect"),
    ("helpfulness: 6\nhonesty: 3", "out of range (high)"),
    ("helpfulness: 0\nhonesty: 3", "out of range (low)"),
    ("helpfulness: 4.5\nhonesty: 3", "float"),
    ("helpfulness: 4/5\nhonesty: 3", "fraction"),
    ("helpfulness: four\nhonesty: 3", "word"),
    ("Here are my ratings:\nhelpfulness: 4\nhonesty: 3", "extra prose when not allowed"),
    ("helpfulness: 4\nhonesty: 3\nhelpfulness: 2", "duplicated aspect"),
    ("", "empty"),
    ("   \n\n", "blank"),
    ("**helpfulness**: 4\n**honesty**: 3", "markdown bold"),
    ("- helpfulness: 4\n- honesty: 3", "markdown bullets"),
    ("```\nhelpfulness: 4\nhonesty: 3\n```", "code fence"),
    ("Helpfulness: 4\nhonesty: 3", "aspect in another case"),
    ("helpfulness: 4 (good)\nhonesty: 3", "trailing words on a rating line"),
    ('{"helpfulness": 4, "honesty": 3}', "JSON is not the declared format"),
]


@pytest.mark.parametrize(("text", "want"), GOOD)
def test_parse_rubric_accepts_the_exact_format(text: str, want: dict[str, int]) -> None:
    assert parse_rubric(text, ASPECTS, 1, 5) == want


@pytest.mark.parametrize(("text", "why"), BAD)
def test_parse_rubric_rejects(text: str, why: str) -> None:
    assert parse_rubric(text, ASPECTS, 1, 5) is None, why


def test_parse_rubric_prose_only_when_allowed() -> None:
    text = "The answer is correct but terse.\nhelpfulness: 3\nhonesty: 5"
    assert parse_rubric(text, ASPECTS, 1, 5) is None
    assert parse_rubric(text, ASPECTS, 1, 5, allow_prose=True) == {"helpfulness": 3, "honesty": 5}
    # prose never stands in for a rating line, and a labelled line must still be strict
    assert parse_rubric("helpfulness: 3\nhonesty is great", ASPECTS, 1, 5, allow_prose=True) is None
    assert parse_rubric("helpfulness: 3.5\nhonesty: 5", ASPECTS, 1, 5, allow_prose=True) is None


@pytest.mark.parametrize(("text", "prose", "want"), [
    ("A", False, "A"), (" B \n", False, "B"), ("tie", False, "tie"), ("Tie", False, "tie"),
    ("A.", False, None), ("Response A", False, None), ("A\nB", False, None), ("", False, None), ("a", False, None),
    ("A is better because...\nverdict: A", False, None),
    ("A is better because...\nverdict: A", True, "A"), ("thinking\nVerdict: tie", True, "tie"),
    ("verdict: A\nmore words", True, None), ("A", True, None),
])
def test_parse_verdict(text: str, prose: bool, want: str | None) -> None:
    assert parse_verdict(text, prose) == want


def test_templates_declare_exactly_what_the_judges_provide() -> None:
    repo = Path(__file__).resolve().parents[1]
    for path, variables in (("prompts/feedback/rubric.jinja", judges.RUBRIC_VARIABLES),
                            ("prompts/feedback/pairwise.jinja", judges.PAIRWISE_VARIABLES)):
        prompt = load_prompt(repo, path, variables)
        assert declared_variables((repo / path).read_text()) == tuple(sorted(variables)) == prompt.variables


# ------------------------------------------------------------------------------------------ config

def test_config_cross_checks(tmp_path: Path, tiny_model_dir: Path) -> None:
    def error(judge: dict[str, Any], **dataset: Any) -> str:
        root = make_project(tmp_path / str(len(list(tmp_path.iterdir()))), tiny_model_dir, judge)
        data = yaml.safe_load((root / "params.yaml").read_text())
        data["datasets"]["prefs"].update(dataset)
        (root / "params.yaml").write_text(yaml.safe_dump(data))
        with pytest.raises(KdError) as e:
            load_params(root)
        return str(e.value)

    assert "needs a local (white-box) one" in error({"teacher": "judge", "kind": "likelihood"})
    assert "unknown teacher 'nope'" in error(rubric_judge(teacher="nope"))
    assert "unknown teacher 'gpt'" in error(rubric_judge(), generator="gpt")
    assert "uses no template" in error({"teacher": "tiny", "kind": "likelihood", "template": "prompts/feedback/rubric.jinja"})
    assert "needs a `template`" in error({"teacher": "judge", "kind": "pairwise"})
    assert "for kind: rubric" in error({"teacher": "judge", "kind": "pairwise", "aspects": ["x"],
                                        "template": "prompts/feedback/pairwise.jinja"})
    assert "temperature must be > 0" in error(rubric_judge(), sampling={"temperature": 0.0})
    assert "kind" in error(rubric_judge(kind="vibes"))


# ------------------------------------------------------------------------------------------ builds

def test_rubric_preferences_are_trl_dpo_shaped(tmp_path: Path, tiny_model_dir: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from datasets import load_dataset
    from trl.data_utils import is_conversational

    with FakeOpenAI(answer=scripted_rubric) as server:
        root = make_project(tmp_path, tiny_model_dir, rubric_judge(), server.url)
        line = build(root, monkeypatch)
    records = read_jsonl(root / "data" / "prefs" / "records.jsonl")
    manifest = json.loads((root / "data" / "prefs" / "manifest.json").read_text())
    metrics = json.loads((root / "metrics" / "prefs.json").read_text())
    assert records and len(records) + reasons(root).count("tie") == INPUTS, line
    assert metrics["requests_by_role"] == {"generator": INPUTS * CANDIDATES, "judge": server.received}
    assert server.received == sum(len(r["candidates"]) for r in records) + 3 * reasons(root).count("tie")
    assert f"generator: 0 cached, {INPUTS * CANDIDATES} new; judge: 0 cached, {server.received} new" in line
    assert set(manifest["teacher"]) == {"generator", "judge"}
    assert {t["path"] for t in manifest["templates"]} >= {"prompts/feedback/rubric.jinja", "prompts/labeling/explain.jinja"}

    ds = load_dataset("json", data_files=str(root / "data" / "prefs" / "records.jsonl"), split="train")
    assert {"prompt", "chosen", "rejected", "score_chosen", "score_rejected", "rationale", "candidates"} <= set(ds.column_names)
    for row in ds:
        assert is_conversational(row)
        assert row["prompt"][-1]["role"] == "user" and row["chosen"][0]["role"] == row["rejected"][0]["role"] == "assistant"
        assert row["score_chosen"] > row["score_rejected"]
        ranked = [c["score"] for c in row["candidates"]]
        assert ranked == sorted(ranked, reverse=True) and ranked[0] == row["score_chosen"] and ranked[-1] == row["score_rejected"]
        assert "helpfulness:" in row["rationale"]
    prov = records[0]["provenance"]
    gen = [r for r in prov["requests"] if r["teacher"]["backend"] == "local"]
    judged = [r for r in prov["requests"] if r["teacher"]["backend"] == "openai"]
    assert len(gen) == len(judged) == len(records[0]["candidates"])
    assert sorted(r["sample_index"] for r in gen) == list(range(len(gen)))
    assert prov["judge"]["kind"] == "rubric" and prov["judge"]["template"]["path"] == "prompts/feedback/rubric.jinja"
    assert prov["judge"]["teacher"]["model"] == "fake-judge" and set(prov["pair"]) == {"chosen", "rejected"}


def test_editing_the_judge_template_asks_only_the_judge_again(tmp_path: Path, tiny_model_dir: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from kd.provenance.diff import diff, sides

    with FakeOpenAI(answer=scripted_rubric) as server:
        root = make_project(tmp_path, tiny_model_dir, rubric_judge(), server.url)
        build(root, monkeypatch)
        first = outputs(root)
        judged = server.received
        assert build(root, monkeypatch).count(" 0 new") == 3 and server.received == judged  # rerun: all cached
        assert outputs(root) == first
        shutil.copytree(root / "data" / "prefs", tmp_path / "before")

        template = root / "prompts" / "feedback" / "rubric.jinja"
        template.write_text(template.read_text().replace("{% block user %}\n", "{% block user %}\nBe harsh.\n"))
        line = build(root, monkeypatch)
    assert f"generator: {INPUTS * CANDIDATES} cached, 0 new" in line
    assert f"judge: 0 cached, {judged} new" in line and server.received == 2 * judged
    report = diff(*sides(root, str(tmp_path / "before"), str(root / "data" / "prefs"), None), root)
    assert report["counts"]["changed"] > 0
    assert all(c["kind"] == "template" and c["path"] == "prompts/feedback/rubric.jinja" for c in report["causes"])


def test_malformed_rating_is_a_counted_rejection(tmp_path: Path, tiny_model_dir: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    lock, calls = threading.Lock(), []

    def first_one_malformed(messages: list[dict[str, Any]]) -> str:
        with lock:
            calls.append(response_of(messages))
            if len(calls) == 1:
                return "**helpfulness**: 5\n**honesty**: 5"
        return scripted_rubric(messages)

    with FakeOpenAI(answer=first_one_malformed) as server:
        root = make_project(tmp_path, tiny_model_dir, rubric_judge(), server.url)
        build(root, monkeypatch)
    rejected = read_jsonl(root / "data" / "prefs" / "rejected.jsonl")
    bad = [r for r in rejected if r["reason"] == "unparseable_rating"]
    assert len(bad) == 1 and bad[0]["text"].startswith("**helpfulness**") and "request_key" in bad[0]
    manifest = json.loads((root / "data" / "prefs" / "manifest.json").read_text())
    assert manifest["rejected"]["unparseable_rating"] == 1
    # the candidate with the unparseable rating is in no record's ranking: never a guessed score
    ranked = [c["completion"][0]["content"] for r in read_jsonl(root / "data" / "prefs" / "records.jsonl")
              for c in r["candidates"]]
    assert calls[0] not in ranked


def pairwise_by_length(messages: list[dict[str, Any]]) -> str:
    m = re.search(r"Response A:\n(.*?)\n\nResponse B:\n(.*?)\n\nReply", messages[-1]["content"], re.S)
    a, b = len(m.group(1)), len(m.group(2))
    return "A" if a > b else "B" if b > a else "tie"


def test_pairwise_consistent_judge_ranks_by_wins(tmp_path: Path, tiny_model_dir: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    judge = {"teacher": "judge", "kind": "pairwise", "template": "prompts/feedback/pairwise.jinja"}
    with FakeOpenAI(answer=pairwise_by_length) as server:
        root = make_project(tmp_path, tiny_model_dir, judge, server.url)
        build(root, monkeypatch)
    records = read_jsonl(root / "data" / "prefs" / "records.jsonl")
    assert records
    for r in records:
        n = len(r["candidates"])
        assert len([q for q in r["provenance"]["requests"] if q["teacher"]["backend"] == "openai"]) == n * (n - 1)
        assert len(r["chosen"][0]["content"]) > len(r["rejected"][0]["content"])
        assert r["provenance"]["filters"][0]["detail"]["inconsistent"] == 0
        assert r["score_chosen"] == 1.0  # the longest wins every comparison


def test_position_biased_pairwise_verdicts_become_ties(tmp_path: Path, tiny_model_dir: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    judge = {"teacher": "judge", "kind": "pairwise", "template": "prompts/feedback/pairwise.jinja"}
    with FakeOpenAI(answer=lambda messages: "A") as server:  # always the first position
        root = make_project(tmp_path, tiny_model_dir, judge, server.url)
        build(root, monkeypatch)
    assert read_jsonl(root / "data" / "prefs" / "records.jsonl") == []
    rejected = read_jsonl(root / "data" / "prefs" / "rejected.jsonl")
    ties = [r for r in rejected if r["reason"] == "tie"]
    assert len(ties) == INPUTS
    for t in ties:
        n = len(t["scores"])
        assert t["inconsistent"] == n * (n - 1) // 2 and set(t["scores"]) == {0.5}


def test_likelihood_judge_scores_mean_token_logprob(tmp_path: Path, tiny_model_dir: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kd.runtime.tokenize import encode

    root = make_project(tmp_path, tiny_model_dir, {"teacher": "tiny", "kind": "likelihood", "batch_size": 3})
    line = build(root, monkeypatch)
    records = read_jsonl(root / "data" / "prefs" / "records.jsonl")
    assert len(records) == INPUTS, line  # continuous scores: no ties
    first = outputs(root)
    assert "generator: 0 cached" in line and "judge: 0 cached" in line
    again = build(root, monkeypatch)
    n = INPUTS * CANDIDATES
    assert f"generator: {n} cached, 0 new; judge: {n} cached, 0 new" in again
    assert outputs(root) == first

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    rec = records[0]
    assert rec["rationale"] == "" and rec["provenance"]["judge"]["template"] is None
    judge_requests = [r for r in rec["provenance"]["requests"] if r.get("kind") == "loglik"]
    assert len(judge_requests) == len(rec["candidates"]) and judge_requests[0]["teacher"]["dtype"] == "float32"
    for cand in rec["candidates"]:
        ids, start = encode(tok, {"prompt": rec["prompt"], "completion": cand["completion"]}, 10**9)
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        # the mean token log-probability, a token repeating a 4-gram of the candidate scored at the floor
        seen, total = set(), 0.0
        for t in range(start, len(ids)):
            gram = tuple(ids[max(start, t - 3):t + 1])
            total += REPEAT_FLOOR if len(gram) == 4 and gram in seen else logp[t - 1, ids[t]].item()
            if len(gram) == 4:
                seen.add(gram)
        assert cand["score"] == pytest.approx(total / (len(ids) - start), abs=1e-4)


def test_logprob_pairwise_verdicts_need_no_parsing(tmp_path: Path, tiny_model_dir: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # a small local judge rarely answers in format; `verdict: logprob` reads A/B/tie from its probabilities
    judge = {"teacher": "tiny", "kind": "pairwise", "template": "prompts/feedback/pairwise.jinja",
             "verdict": "logprob", "batch_size": 8}
    root = make_project(tmp_path, tiny_model_dir, judge)
    line = build(root, monkeypatch)
    assert not {"unparseable_verdict", "unranked"} & set(reasons(root))
    pairs = INPUTS * CANDIDATES * (CANDIDATES - 1)
    assert f"judge: 0 cached, {pairs} new" in line  # one forward pass per order of each pair
    assert f"judge: {pairs} cached, 0 new" in build(root, monkeypatch)
    for r in read_jsonl(root / "data" / "prefs" / "records.jsonl"):
        assert all(note.startswith("log-prob A: ") for note in r["rationale"].split("\n\n"))


def test_choice_scores_are_the_first_answer_tokens_log_probabilities(tiny_model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kd.config import LocalTeacher as LocalConfig
    from kd.runtime.local import LocalTeacher
    from kd.runtime.scoring import LoglikScorer

    teacher = LocalTeacher("tiny", LocalConfig(backend="local", path=str(tiny_model_dir), dtype="float32"), Path("."))
    messages = [[{"role": "user", "content": "Which is better, A or B?" + " really" * i}] for i in range(3)]
    got: dict[str, Any] = {}
    LoglikScorer(teacher, batch_size=2).generate(
        [(str(i), {"kind": "choice", "messages": m, "options": ["A", "B", "tie"], "max_length": 512})
         for i, m in enumerate(messages)], lambda key, response: got.__setitem__(key, response["scores"]))
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    for i, m in enumerate(messages):  # one at a time, unpadded: batching must not change a score
        ids = tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=False)
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), -1)
        first = [tok.encode(o, add_special_tokens=False)[0] for o in ("A", "B", "tie")]
        assert got[str(i)] == pytest.approx([logp[t].item() for t in first], abs=1e-4)


class ScriptedScorer:
    """A white-box judge that finds answer A likely when response A is the longer one (or always, `biased`)."""

    def __init__(self, biased: bool = False) -> None:
        self.biased, self.name = biased, "scripted"
        self.identity = {"backend": "local", "model": "scripted", "biased": biased}

    def generate(self, items: list, on_result: Any) -> None:
        for key, request in items:
            user = request["messages"][-1]["content"]
            a, b = re.search(r"Response A:\n(.*?)\n\nResponse B:\n(.*?)\n\n", user, re.S).groups()
            likely = "A" if self.biased or len(a) > len(b) else "B"
            scores = [{likely: -0.5, "tie": -2.0}.get(o, -3.0) for o in request["options"]]
            on_result(key, {"text": "", "finish_reason": "stop", "scores": scores,
                            "usage": {"prompt_tokens": 1, "completion_tokens": 0}})


@pytest.mark.parametrize("biased", [False, True])
def test_logprob_verdict_is_the_most_likely_answer_in_both_orders(tmp_path: Path, biased: bool) -> None:
    from kd.cache.store import RequestCache
    from kd.config import Judge
    from kd.runtime.ask import Asker

    root = copy_project(tmp_path / "project")
    cfg = Judge(teacher="t", kind="pairwise", template="prompts/feedback/pairwise.jinja", verdict="logprob")
    asker = Asker(ScriptedScorer(biased), RequestCache(tmp_path / "cache"), "judge")
    group = judges.Group("Say hi.", [{"role": "user", "content": "Say hi."}], ["hi", "hello there", "hey"], {})
    [j], prompt = judges.judge(cfg, root, asker, [group])
    assert prompt is not None and asker.new == 6  # one choice request for each of the six orders
    if biased:  # always "A": every pair's two verdicts disagree, so all are ties
        assert j.scores == [0.5, 0.5, 0.5] and j.inconsistent == 3
    else:  # the longer response wins both orders: ranked by length, no inconsistency
        assert j.scores == [0.0, 1.0, 0.5] and j.inconsistent == 0
