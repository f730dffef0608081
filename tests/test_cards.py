"""Dataset cards: README.md in each dataset directory, deterministic, loadable by `datasets`.

Byte-identical rebuilds including the card are checked by test_pipeline_openai (it compares every file).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from kdproject import EXPLAIN, QA_LIMIT, shared_history

from kd.provenance.cards import render_card


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return shared_history(tmp_path_factory)


def test_card_summarises_provenance_and_loads_with_datasets(history, tmp_path):
    root = history["root"]
    card = (root / "data/qa/README.md").read_text()
    manifest = json.loads((root / "data/qa/manifest.json").read_text())
    front, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    assert "task_categories:\n- text-generation" in front and "path: records.jsonl" in front
    assert f"| records | {QA_LIMIT} |" in body and manifest["fingerprint"] in body
    sha = next(t["sha256"] for t in manifest["templates"] if t["path"] == EXPLAIN)
    assert f"| {EXPLAIN} | `{sha}` |" in body and '- model: `"fake"`' in body
    assert f"| seeds/instructions.jsonl | {QA_LIMIT} |" in body
    derived = (root / "data/derived/README.md").read_text()
    assert f"| qa | `{manifest['fingerprint']}` | {QA_LIMIT} |" in derived

    import datasets

    ds = datasets.load_dataset(str(root / "data/qa"), split="train", cache_dir=str(tmp_path / "hf"))
    assert len(ds) == QA_LIMIT  # the card's `configs` keeps rejected.jsonl out of the split


def test_card_lists_rejections_and_is_deterministic():
    manifest = {"name": "sft", "method": "labeling", "records": 1500, "rejected": {"truncated": 3, "empty": 1},
                "fingerprint": "ab" * 32, "files": {"records": "records.jsonl"}, "templates": [], "teacher": None,
                "kd_version": "0.1.0"}
    card = render_card(manifest, [], {"prompt_tokens": 10, "completion_tokens": 5}, "free", {"seeds/x.jsonl": 7})
    assert "| empty | 1 |\n| truncated | 3 |" in card and "- 1K<n<10K" in card and "| seeds/x.jsonl | 7 |" in card
    assert card == render_card(manifest, [], {"prompt_tokens": 10, "completion_tokens": 5}, "free", {"seeds/x.jsonl": 7})


def _build(root, name: str, method: str, records: list[dict[str, Any]], rejected: list[dict[str, Any]]) -> None:
    from kd.records import write_dataset

    rows = [{**r, "provenance": {"method": method, "template": {"path": "t.jinja", "sha256": "ab" * 32},
                                 "parents": [{"dataset": "seeds", "id": f"s{i}"}]}} for i, r in enumerate(records)]
    write_dataset(root / "data" / name, name, method, rows, rejected, {}, None,
                  card=lambda m: render_card(m, [], {}, "free"))


# load_dataset("data/<name>") gives exactly the records (not the rejections) with the columns TRL takes; the
# rejections are a config of their own, declared only when there are any (an empty file would not load).
def test_load_dataset_gives_records_and_a_rejected_config(tmp_path, monkeypatch):
    import datasets
    from studentproject import PREFS, RECORDS

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    rejected = [{"reason": "length", "request_key": "k1", "template": "t.jinja", "text": "It is", "finish_reason": "length",
                 "input": {"seeds": "seeds/q.jsonl", "row": 3}},
                {"reason": "empty", "request_key": "k2", "template": "t.jinja", "text": "", "finish_reason": "stop",
                 "input": {"seeds": "seeds/q.jsonl", "row": 5}}]
    _build(tmp_path, "sft", "labeling", RECORDS, rejected)
    _build(tmp_path, "prefs", "feedback", PREFS, [])
    cache = str(tmp_path / "hf")
    sft = datasets.load_dataset(str(tmp_path / "data/sft"), split="train", cache_dir=cache)
    assert len(sft) == len(RECORDS) and set(sft.column_names) == {"id", "prompt", "completion", "category", "provenance"}
    assert sft[0]["provenance"]["template"]["path"] == "t.jinja"  # reachable, as a column of its own
    assert sorted(sft.remove_columns(["id", "provenance"]).column_names) == ["category", "completion", "prompt"]
    rej = datasets.load_dataset(str(tmp_path / "data/sft"), "rejected", split="train", cache_dir=cache)
    assert sorted(rej["reason"]) == ["empty", "length"]
    prefs = datasets.load_dataset(str(tmp_path / "data/prefs"), split="train", cache_dir=cache)
    assert len(prefs) == len(PREFS) and {"prompt", "chosen", "rejected"} <= set(prefs.column_names)
    assert "config_name: rejected" not in (tmp_path / "data/prefs/README.md").read_text()  # nothing was rejected
    from trl.data_utils import is_conversational

    assert is_conversational(sft[0]) and is_conversational(prefs[0])


# TRL's SFTTrainer prepares the loaded dataset as it is: extra columns (id, provenance) do not get in the way.
def test_sft_trainer_takes_the_loaded_dataset(tmp_path, monkeypatch, tiny_model_dir):
    import datasets
    from studentproject import RECORDS
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    _build(tmp_path, "sft", "labeling", RECORDS, [])
    ds = datasets.load_dataset(str(tmp_path / "data/sft"), split="train", cache_dir=str(tmp_path / "hf"))
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir), train_dataset=ds,
                         processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
                         args=SFTConfig(output_dir=str(tmp_path / "out"), max_steps=1, report_to="none",
                                        use_cpu=True, max_length=64))
    prepared = trainer.train_dataset
    assert len(prepared) == len(RECORDS) and "input_ids" in prepared.column_names
    labels = prepared[0]["labels"]
    assert -100 in labels and any(x != -100 for x in labels)  # the prompt is masked, the answer is learnt
