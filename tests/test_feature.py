"""Feature elicitation: stored top-k logits equal a direct forward, are incremental, and refuse other tokenizers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from kd.cache.features import FeatureCache
from kd.config import Feature
from kd.config import LocalTeacher as LocalConfig
from kd.elicit.feature import elicit_features
from kd.errors import KdError
from kd.records import read_jsonl, write_dataset
from kd.runtime.local import LocalTeacher
from kd.runtime.logits import check_compatible, load_logits


def conv(i: int, answer: str, question: str = "") -> dict:
    return {"prompt": [{"role": "system", "content": "Be brief."},
                       {"role": "user", "content": question or f"Question number {i}: what is {i} + {i}?"}],
            "completion": [{"role": "assistant", "content": answer}], "category": ""}


RECORDS = [conv(1, "It is 2."), conv(2, "Four, because two and two make four."),
           conv(3, "Six. " * 60),  # cut at max_length: the completion is truncated, not dropped
           conv(4, "Eight, since 4 + 4 = 8 and that is all."),
           conv(5, "Ten.", question="word " * 200)]  # prompt alone exceeds max_length -> rejected


def write_source(data: Path, records: list[dict]) -> None:
    write_dataset(data / "src", "src", "labeling", records, [], {}, None)


def run(tmp_path: Path, model_dir: Path, top_k: int = 20) -> dict:
    cfg = Feature(method="feature", teacher="tiny", dataset="src", top_k=top_k, max_length=96, batch_size=2)
    teacher = LocalTeacher("tiny", LocalConfig(backend="local", path=str(model_dir), dtype="float32"), tmp_path)
    return elicit_features("logits", cfg, teacher, tmp_path / "data", tmp_path / "cache")


def outputs(tmp_path: Path) -> dict[str, bytes]:
    out = tmp_path / "data" / "logits"
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


@pytest.fixture
def built(tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    monkeypatch.chdir(tmp_path)  # the teacher digest memo lives under the working directory
    write_source(tmp_path / "data", RECORDS)
    return run(tmp_path, tiny_model_dir)


def test_stored_topk_equals_direct_forward(built: dict, tmp_path: Path, tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    assert built["new"] == 4 and built["cached"] == 0
    store = load_logits(tmp_path / "data" / "logits")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    for rec in store.records:  # every record, so each padding position in its batch is covered
        row = store.get(rec["source_id"])
        c = len(row.input_ids) - row.completion_start
        assert row.topk_ids.shape == row.topk_logprobs.shape == (c, 20) and row.tail_logprob.shape == (c,)
        with torch.no_grad():
            logits = model(row.input_ids[None]).logits[0]
        # Row j is the distribution predicting input_ids[completion_start + j], i.e. the logits one position earlier.
        logp = torch.log_softmax(logits[row.completion_start - 1:-1].float(), dim=-1)
        values, ids = logp.topk(20, dim=-1)
        torch.testing.assert_close(row.topk_logprobs, values, atol=1e-2, rtol=1e-3)
        # Ids may swap between near-ties, so check each stored id's own log-prob rather than the order.
        torch.testing.assert_close(logp.gather(-1, row.topk_ids), row.topk_logprobs, atol=1e-2, rtol=1e-3)
        assert (row.topk_ids == ids).float().mean() > 0.9
        tail = torch.log1p(-values.exp().sum(-1).clamp_max(1 - 1e-7))
        torch.testing.assert_close(row.tail_logprob, tail, atol=2e-2, rtol=1e-3)


def test_rows_align_with_completion_tokens(built: dict, tmp_path: Path, tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    from kd.runtime.tokenize import encode

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    store = load_logits(tmp_path / "data" / "logits")
    sources = {r["id"]: r for r in read_jsonl(tmp_path / "data" / "src" / "records.jsonl")}
    for rec in store.records:
        row = store.get(rec["source_id"])
        ids, start = encode(tok, sources[rec["source_id"]], 96)
        assert row.input_ids.tolist() == ids and row.completion_start == start
        assert rec["completion_tokens"] == len(ids) - start == row.topk_ids.shape[0]
    assert max(r["tokens"] for r in store.records) == 96  # the long answer was cut, not dropped
    rejected = read_jsonl(tmp_path / "data" / "logits" / "rejected.jsonl")
    assert [r["reason"] for r in rejected] == ["empty_completion"]
    assert store.manifest["rejected"] == {"empty_completion": 1}
    assert store.manifest["source"]["name"] == "src" and store.manifest["top_k"] == 20


def test_rerun_is_cached_and_byte_identical(built: dict, tmp_path: Path, tiny_model_dir: Path) -> None:
    before = outputs(tmp_path)
    again = run(tmp_path, tiny_model_dir)
    assert (again["cached"], again["new"]) == (4, 0)
    # Regression: with several safetensors metadata keys (written in hash order) reruns differed in bytes.
    assert outputs(tmp_path) == before


def test_changed_record_recomputes_exactly_one(built: dict, tmp_path: Path, tiny_model_dir: Path) -> None:
    changed = [*RECORDS[:1], conv(2, "Four."), *RECORDS[2:]]
    write_source(tmp_path / "data", changed)
    again = run(tmp_path, tiny_model_dir)
    assert (again["cached"], again["new"]) == (3, 1)


def test_damaged_cache_entry_is_regenerated(built: dict, tmp_path: Path, tiny_model_dir: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    before = outputs(tmp_path)
    entries = sorted((tmp_path / "cache").rglob("*.safetensors"))
    assert len(entries) == 4
    entries[0].write_bytes(entries[0].read_bytes()[:100])  # a torn write
    again = run(tmp_path, tiny_model_dir)
    assert (again["cached"], again["new"]) == (3, 1)
    assert "damaged" in capsys.readouterr().err
    assert outputs(tmp_path) == before
    assert FeatureCache(tmp_path / "cache").path(entries[0].stem).exists()


def test_other_tokenizer_is_refused(built: dict, tmp_path: Path, tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    store = load_logits(tmp_path / "data" / "logits")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    check_compatible(store, tok, store.teacher)  # the teacher's own tokenizer is fine
    tok.add_tokens(["<student_only_token>"])  # another vocabulary: ids would mean other tokens
    with pytest.raises(KdError, match="logits dataset 'logits'.*tokenizer"):
        check_compatible(store, tok)
    with pytest.raises(KdError, match="logits dataset 'logits'.*teacher"):
        check_compatible(store, AutoTokenizer.from_pretrained(tiny_model_dir), {"model": "other", "digest": "0" * 64})


def test_compact_storage(built: dict, tmp_path: Path) -> None:
    manifest = json.loads((tmp_path / "data" / "logits" / "manifest.json").read_text())
    assert manifest["bytes_per_token"] <= 300  # the target at k = 20 (DistillKit ≈ 300)
    size = (tmp_path / "data" / "logits" / "logits.safetensors").stat().st_size
    assert size / manifest["completion_tokens"] == pytest.approx(manifest["bytes_per_token"], abs=0.1)


def test_stage_summary_line(project: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kd.elicit.feature import build_features

    monkeypatch.chdir(project)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["teachers"]["smollm2"]["path"] = str(tiny_model_dir)
    params["datasets"]["sft_logits"].update(max_length=96, batch_size=4)
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    write_dataset(project / "data" / "sft", "sft", "labeling", RECORDS, [], {}, None)
    line = build_features("sft_logits", project)
    assert line.startswith("sft_logits: 4 records (0 cached, 4 new, 1 rejected) in ")
    assert build_features("sft_logits", project).startswith("sft_logits: 4 records (4 cached, 0 new")
    metrics = json.loads((project / "metrics" / "sft_logits.json").read_text())
    assert metrics["records"] == 4 and metrics["bytes_per_token"] <= 300
