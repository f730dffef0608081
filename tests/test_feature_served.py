"""Served feature capture: a vLLM-style server's prompt log-probs give the local capture's top-k (issue 12, item 4)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from fake_openai import FakeOpenAI, model_prompt_logprobs
from test_feature import RECORDS

from kd.config import Feature, load_params
from kd.config import LocalTeacher as LocalConfig
from kd.config import OpenAITeacher as OpenAIConfig
from kd.elicit.feature import elicit_features
from kd.errors import KdError
from kd.records import read_jsonl, write_dataset
from kd.runtime.local import LocalTeacher
from kd.runtime.logits import load_logits
from kd.runtime.served import ServedFeatures

CFG = Feature(method="feature", teacher="tiny", dataset="src", top_k=20, max_length=96, batch_size=2)


@pytest.fixture(scope="module")
def logprobs(tiny_model_dir: Path):
    return model_prompt_logprobs(tiny_model_dir)


def served(url: str, model_dir: Path, **kw) -> OpenAIConfig:
    return OpenAIConfig(backend="openai", base_url=url, model="tiny", api_key_env=None, tokenizer=str(model_dir),
                        **{"backoff_s": 0.0, "concurrency": 4, **kw})


def capture(root: Path, teacher) -> dict:
    write_dataset(root / "data" / "src", "src", "labeling", RECORDS, [], {}, None)
    return elicit_features("logits", CFG, teacher, root / "data", root / "cache")


# issue 12 item 4: feature capture needed the teacher in-process; a server's prompt log-probs must give the same
def test_served_capture_equals_local_and_reruns_ask_nothing(tmp_path: Path, tiny_model_dir: Path, logprobs,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    local = LocalTeacher("tiny", LocalConfig(backend="local", path=str(tiny_model_dir), dtype="float32"), tmp_path)
    assert capture(tmp_path / "local", local)["new"] == 4
    with FakeOpenAI(prompt_logprobs=logprobs, faults=["500"]) as server:  # a 5xx is retried by the same client
        teacher = ServedFeatures("tiny", served(server.url, tiny_model_dir), tmp_path)
        result = capture(tmp_path / "served", teacher)
        assert result["new"] == 4 and server.received == 5
        body = server.bodies[-1]
        assert body["prompt_logprobs"] == 20 and body["max_tokens"] == 1 and isinstance(body["prompt"][0], int)
        rerun = capture(tmp_path / "served", ServedFeatures("tiny", served(server.url, tiny_model_dir), tmp_path))
        assert rerun["cached"] == 4 and rerun["new"] == 0 and server.received == 5  # the feature cache answered
    a, b = load_logits(tmp_path / "local" / "data" / "logits"), load_logits(tmp_path / "served" / "data" / "logits")
    assert a.manifest["tokenizer_digest"] == b.manifest["tokenizer_digest"]  # students are checked as for local
    assert sorted(r["source_id"] for r in a.records) == sorted(r["source_id"] for r in b.records)
    for rec in a.records:
        x, y = a.get(rec["source_id"]), b.get(rec["source_id"])
        assert torch.equal(x.input_ids, y.input_ids) and x.completion_start == y.completion_start
        assert (x.topk_ids == y.topk_ids).float().mean() > 0.99  # near-ties may swap
        torch.testing.assert_close(y.topk_logprobs.float(), x.topk_logprobs.float(), atol=1e-3, rtol=0)
        torch.testing.assert_close(y.tail_logprob.float(), x.tail_logprob.float(), atol=1e-3, rtol=0)


# issue 12 item 4: a request the server refuses rejects that record only, as chat requests do; not cached
def test_served_refusal_rejects_one_record(tmp_path: Path, tiny_model_dir: Path, logprobs,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with FakeOpenAI(prompt_logprobs=logprobs, faults=["context"]) as server:
        cfg = served(server.url, tiny_model_dir, concurrency=1)
        result = capture(tmp_path, ServedFeatures("tiny", cfg, tmp_path))
        assert result["manifest"]["records"] == 3 and result["manifest"]["rejected"]["too_long"] == 1
        rejected = read_jsonl(tmp_path / "data" / "logits" / "rejected.jsonl")
        assert any("maximum context length" in r.get("detail", "") for r in rejected)
        again = capture(tmp_path, ServedFeatures("tiny", cfg, tmp_path))
        assert again["cached"] == 3 and again["new"] == 1 and again["manifest"]["records"] == 4


# issue 12 item 4: a server that does not return enough prompt log-probs fails in one line, naming the flag
def test_too_few_logprobs_names_the_vllm_flag(tmp_path: Path, tiny_model_dir: Path, logprobs,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with FakeOpenAI(prompt_logprobs=lambda ids, k: logprobs(ids, 5)) as server:
        cfg = served(server.url, tiny_model_dir, max_attempts=1)
        with pytest.raises(KdError, match="max-logprobs"):
            capture(tmp_path, ServedFeatures("tiny", cfg, tmp_path))


# issue 12 item 4: vLLM refusing a top_k above its --max-logprobs must fail the stage, not reject every record
def test_top_k_over_the_server_limit_fails_the_stage(tmp_path: Path, tiny_model_dir: Path, logprobs,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with FakeOpenAI(prompt_logprobs=logprobs, max_logprobs=10) as server:
        with pytest.raises(KdError, match="greater than max allowed: 10"):
            capture(tmp_path, ServedFeatures("tiny", served(server.url, tiny_model_dir), tmp_path))
        assert not (tmp_path / "data" / "logits").exists()


# issue 12 item 4: an openai feature teacher without its tokenizer must be refused naming the key, before any request
def test_served_feature_teacher_needs_a_tokenizer(project: Path, tiny_model_dir: Path, logprobs,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from kd.elicit.feature import build_features

    monkeypatch.chdir(project)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["teachers"]["served"] = {"backend": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "tiny",
                                    "api_key_env": None}
    params["datasets"]["sft_logits"].update(teacher="served", max_length=96)
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(KdError, match=r"teachers\.served\.tokenizer"):
        load_params(project)
    write_dataset(project / "data" / "sft", "sft", "labeling", RECORDS, [], {}, None)
    with FakeOpenAI(prompt_logprobs=logprobs) as server:
        params["teachers"]["served"].update(tokenizer=str(tiny_model_dir), base_url=server.url)
        (project / "params.yaml").write_text(yaml.safe_dump(params))
        line = build_features("sft_logits", project)
        assert line.startswith("sft_logits: 4 records (0 cached, 4 new, 1 rejected) in ") and server.received == 4
