"""The feature cache: one teacher top-k result per source record, so a rerun scores only new records.

`.kd/cache/features/<key[:2]>/<key>.safetensors`, keyed by what determines it (teacher identity with its
resolved dtype, token ids, k, format) and written atomically as each batch finishes: an interrupted feature
stage loses at most the batch in flight. Entries are verified on read; a damaged one is reported and recomputed.
"""

from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kd.records import canonical_json, sha256_text

FORMAT = 1  # of an entry and of a feature dataset's logits file
TENSORS = ("input_ids", "topk_ids", "topk_logprobs", "tail_logprob")


@dataclass(frozen=True)
class Item:
    """One source record to score: its ids, where the completion starts, and its cache key."""

    source: dict[str, Any]
    ids: list[int]
    start: int
    key: str


def feature_key(teacher: dict[str, Any], ids: list[int], top_k: int) -> str:
    """sha256 of exactly what decides a record's stored features."""
    return sha256_text(canonical_json({"teacher": teacher, "input_ids": ids, "top_k": top_k,
                                       "format": FORMAT, "kind": "feature"}))


class FeatureCache:
    """One safetensors file per key; verified on read, replaced atomically on write."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory

    @classmethod
    def within(cls, cache_dir: Path) -> FeatureCache:
        """The feature cache kept inside a request cache directory (`.kd/cache/features/`)."""
        return cls(Path(cache_dir) / "features")

    def path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.safetensors"

    def get(self, item: Item, top_k: int) -> dict[str, Any] | None:
        """The verified tensors for `item`, or None (a damaged entry is reported, removed and missed)."""
        from safetensors import safe_open

        path = self.path(item.key)
        if not path.exists():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in TENSORS}
            problem = entry_problem(meta, tensors, item, top_k)
        except Exception as e:  # any unreadable entry is damaged, whatever the library raises
            problem = f"unreadable ({type(e).__name__})"
        if problem:
            print(f"kd: feature cache entry {path} is damaged ({problem}); recomputing it", file=sys.stderr)
            path.unlink(missing_ok=True)
            return None
        return tensors

    def put(self, item: Item, tensors: dict[str, Any]) -> None:
        from safetensors.torch import save_file

        path = self.path(item.key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{item.key[:16]}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp,
                      metadata={"key": item.key, "format": str(FORMAT), "completion_start": str(item.start)})
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def entry_problem(meta: dict[str, str], t: dict[str, Any], item: Item, top_k: int) -> str | None:
    """Why a cache entry cannot be trusted for `item`, or None."""
    import torch

    c = len(item.ids) - item.start
    if meta.get("key") != item.key or meta.get("format") != str(FORMAT):
        return "its key or format does not match"
    if meta.get("completion_start") != str(item.start):
        return "completion start differs"
    want = {"input_ids": ((len(item.ids),), torch.int32), "topk_ids": ((c, top_k), torch.int32),
            "topk_logprobs": ((c, top_k), torch.float16), "tail_logprob": ((c,), torch.float16)}
    for name, (shape, dtype) in want.items():
        if tuple(t[name].shape) != shape or t[name].dtype != dtype:
            return f"{name} has shape {tuple(t[name].shape)} {t[name].dtype}, expected {shape} {dtype}"
    if t["input_ids"].tolist() != item.ids:
        return "token ids differ"
    if not (torch.isfinite(t["topk_logprobs"]).all() and torch.isfinite(t["tail_logprob"]).all()):
        return "non-finite log-probabilities"
    return None

