"""Feature knowledge (survey §3.1.4): the teacher's top-k log-probabilities at every completion token.

A feature dataset `data/<name>/` holds, next to the usual records/manifest/rejected files,
`logits.safetensors` with flat arrays over all records (row r of `offsets` locates record r, the r-th line
of records.jsonl, sorted by id):

    input_ids      int32   [total tokens]           the prompt + completion ids the teacher saw
    topk_ids       uint16  [completion tokens, k]   (int32 when the vocabulary has ≥ 65536 ids)
    topk_logprobs  float16 [completion tokens, k]   log-softmax in float32, then rounded
    tail_logprob   float16 [completion tokens]      log(1 − Σ top-k), floored at TAIL_FLOOR
    offsets        int64   [records + 1, 2]         start of each record in input_ids / in the top-k arrays
    completion_start int64 [records]                index into the record's ids where its completion starts

Completion row j of a record is the teacher's distribution for token input_ids[completion_start + j], i.e.
the logits at position completion_start + j − 1. At k = 20 that is ≈ 90 bytes per completion token.

Each source record's result is also a cache entry `.kd/cache/features/<key[:2]>/<key>.safetensors`, keyed by
what determines it (teacher identity and dtype, token ids, k, format) and written as each batch finishes,
so a rerun recomputes only new or changed records and an interrupted run loses at most one batch.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kd.config import Feature
from kd.distill.tokenize import encode, tokenizer_digest
from kd.errors import KdError
from kd.records import (
    MANIFEST_FILE,
    canonical_json,
    finalize,
    read_dataset,
    read_jsonl,
    replace_dir,
    sha256_text,
    write_dataset,
)

FORMAT = 1
LOGITS_FILE = "logits.safetensors"
# log(tail mass) floor: e^-80 ≈ 2e-35 is "no tail" for any loss, and float16 holds it exactly enough.
TAIL_FLOOR = -80.0
_TENSORS = ("input_ids", "topk_ids", "topk_logprobs", "tail_logprob")


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

    def path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.safetensors"

    def get(self, item: Item, top_k: int) -> dict[str, torch.Tensor] | None:
        from safetensors import safe_open

        path = self.path(item.key)
        if not path.exists():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in _TENSORS}
            problem = _entry_problem(meta, tensors, item, top_k)
        except Exception as e:  # any unreadable entry is damaged, whatever the library raises
            problem = f"unreadable ({type(e).__name__})"
        if problem:
            print(f"kd: feature cache entry {path} is damaged ({problem}); recomputing it", file=sys.stderr)
            path.unlink(missing_ok=True)
            return None
        return tensors

    def put(self, item: Item, tensors: dict[str, torch.Tensor]) -> None:
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


def _entry_problem(meta: dict[str, str], t: dict[str, torch.Tensor], item: Item, top_k: int) -> str | None:
    """Why a cache entry cannot be trusted for `item`, or None."""
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


def _tokenizer(teacher: Any) -> Any:
    # The tokenizer alone (0.3 s) decides cache keys; the model (seconds) is loaded only when a record misses.
    from transformers import AutoTokenizer

    if teacher._tok is not None:
        return teacher._tok
    return AutoTokenizer.from_pretrained(teacher.path, revision=teacher.cfg.revision,
                                         trust_remote_code=teacher.cfg.trust_remote_code)


def _model(teacher: Any) -> Any:
    # LocalTeacher loads lazily and has no public accessor; feature elicitation is its one white-box user.
    if teacher._model is None:
        teacher._load()
    return teacher._model


def _vocab_size(teacher: Any, tok: Any) -> int:
    # The logits' width, which may exceed the tokenizer's length (embedding rows padded for speed).
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(teacher.path, revision=teacher.cfg.revision,
                                        trust_remote_code=teacher.cfg.trust_remote_code)
    return max(len(tok), int(getattr(config.get_text_config(), "vocab_size", 0) or 0))


@torch.inference_mode()
def score_batch(model: Any, items: list[Item], pad_id: int, top_k: int) -> list[dict[str, torch.Tensor]]:
    """Teacher top-k log-probs at each completion position of a batch of records (right-padded)."""
    device = next(model.parameters()).device
    width = max(len(it.ids) for it in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, it in enumerate(items):
        ids[row, :len(it.ids)] = torch.tensor(it.ids)
        mask[row, :len(it.ids)] = 1
    # Only positions from the earliest completion on are needed: `logits_to_keep` skips the prompt's lm_head.
    first = min(it.start for it in items) - 1
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), logits_to_keep=width - first).logits
    out = []
    for row, it in enumerate(items):
        # logits[:, j] is position first + j; completion token t is predicted at position t − 1.
        pos = slice(it.start - 1 - first, len(it.ids) - 1 - first)
        logp = torch.log_softmax(logits[row, pos].float(), dim=-1)
        values, top = logp.topk(top_k, dim=-1)
        tail = torch.logsumexp(logp.scatter(-1, top, float("-inf")), dim=-1).clamp_min(TAIL_FLOOR)
        out.append({"input_ids": torch.tensor(it.ids, dtype=torch.int32), "topk_ids": top.to(torch.int32).cpu(),
                    "topk_logprobs": values.half().cpu(), "tail_logprob": tail.half().cpu()})
    return out


def elicit_features(name: str, cfg: Feature, teacher: Any, data_dir: Path, cache_dir: Path,
                    card: Callable[[dict[str, Any]], str] | None = None) -> dict[str, Any]:
    """Score `cfg.dataset` with the local teacher and write `data/<name>/` atomically; return counts.

    `card(manifest)`, if given, renders the dataset card (README.md) written with the dataset.

    Returns:
        {"manifest": ..., "cached": n, "new": n, "tokens": n, "completion_tokens": n}
    """
    from tqdm import tqdm

    source_manifest, sources = read_dataset(data_dir / cfg.dataset)
    tok = _tokenizer(teacher)
    digest = tokenizer_digest(tok)
    identity = teacher.identity  # names the resolved dtype the log-probabilities are computed in
    items, rejected = [], []
    for rec in sources:
        where = {"source_id": rec["id"], "source_dataset": cfg.dataset}
        try:
            ids, start = encode(tok, rec, cfg.max_length)
        except KdError as e:
            rejected.append({"reason": "unencodable", "detail": str(e), **where})
            continue
        if start >= len(ids):
            rejected.append({"reason": "empty_completion", "tokens": len(ids), "max_length": cfg.max_length, **where})
            continue
        items.append(Item(rec, ids, start, feature_key(identity, ids, cfg.top_k)))

    cache = FeatureCache(cache_dir)
    results: dict[str, dict[str, torch.Tensor]] = {}
    misses = []
    for it in items:
        hit = cache.get(it, cfg.top_k)
        if hit is None:
            misses.append(it)
        else:
            results[it.key] = hit
    cached = len(items) - len(misses)
    # Similar lengths share a batch so little compute goes to padding; ties broken by key for a stable order.
    misses.sort(key=lambda it: (len(it.ids), it.key))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    bar = tqdm(total=sum(len(it.ids) - it.start for it in misses), desc=f"{name}: teacher", unit="tok",
               file=sys.stderr, disable=None if misses else True, dynamic_ncols=True)
    try:
        model = _model(teacher) if misses else None
        for i in range(0, len(misses), cfg.batch_size):
            batch = misses[i:i + cfg.batch_size]
            for it, tensors in zip(batch, score_batch(model, batch, pad, cfg.top_k), strict=True):
                cache.put(it, tensors)  # persisted now: a kill loses at most the batch in flight
                results[it.key] = tensors
                bar.update(len(it.ids) - it.start)
    finally:
        bar.close()

    manifest = _write(name, cfg, items, results, rejected, data_dir, identity, digest, source_manifest,
                      vocab=_vocab_size(teacher, tok), card=card)
    return {"manifest": manifest, "cached": cached, "new": len(misses),
            "tokens": sum(len(it.ids) for it in items), "completion_tokens": sum(len(it.ids) - it.start for it in items)}


def _write(name: str, cfg: Feature, items: list[Item], results: dict[str, dict[str, torch.Tensor]],
           rejected: list[dict[str, Any]], data_dir: Path, identity: dict[str, Any], digest: str,
           source_manifest: dict[str, Any], vocab: int, card: Callable[[dict[str, Any]], str] | None) -> dict[str, Any]:
    """Records (sorted by id) + flat arrays in the same order, moved into place as one directory."""
    from safetensors.torch import save_file

    rows = []
    for it in items:
        rows.append((finalize({
            "source_id": it.source["id"], "source_dataset": cfg.dataset, "tokens": len(it.ids),
            "completion_start": it.start, "completion_tokens": len(it.ids) - it.start,
            "top_k": cfg.top_k, "features_key": it.key,
            "tokenizer_digest": digest,
        }), it))
    rows.sort(key=lambda r: r[0]["id"])
    records, offsets, tok_at, comp_at = [], [[0, 0]], 0, 0
    for row, (rec, it) in enumerate(rows):
        tok_at, comp_at = tok_at + len(it.ids), comp_at + len(it.ids) - it.start
        offsets.append([tok_at, comp_at])
        records.append({**rec, "provenance": {
            "method": "feature", "stage": name, "row": row, "teacher": identity, "tokenizer_digest": digest,
            "top_k": cfg.top_k, "max_length": cfg.max_length, "cache_key": it.key,
            "parents": [{"dataset": cfg.dataset, "id": it.source["id"]}], "seeds": [], "requests": [], "filters": []}})
    # uint16 halves the ids when the vocabulary fits (49152 for SmolLM2): 40 instead of 80 bytes/token at k=20.
    id_dtype = torch.uint16 if vocab <= 65536 else torch.int32
    parts = [results[it.key] for _, it in rows]
    k = cfg.top_k
    arrays = {
        "input_ids": torch.cat([p["input_ids"] for p in parts]) if parts else torch.zeros(0, dtype=torch.int32),
        "topk_ids": (torch.cat([p["topk_ids"] for p in parts]) if parts else torch.zeros((0, k), dtype=torch.int32))
        .to(id_dtype),
        "topk_logprobs": torch.cat([p["topk_logprobs"] for p in parts]) if parts
        else torch.zeros((0, k), dtype=torch.float16),
        "tail_logprob": torch.cat([p["tail_logprob"] for p in parts]) if parts else torch.zeros(0, dtype=torch.float16),
        "offsets": torch.tensor(offsets, dtype=torch.int64),
        "completion_start": torch.tensor([it.start for _, it in rows], dtype=torch.int64),
    }
    out_dir = data_dir / name
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        # One metadata key: safetensors writes its metadata map in hash order, so several keys would make
        # identical records give different bytes (and DVC would see a changed output).
        save_file(arrays, str(tmp / LOGITS_FILE), metadata={"kd": canonical_json({"format": FORMAT, "top_k": k})})
        size = (tmp / LOGITS_FILE).stat().st_size
        extra = {
            "files": {"records": "records.jsonl", "rejected": "rejected.jsonl", "logits": LOGITS_FILE},
            "top_k": k, "tokenizer_digest": digest, "feature_format": FORMAT,
            "source": {"name": cfg.dataset, "fingerprint": source_manifest["fingerprint"]},
            "tokens": int(offsets[-1][0]), "completion_tokens": int(offsets[-1][1]),
            "bytes_per_token": round(size / max(offsets[-1][1], 1), 1),
        }
        manifest = write_dataset(tmp / "dataset", name, "feature", records, rejected, {}, identity, extra, card=card)
        os.replace(tmp / LOGITS_FILE, tmp / "dataset" / LOGITS_FILE)
        replace_dir(tmp / "dataset", out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


@dataclass(frozen=True)
class FeatureRow:
    """One record's stored teacher distribution; row j of the top-k tensors predicts input_ids[completion_start + j]."""

    input_ids: torch.Tensor      # LongTensor [L]
    completion_start: int
    topk_ids: torch.Tensor       # LongTensor [C, k], C = L − completion_start
    topk_logprobs: torch.Tensor  # FloatTensor [C, k]
    tail_logprob: torch.Tensor   # FloatTensor [C]


class LogitsStore:
    """Read access to a feature dataset, by source record id."""

    def __init__(self, path: Path, manifest: dict[str, Any], records: list[dict[str, Any]],
                 arrays: dict[str, torch.Tensor]) -> None:
        self.path, self.manifest, self.arrays = path, manifest, arrays
        self.name: str = manifest["name"]
        self.tokenizer_digest: str = manifest["tokenizer_digest"]
        self.teacher: dict[str, Any] = manifest["teacher"]
        self.top_k: int = manifest["top_k"]
        self.records = records
        self._row = {r["source_id"]: i for i, r in enumerate(records)}

    def __len__(self) -> int:
        return len(self.records)

    def __contains__(self, source_id: str) -> bool:
        return source_id in self._row

    def get(self, source_id: str) -> FeatureRow:
        row = self._row.get(source_id)
        if row is None:
            raise KdError(f"logits dataset '{self.name}' ({self.path}) has no features for record {source_id}; "
                          f"rebuild it (`dvc repro {self.name}`)")
        a = self.arrays
        (t0, c0), (t1, c1) = a["offsets"][row].tolist(), a["offsets"][row + 1].tolist()
        return FeatureRow(input_ids=a["input_ids"][t0:t1].long(), completion_start=int(a["completion_start"][row]),
                          topk_ids=a["topk_ids"][c0:c1].long(), topk_logprobs=a["topk_logprobs"][c0:c1].float(),
                          tail_logprob=a["tail_logprob"][c0:c1].float())


def load_logits(path: Path | str) -> LogitsStore:
    """Open a feature dataset directory (`data/<name>`) written by the feature stage."""
    from safetensors.torch import load_file

    path = Path(path)
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.exists():
        raise KdError(f"{path}: no {MANIFEST_FILE}; build the logits dataset first (`dvc repro {path.name}`)")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    if manifest.get("method") != "feature":
        raise KdError(f"{path}: a {manifest.get('method')} dataset, not a feature (logits) dataset")
    records = read_jsonl(path / manifest["files"]["records"])
    arrays = load_file(str(path / manifest["files"]["logits"]))
    if arrays["offsets"].shape[0] != len(records) + 1:
        raise KdError(f"{path}: {LOGITS_FILE} holds {arrays['offsets'].shape[0] - 1} records but records.jsonl "
                      f"{len(records)}; rebuild it (`dvc repro {path.name}`)")
    return LogitsStore(path, manifest, records, arrays)


def check_compatible(store: LogitsStore, tokenizer: Any, teacher_identity: dict[str, Any] | None = None) -> None:
    """Refuse logits a student cannot use: another tokenizer (ids mean other tokens) or another teacher.

    Raises:
        KdError: naming the logits dataset and both digests.
    """
    mine = tokenizer_digest(tokenizer)
    if mine != store.tokenizer_digest:
        raise KdError(f"logits dataset '{store.name}' ({store.path}) was made with tokenizer {store.tokenizer_digest[:12]}, "
                      f"but the student's tokenizer is {mine[:12]}: its token ids mean different tokens. Train this "
                      f"student from the teacher's tokenizer (init from_teacher/from_config) or re-elicit the logits")
    if teacher_identity is not None and teacher_identity.get("digest") != store.teacher.get("digest"):
        raise KdError(f"logits dataset '{store.name}' ({store.path}) comes from teacher "
                      f"{store.teacher.get('model')} ({str(store.teacher.get('digest'))[:12]}), not from "
                      f"{teacher_identity.get('model')} ({str(teacher_identity.get('digest'))[:12]}); "
                      f"rebuild it (`dvc repro {store.name}`)")
