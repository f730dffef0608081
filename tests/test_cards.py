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
