"""The feature cache: one teacher top-k result per source record, so a rerun scores only new records.

`.kd/cache/features/<key[:2]>/<key>.safetensors`, keyed by what determines it (teacher identity with its
resolved dtype, token ids, k, the tail temperatures, format) and written atomically as each batch finishes: an interrupted feature
stage loses at most the batch in flight. Entries are verified on read; a damaged one is reported and recomputed.
An entry carries its key, its completion start and a checksum of its tensors in the safetensors metadata, so
`entry_problem` can judge a file on its own (for `kd cache verify`, push and pull) as well as against a record.
An entry for students at temperatures T ≠ 1 also holds `tempered_tails` [C, m], the tail at each of its m
temperatures (named in its metadata); one for T = 1 alone has neither, so its key and bytes are as before.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kd.cache.store import parse_json, probe_writable, unreadable
from kd.records import canonical_json, sha256_text

FORMAT = 1  # of an entry and of a feature dataset's logits file
TENSORS = ("input_ids", "topk_ids", "topk_logprobs", "tail_logprob")
TEMPERED = "tempered_tails"  # [C, m] float16: log Σ_{j∉top-k} p_j^{1/T} at each of the entry's m temperatures
_DTYPES = {"input_ids": "int32", "topk_ids": "int32", "topk_logprobs": "float16", "tail_logprob": "float16",
           TEMPERED: "float16"}


@dataclass(frozen=True)
class Item:
    """One source record to score: its ids, where the completion starts, and its cache key."""

    source: dict[str, Any]
    ids: list[int]
    start: int
    key: str
    temperatures: tuple[float, ...] = ()  # the tail temperatures T ≠ 1 (kd.config.students.tail_temperatures)


def feature_key(teacher: dict[str, Any], ids: list[int], top_k: int, temperatures: tuple[float, ...] = ()) -> str:
    """sha256 of exactly what decides a record's stored features (the temperatures only when there are any, so
    entries for T = 1 keep their keys)."""
    extra = {"temperatures": list(temperatures)} if temperatures else {}
    return sha256_text(canonical_json({"teacher": teacher, "input_ids": ids, "top_k": top_k,
                                       "format": FORMAT, "kind": "feature", **extra}))


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
        from safetensors.torch import load

        path = self.path(item.key)
        try:
            raw = path.read_bytes()
        except (FileNotFoundError, NotADirectoryError):  # no entry there (NotADirectory: no cache)
            return None
        except OSError as e:
            raw, problem = b"", unreadable(e)
        else:
            problem = entry_problem(raw, item.key, item, top_k)
        if problem:
            try:
                path.unlink(missing_ok=True)
                done = "removed it"
            except OSError:
                done = "could not remove it"
            print(f"kd: feature cache entry {path} is damaged ({problem}); {done}, recomputing", file=sys.stderr)
            return None
        return load(raw)

    def ensure_writable(self) -> None:
        """Raise KdError naming the directory unless results can be stored in it: called before the teacher runs,
        so a read-only cache stops the stage before any forward pass is spent."""
        probe_writable(self.dir, "feature cache")

    def put(self, item: Item, tensors: dict[str, Any]) -> None:
        from safetensors.torch import save_file

        path = self.path(item.key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{item.key[:16]}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        try:
            meta = {"key": item.key, "format": str(FORMAT), "completion_start": str(item.start),
                    "checksum": tensors_checksum({k: v.numpy() for k, v in tensors.items()})}
            if item.temperatures:
                meta["temperatures"] = canonical_json(list(item.temperatures))
            save_file(tensors, tmp, metadata=meta)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def tensors_checksum(arrays: dict[str, Any]) -> str:
    """sha256 over each tensor's name, dtype, shape and bytes (numpy arrays), in TENSORS order, then TEMPERED
    where present."""
    h = hashlib.sha256()
    for name in (*TENSORS, TEMPERED) if TEMPERED in arrays else TENSORS:
        a = arrays[name]
        h.update(f"{name}:{a.dtype}:{tuple(a.shape)}:".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _header(raw: bytes) -> dict[str, Any]:
    """The safetensors JSON header (8-byte little-endian length, then JSON)."""
    n = int.from_bytes(raw[:8], "little")
    if len(raw) < 8 or n > len(raw) - 8:
        raise ValueError("header length beyond the file")
    header = parse_json(raw[8:8 + n])
    if not isinstance(header, dict):
        raise ValueError("header is not an object")
    return header


def entry_problem(raw: bytes, key: str, item: Item | None = None, top_k: int | None = None) -> str | None:
    """Why a stored entry cannot be trusted under `key` (and, given a record's `item`, for that record with
    `top_k`), or None. The one check behind the feature stage, `kd cache verify`, push and pull. Never raises.
    Entries written before the checksum existed are judged on everything else."""
    import numpy as np
    from safetensors.numpy import load

    try:
        meta = _header(raw).get("__metadata__") or {}
        arrays = load(raw)
    except Exception as e:  # whatever the parser raises, the file is not a usable entry
        return f"unreadable safetensors ({type(e).__name__})"
    if not isinstance(meta, dict) or meta.get("key") != key or meta.get("format") != str(FORMAT):
        return "its key or format does not match"
    try:
        temperatures = tuple(float(t) for t in parse_json(meta["temperatures"].encode())) \
            if "temperatures" in meta else ()
    except (TypeError, ValueError, AttributeError):
        return "unreadable temperatures"
    expected = sorted([*TENSORS, TEMPERED] if temperatures else TENSORS)
    if sorted(arrays) != expected:
        return f"holds tensors {sorted(arrays)}, expected {expected}"
    start = meta.get("completion_start", "")
    n = arrays["input_ids"].shape[0] if arrays["input_ids"].ndim == 1 else -1
    if not start.isdigit() or not 0 <= int(start) < n:
        return f"completion start {start!r} does not fit {n} token ids"
    c = n - int(start)
    k = arrays["topk_ids"].shape[-1] if arrays["topk_ids"].ndim == 2 else -1
    want = {"input_ids": (n,), "topk_ids": (c, k), "topk_logprobs": (c, k), "tail_logprob": (c,)}
    if temperatures:
        want[TEMPERED] = (c, len(temperatures))
    for name, shape in want.items():
        a = arrays[name]
        if k < 1 or tuple(a.shape) != shape or str(a.dtype) != _DTYPES[name]:
            return f"{name} has shape {tuple(a.shape)} {a.dtype}, expected {shape} {_DTYPES[name]}"
    if not all(np.isfinite(arrays[n]).all() for n in ("topk_logprobs", "tail_logprob", TEMPERED) if n in arrays):
        return "non-finite log-probabilities"
    if "checksum" in meta and meta["checksum"] != tensors_checksum(arrays):
        return "checksum mismatch"
    if item is not None:
        if int(start) != item.start:
            return "completion start differs"
        if k != top_k:
            return f"holds top-{k}, expected top-{top_k}"
        if temperatures != item.temperatures:
            return f"holds tails at temperatures {list(temperatures)}, expected {list(item.temperatures)}"
        if arrays["input_ids"].tolist() != item.ids:
            return "token ids differ"
    return None
