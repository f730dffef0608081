"""Datasets: content ids, stable bytes, atomic writes, load_dataset compatibility."""

from __future__ import annotations

import json
import random

import pytest

from kd.errors import KdError
from kd.records import content_id, fingerprint, read_dataset, read_jsonl, write_dataset


def rec(i: int, completion: str = "c") -> dict:
    return {"prompt": [{"role": "user", "content": f"q{i}"}], "completion": [{"role": "assistant", "content": completion}],
            "category": "x", "provenance": {"method": "labeling", "stage": "t", "requests": [], "parents": [],
                                            "seeds": [{"file": "s.jsonl", "id": str(i)}], "filters": []}}


def test_id_covers_content_not_provenance():
    a, b = rec(1), rec(1)
    b["provenance"]["seeds"] = []
    assert content_id(a) == content_id(b)
    assert content_id(rec(1)) != content_id(rec(1, completion="d"))


def test_same_records_in_any_order_give_identical_bytes(tmp_path):
    records = [rec(i) for i in range(20)]
    m1 = write_dataset(tmp_path / "a", "ds", "labeling", records, [{"reason": "truncated", "text": "t"}], {}, None)
    shuffled = records[:]
    random.Random(1).shuffle(shuffled)
    m2 = write_dataset(tmp_path / "b", "ds", "labeling", shuffled, [{"reason": "truncated", "text": "t"}], {}, None)
    for f in ("records.jsonl", "rejected.jsonl", "manifest.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    assert m1["fingerprint"] == m2["fingerprint"] == fingerprint(sorted(content_id(r) for r in records))
    ids = [json.loads(line)["id"] for line in (tmp_path / "a/records.jsonl").read_text().splitlines()]
    assert ids == sorted(ids)


def test_duplicates_become_counted_rejections(tmp_path):
    manifest = write_dataset(tmp_path / "d", "ds", "labeling", [rec(1), rec(1), rec(2)], [], {}, None)
    assert manifest["records"] == 2 and manifest["rejected"] == {"duplicate": 1}


def test_failed_write_leaves_previous_dataset_whole(tmp_path, monkeypatch):
    write_dataset(tmp_path / "d", "ds", "labeling", [rec(1)], [], {}, None)
    before = (tmp_path / "d/records.jsonl").read_bytes()
    bad = rec(2)
    bad["score"] = float("nan")  # not JSON: the write fails midway
    with pytest.raises(ValueError):
        write_dataset(tmp_path / "d", "ds", "labeling", [rec(3), bad], [], {}, None)
    assert (tmp_path / "d/records.jsonl").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no temporary left behind


def test_loadable_with_datasets(tmp_path):
    import datasets

    write_dataset(tmp_path / "d", "ds", "labeling", [rec(i) for i in range(5)], [], {}, None)
    ds = datasets.load_dataset("json", data_files=str(tmp_path / "d/records.jsonl"), split="train")
    assert len(ds) == 5 and ds[0]["completion"][0]["role"] == "assistant"
    manifest, records = read_dataset(tmp_path / "d")
    assert [r["id"] for r in records] == ds["id"]


def test_bad_jsonl_line_is_named(tmp_path):
    (tmp_path / "s.jsonl").write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(KdError, match=r"s\.jsonl:2: expected a JSON object"):
        read_jsonl(tmp_path / "s.jsonl")
