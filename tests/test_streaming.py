"""Streamed stages (issue 12): a labeling stage renders each prompt once, reads each cache entry once, hands
requests to the server backend only as fast as it answers them, and writes the dataset through an id index with
the bytes the list-based writer gave."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import pytest
from fake_openai import FakeOpenAI

from kd.records import DatasetWriter, iter_dataset, write_dataset

REPO = Path(__file__).resolve().parents[1]


def project(root: Path, url: str, n: int = 12, concurrency: int = 2) -> Path:
    for d in ("prompts", "seeds"):
        shutil.copytree(REPO / d, root / d, dirs_exist_ok=True)
    rows = [{"id": f"s{i}", "instruction": f"Explain fact number {i} in one line.", "category": "qa"}
            for i in range(n)]
    rows.append(dict(rows[0]))  # the same request twice: asked once, counted once
    rows[-1]["id"] = "dup"
    (root / "seeds/many.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    teacher = {"backend": "openai", "base_url": url, "model": "fake", "api_key_env": None,
               "concurrency": concurrency, "timeout_s": 5, "max_attempts": 2, "backoff_s": 0.01}
    dataset = {"method": "labeling", "teacher": "t", "inputs": [{"seeds": "seeds/many.jsonl"}],
               "template": "prompts/labeling/answer.jinja", "sampling": {"max_tokens": 32}}
    (root / "params.yaml").write_text(json.dumps({"teachers": {"t": teacher}, "datasets": {"qa": dataset}}))
    return root


def build(root: Path) -> str:
    from kd.elicit.build import build_dataset
    from kd.elicit.labeling import label

    return build_dataset("qa", "labeling", label, root)


class Counts:
    """How often prompts are rendered and cache entries read or peeked at during one build."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from kd.cache.store import RequestCache
        from kd.prompts import Prompt

        self.renders = self.reads = self.entries = 0
        render, read, get_entry = Prompt.render, RequestCache.read_many, RequestCache.get_entry

        def counted_render(prompt: Any, *a: Any, **k: Any) -> Any:
            self.renders += 1
            return render(prompt, *a, **k)

        def counted_read(cache: Any, keys: Any) -> Any:
            keys = list(keys)
            self.reads += len(set(keys))
            return read(cache, keys)

        def counted_entry(cache: Any, key: str) -> Any:
            self.entries += 1
            return get_entry(cache, key)

        monkeypatch.setattr(Prompt, "render", counted_render)
        monkeypatch.setattr(RequestCache, "read_many", counted_read)
        monkeypatch.setattr(RequestCache, "get_entry", counted_entry)


# Regression: the forecast rendered every prompt and read every cache entry, then the build did it all again.
def test_a_labeling_build_renders_each_prompt_once_and_reads_each_entry_once(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch,
                                                                            capsys: pytest.CaptureFixture[str]) -> None:
    with FakeOpenAI() as server:
        root = project(tmp_path / "p", server.url)
        counts = Counts(monkeypatch)
        line = build(root)
        assert server.received == 12  # 13 inputs, one of them the same request again
        assert (counts.renders, counts.reads, counts.entries) == (13, 12, 0)  # each distinct entry read once
        assert line.startswith("qa: 12 records (0 cached, 12 new, 1 rejected)")  # the duplicate record
        first = {f: (root / "data/qa" / f).read_bytes() for f in ("records.jsonl", "rejected.jsonl", "manifest.json")}
        assert "qa: forecast 12 new teacher requests (0 cached)" in capsys.readouterr().out

        shutil.rmtree(root / "data/qa")  # what `dvc repro -f` does: every answer is cached now
        counts = Counts(monkeypatch)
        line = build(root)
        assert server.received == 12
        # nothing rendered: the render memo knows each unchanged row's request key
        assert (counts.renders, counts.reads, counts.entries) == (0, 12, 0)
        assert line.startswith("qa: 12 records (12 cached, 0 new, 1 rejected)")
        assert {f: (root / "data/qa" / f).read_bytes() for f in first} == first
    metrics = json.loads((root / "metrics/qa.json").read_text())
    assert metrics["requests"] == 12  # the repeated request's tokens are counted once


# Regression: the OpenAI backend made one task per request up front (1M tasks for a 1M-request stage).
def test_the_server_backend_takes_requests_only_as_fast_as_it_answers() -> None:
    from kd.cache.store import request_key
    from kd.config import OpenAITeacher as OpenAIConfig
    from kd.runtime.openai import OpenAITeacher

    with FakeOpenAI(latency_s=0.02) as server:
        teacher = OpenAITeacher("t", OpenAIConfig(backend="openai", base_url=server.url, model="fake",
                                                  api_key_env=None, concurrency=3))
        taken, ahead = [0], []

        def items():
            for i in range(30):
                request = {"messages": [{"role": "user", "content": f"q{i}"}],
                           "sampling": {"temperature": 0.0, "top_p": 1.0, "max_tokens": 8, "stop": []}}
                taken[0] += 1
                yield request_key(request), request

        answered = []

        def on_result(key: str, response: dict[str, Any]) -> None:
            answered.append(key)
            ahead.append(taken[0] - len(answered))

        teacher.generate(items(), on_result)
    assert len(answered) == 30 and len(set(answered)) == 30
    assert max(ahead) <= 3  # never more requests taken than answered plus those in flight


def rows(n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [{"prompt": f"q{rng.randrange(n // 2)}", "completion": "a", "provenance": {"n": i}} for i in range(n)]


def reference(records: list[dict[str, Any]]) -> bytes:
    """The list-based writer's rule: first of each id kept, sorted by id, one sorted-keys JSON line each."""
    from kd.records import finalize

    by_id: dict[str, dict] = {}
    for r in map(finalize, records):
        by_id.setdefault(r["id"], r)
    return "".join(json.dumps(by_id[i], sort_keys=True, ensure_ascii=False) + "\n" for i in sorted(by_id)).encode()


# Regression: the dataset was built as one list and one string in memory; the streamed writer must give the same bytes.
def test_the_streamed_writer_gives_the_bytes_of_sorting_in_memory(tmp_path: Path) -> None:
    records = rows(400, 1)
    manifest = write_dataset(tmp_path / "d", "d", "labeling", records, [{"reason": "empty", "text": ""}], {}, None)
    assert (tmp_path / "d/records.jsonl").read_bytes() == reference(records)
    assert manifest["rejected"] == {"duplicate": 400 - manifest["records"], "empty": 1}
    shuffled = records[:]
    random.Random(2).shuffle(shuffled)
    write_dataset(tmp_path / "e", "e", "labeling", shuffled, [{"reason": "empty", "text": ""}], {}, None)
    # the same records in another order: the same ids in the same order (which duplicate's provenance is kept
    # follows arrival: the first)
    assert (tmp_path / "e/records.jsonl").read_bytes() == reference(shuffled)
    assert json.loads((tmp_path / "e/manifest.json").read_text())["fingerprint"] == manifest["fingerprint"]
    assert [r["id"] for r in iter_dataset(tmp_path / "d")] == sorted({r["id"] for r in iter_dataset(tmp_path / "d")})


# Regression: a stage that fails while writing must leave neither the dataset nor its spool behind.
def test_an_aborted_writer_leaves_nothing(tmp_path: Path) -> None:
    writer = DatasetWriter(tmp_path / "d", "d", "labeling")
    writer.add({"prompt": "q", "completion": "a"})
    writer.abort()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError):
        write_dataset(tmp_path / "d", "d", "labeling", [{"prompt": float("nan")}], [], {}, None)
    assert list(tmp_path.iterdir()) == []


# Regression: after a one-row edit, planning (what `kd status` and the stage print) rendered every row again.
def test_an_edited_row_is_the_only_one_rendered_and_a_lost_memo_only_costs_time(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from kd.cache.store import RequestCache
    from kd.config import load_params
    from kd.elicit.build import plan_streamed
    from kd.elicit.labeling import label

    def forecast() -> tuple[Any, Counts]:
        counts = Counts(monkeypatch)
        fc, plan, _ = plan_streamed("qa", label, load_params(root), root, RequestCache(root / ".kd/cache"),
                                    root / "data", spool=False)
        plan.discard()
        return fc, counts

    with FakeOpenAI() as server:
        root = project(tmp_path / "p", server.url)
        build(root)
    seeds = root / "seeds/many.jsonl"
    lines = seeds.read_text().splitlines(keepends=True)
    lines[3] = lines[3].replace("fact number 3", "fact number three")
    seeds.write_text("".join(lines))
    fc, counts = forecast()
    assert (fc.new, fc.cached, counts.renders) == (1, 11, 1)
    # a template edit changes every memo key: all rendered again (a comment renders the same requests: 1 new)
    template = root / "prompts/labeling/answer.jinja"
    template.write_text(template.read_text() + "\n{# edited #}")
    fc, counts = forecast()
    assert (fc.new, fc.cached, counts.renders) == (1, 11, 13)
    # a damaged memo file is no memo: the same forecast, from rendering everything
    template.write_text(template.read_text().replace("\n{# edited #}", ""))
    (root / ".kd/cache/renders.sqlite3").write_bytes(b"not a database" * 100)
    fc, counts = forecast()
    assert (fc.new, fc.cached, counts.renders) == (1, 11, 13)


# Regression guard for the fast key check: an entry whose request was changed and re-checksummed (so only the
# request-to-key hash can tell) is refused, and a sound one passes, whichever way its request is hashed.
def test_an_entry_for_another_request_is_refused() -> None:
    from kd.cache.store import check_entry, make_entry, request_key

    request = {"backend": "openai", "teacher": {"backend": "openai", "model": "m", "revision": None},
               "messages": [{"role": "user", "content": 'a ,"quoted", value'}], "sample_index": 0,
               "sampling": {"max_tokens": 8, "stop": [], "temperature": 0.0, "top_p": 1.0}, "response_format": None}
    response = {"text": "t", "finish_reason": "stop", "usage": {"prompt_tokens": 1, "completion_tokens": 1}}
    key = request_key(request)
    assert check_entry(make_entry(key, request, response), key) is None
    other = {**request, "sample_index": 1}
    assert check_entry(make_entry(key, other, response), key) == "the request it holds does not hash to its key"
    scoring = {"kind": "loglik", "teacher": request["teacher"], "messages": [], "completion": "x"}  # no backend
    assert check_entry(make_entry(request_key(scoring), scoring, response), request_key(scoring)) is None


# Guards make_entry's one serialisation: its bytes are the canonical JSON of the whole entry.
def test_an_entry_is_its_canonical_json() -> None:
    from kd.cache.store import CACHE_FORMAT, make_entry
    from kd.records import canonical_json, sha256_text

    request, response = {"backend": "b", "messages": [{"content": "é \"x\""}]}, {"text": "ü", "usage": {}}
    body = {"request": request, "response": response}
    entry = {"cache_format": CACHE_FORMAT, "key": "k" * 64, "checksum": sha256_text(canonical_json(body)), **body}
    assert make_entry("k" * 64, request, response) == canonical_json(entry).encode()
