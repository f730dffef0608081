"""The `openai` backend against a local fake server: retries, refusals, bounds, concurrency, keys."""

from __future__ import annotations

import email.utils
import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from fake_openai import FakeOpenAI, default_answer

from kd.cache.store import request_key
from kd.config import OpenAITeacher as OpenAIConfig
from kd.config import Sampling
from kd.errors import KdError, TeacherError
from kd.runtime.openai import OpenAITeacher, _retry_after

REPO = Path(__file__).resolve().parents[1]


def config(server: FakeOpenAI, **overrides: Any) -> OpenAIConfig:
    fields: dict[str, Any] = {"backend": "openai", "base_url": server.url, "model": "fake", "api_key_env": None,
                              "timeout_s": 2.0, "max_attempts": 6, "backoff_s": 0.01, "backoff_max_s": 0.05}
    return OpenAIConfig(**{**fields, **overrides})


def items(n: int, teacher: OpenAITeacher) -> list[tuple[str, dict[str, Any]]]:
    """n distinct (key, request) pairs shaped like kd.elicit.common.Asker.call builds them."""
    out = []
    for i in range(n):
        request = {"backend": "openai", "teacher": teacher.identity,
                   "messages": [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": f"What is {i} + {i}?"}],
                   "sampling": Sampling(max_tokens=32).model_dump(), "sample_index": 0, "response_format": None}
        out.append((request_key(request), request))
    return out


def ask(teacher: OpenAITeacher, pairs: list[tuple[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    answers: dict[str, dict[str, Any]] = {}
    teacher.generate(pairs, answers.__setitem__)
    return answers


def expected(request: dict[str, Any]) -> str:
    return default_answer(request["messages"])


# ------------------------------------------------------------------------------------------ retries


def test_429_retry_after_is_honoured() -> None:
    # backoff 0: only the server's Retry-After (0.05 s) can explain a wait between the two attempts
    with FakeOpenAI(faults=["429"]) as server:
        teacher = OpenAITeacher("gpt", config(server, backoff_s=0.0, backoff_max_s=0.0))
        [(key, request)] = pairs = items(1, teacher)
        answers = ask(teacher, pairs)
    assert server.received == 2 and server.answered == 1
    assert server.arrivals[1] - server.arrivals[0] >= 0.05
    assert answers[key]["text"] == expected(request)
    assert answers[key]["finish_reason"] == "stop"


@pytest.mark.parametrize("fault", ["500", "502", "503", "timeout", "truncated"])
def test_retryable_fault_is_retried(fault: str) -> None:
    with FakeOpenAI(faults=[fault]) as server:
        teacher = OpenAITeacher("gpt", config(server, timeout_s=0.5))
        [(key, request)] = pairs = items(1, teacher)
        start = time.monotonic()
        answers = ask(teacher, pairs)
        elapsed = time.monotonic() - start
    assert server.received == 2, "one failed attempt, one retry"
    assert server.answered == 1
    assert answers[key]["text"] == expected(request)
    assert elapsed < 1.5  # a timeout costs timeout_s (0.5 s), not the server's 2 s stall


def test_every_fault_in_a_row_is_retried_and_attempts_are_counted_exactly() -> None:
    faults = ["429", "500", "503", "timeout", "truncated"]
    with FakeOpenAI(faults=faults) as server:
        teacher = OpenAITeacher("gpt", config(server, timeout_s=0.3, max_attempts=len(faults) + 1))
        [(key, request)] = pairs = items(1, teacher)
        answers = ask(teacher, pairs)
    assert server.received == len(faults) + 1
    assert teacher.requests_sent == len(faults) + 1
    assert answers[key]["text"] == expected(request)


def test_usage_is_read_from_the_response() -> None:
    with FakeOpenAI() as server:
        teacher = OpenAITeacher("gpt", config(server))
        [(key, request)] = pairs = items(1, teacher)
        answers = ask(teacher, pairs)
    words = sum(len(m["content"].split()) for m in request["messages"])
    assert answers[key]["usage"] == {"prompt_tokens": words, "completion_tokens": len(expected(request).split())}


def test_request_body_carries_model_sampling_and_a_seed_from_the_key() -> None:
    with FakeOpenAI() as server:
        teacher = OpenAITeacher("gpt", config(server))
        [(key, request)] = pairs = items(1, teacher)
        ask(teacher, pairs)
    body = server.bodies[0]
    assert body["model"] == "fake" and body["messages"] == request["messages"]
    assert body["max_tokens"] == 32 and body["temperature"] == 0.0 and body["n"] == 1
    assert body["seed"] == int(key[:8], 16)
    assert "stop" not in body  # an empty stop list is not sent


# ------------------------------------------------------------------------------------------ refusals and bounds


@pytest.mark.parametrize("status", ["401", "403", "404"])
def test_client_errors_are_not_retried(status: str) -> None:
    with FakeOpenAI(faults=[status]) as server:
        teacher = OpenAITeacher("gpt", config(server))
        with pytest.raises(TeacherError) as err:
            ask(teacher, items(1, teacher))
    assert server.received == 1
    message = str(err.value)
    assert "'gpt'" in message and f"HTTP {status}" in message


def test_always_failing_server_gets_exactly_max_attempts() -> None:
    with FakeOpenAI(faults=["500"] * 20) as server:
        teacher = OpenAITeacher("gpt", config(server, max_attempts=3, backoff_s=0.0))
        with pytest.raises(TeacherError) as err:
            ask(teacher, items(1, teacher))
    assert server.received == 3
    message = str(err.value)
    assert "'gpt'" in message and "3 times" in message and "cached" in message and "HTTP 500" in message


def test_answers_before_a_fatal_failure_are_delivered() -> None:
    # concurrency 1: the first two answers reach on_result (to be cached) before the third request is refused
    with FakeOpenAI(faults=["ok", "ok", "401"]) as server:
        teacher = OpenAITeacher("gpt", config(server, concurrency=1))
        pairs = items(4, teacher)
        answers: dict[str, dict[str, Any]] = {}
        with pytest.raises(TeacherError):
            teacher.generate(pairs, answers.__setitem__)
    assert server.received == 3
    assert sorted(answers) == sorted(k for k, _ in pairs[:2])


def test_error_from_an_html_error_page_is_one_line() -> None:
    # Regression: a reverse proxy's multi-line 502 page made the stage's `kd: error:` message span lines.
    with FakeOpenAI(faults=["502"] * 5) as server:
        teacher = OpenAITeacher("gpt", config(server, max_attempts=2, backoff_s=0.0))
        with pytest.raises(TeacherError) as err:
            ask(teacher, items(1, teacher))
    assert "HTTP 502" in str(err.value)
    assert "\n" not in str(err.value) and "\r" not in str(err.value)


def test_length_finish_comes_back_as_length() -> None:
    with FakeOpenAI(faults=["length"]) as server:
        teacher = OpenAITeacher("gpt", config(server))
        [(key, request)] = pairs = items(1, teacher)
        answers = ask(teacher, pairs)
    assert server.received == 1
    assert answers[key]["finish_reason"] == "length"
    assert answers[key]["text"] == expected(request)


def test_length_finish_becomes_a_truncated_rejection_in_labeling(tmp_path: Path) -> None:
    from kd.elicit.build import build_dataset
    from kd.elicit.labeling import label

    for d in ("prompts", "seeds"):
        shutil.copytree(REPO / d, tmp_path / d)
    with FakeOpenAI(faults=["length"]) as server:
        teacher = {"backend": "openai", "base_url": server.url, "model": "fake", "api_key_env": None,
                   "concurrency": 1, "timeout_s": 2, "backoff_s": 0.01}
        dataset = {"method": "labeling", "teacher": "fake", "inputs": [{"seeds": "seeds/instructions.jsonl", "limit": 4}],
                   "template": "prompts/labeling/answer.jinja", "sampling": {"max_tokens": 32}}
        params = {"teachers": {"fake": teacher}, "datasets": {"qa": dataset}}
        (tmp_path / "params.yaml").write_text(json.dumps(params), encoding="utf-8")  # JSON is YAML
        line = build_dataset("qa", "labeling", label, tmp_path)
    assert server.received == 4
    assert "3 records" in line and "1 rejected" in line
    records = (tmp_path / "data/qa/records.jsonl").read_text().splitlines()
    rejected = [json.loads(x) for x in (tmp_path / "data/qa/rejected.jsonl").read_text().splitlines()]
    assert len(records) == 3
    assert [r["reason"] for r in rejected] == ["truncated"]
    assert rejected[0]["finish_reason"] == "length"
    manifest = json.loads((tmp_path / "data/qa/manifest.json").read_text())
    assert manifest["rejected"] == {"truncated": 1}


# ------------------------------------------------------------------------------------------ concurrency


def test_requests_run_concurrently_up_to_the_bound() -> None:
    with FakeOpenAI(latency_s=0.2) as server:
        teacher = OpenAITeacher("gpt", config(server, concurrency=8))
        pairs = items(16, teacher)
        start = time.monotonic()
        answers = ask(teacher, pairs)
        elapsed = time.monotonic() - start
    assert len(answers) == 16 and server.received == 16
    assert elapsed < 2.0, f"16 requests of 0.2 s at concurrency 8 took {elapsed:.2f} s (serial would be 3.2 s)"
    assert 1 < server.max_in_flight <= 8


def test_concurrency_bound_is_never_exceeded() -> None:
    with FakeOpenAI(latency_s=0.05) as server:
        teacher = OpenAITeacher("gpt", config(server, concurrency=2))
        ask(teacher, items(6, teacher))
    assert server.received == 6
    assert server.max_in_flight == 2


# ------------------------------------------------------------------------------------------ API key


def test_missing_api_key_env_names_the_key_and_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KD_TEST_MISSING_KEY", raising=False)
    with FakeOpenAI() as server, pytest.raises(KdError) as err:
        OpenAITeacher("gpt", config(server, api_key_env="KD_TEST_MISSING_KEY"))
    assert "teachers.gpt.api_key_env" in str(err.value)
    assert "KD_TEST_MISSING_KEY" in str(err.value)


def test_api_key_is_sent_as_bearer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KD_TEST_KEY", "sk-test-right-key-0123456789")
    with FakeOpenAI(api_key="sk-test-right-key-0123456789") as server:
        teacher = OpenAITeacher("gpt", config(server, api_key_env="KD_TEST_KEY"))
        answers = ask(teacher, items(2, teacher))
    assert len(answers) == 2 and server.answered == 2
    auth = [{k.lower(): v for k, v in h.items()}["authorization"] for h in server.headers]
    assert auth == ["Bearer sk-test-right-key-0123456789"] * 2
    assert "sk-test-right-key" not in json.dumps(server.bodies)


@pytest.mark.parametrize("length", [24, 400])
def test_wrong_key_echoed_by_the_server_is_scrubbed(monkeypatch: pytest.MonkeyPatch, length: int) -> None:
    # Regression (length 400): the body was cut to 300 characters before the key was scrubbed, so a key
    # straddling the cut leaked its first few hundred characters into the error message.
    wrong = "sk-wrong-" + "ab" * (length // 2)
    monkeypatch.setenv("KD_TEST_KEY", wrong)
    with FakeOpenAI(api_key="sk-the-right-one-0123456789") as server:
        teacher = OpenAITeacher("gpt", config(server, api_key_env="KD_TEST_KEY"))
        with pytest.raises(TeacherError) as err:
            ask(teacher, items(1, teacher))
    assert server.received == 1
    assert "HTTP 401" in str(err.value) and "'gpt'" in str(err.value)
    assert wrong[:16] not in str(err.value)


# ------------------------------------------------------------------------------------------ Retry-After parsing


def test_retry_after_parses_seconds_and_dates() -> None:
    assert _retry_after("0.05") == 0.05
    assert _retry_after("-3") == 0.0
    assert _retry_after(None) is None and _retry_after("soon") is None
    future = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 < _retry_after(future) <= 30


# ------------------------------------------------------------------------------------------ who answered


# Regression: answers did not record the server (endpoint) nor the model it reported, so pointing base_url at
# another server with the same `model` left no trace in provenance.
def test_each_answer_records_the_endpoint_and_the_model_the_server_reported() -> None:
    with FakeOpenAI(served_model="fake-2026-01-01\x1b\x07") as server:  # control characters are dropped
        teacher = OpenAITeacher("gpt", config(server))
        answers = ask(teacher, items(2, teacher))
    host = server.url.removesuffix("/v1")
    assert [a["served_by"] for a in answers.values()] == [{"endpoint": host, "model": "fake-2026-01-01"}] * 2
    assert "base_url" not in json.dumps(teacher.identity) and host not in json.dumps(teacher.identity)


# Regression: a key typed into api_key_env was echoed by "environment variable … is not set".
def test_a_key_typed_as_the_variable_name_is_never_echoed() -> None:
    key = "gsk_" + "A1b2C3d4" * 7
    with FakeOpenAI() as server:
        cfg = config(server).model_copy(update={"api_key_env": key})  # as if validation had been bypassed
        with pytest.raises(KdError) as err:
            OpenAITeacher("gpt", cfg)
    assert "teachers.gpt.api_key_env" in str(err.value) and key[:10] not in str(err.value)
