"""Feature knowledge (survey §3.1.4): the teacher's top-k log-probabilities at every completion token.

The local teacher scores every record of `datasets.<name>.dataset` with one teacher-forced forward pass, or a
served one returns the same top-k as prompt log-probs (kd.runtime.served, e.g. vLLM); the result is a feature
dataset laid out as kd.runtime.logits describes. For every temperature T ≠ 1 a student of this dataset trains at
(kd.config.students.tail_temperatures) it also stores the teacher's tail at T, which only the full logits give:
top-k + tail is then the exact tempered distribution restricted to k + 1 outcomes (kd.distill.losses). Each record's result is also a feature cache entry (kd.cache.features), written as each batch finishes, so a rerun recomputes only new or changed
records and an interrupted run loses at most one batch.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kd.cache.features import FORMAT, TEMPERED, FeatureCache, Item, feature_key
from kd.config import Feature, dataset_config, load_params
from kd.config.students import tail_temperatures
from kd.elicit.build import parent_ref
from kd.elicit.common import Summary
from kd.errors import KdError
from kd.paths import CACHE_DIR, DATA_DIR, METRICS_DIR
from kd.provenance.cards import render_card
from kd.provenance.forecast import cost_of, feature_forecast, money
from kd.records import (
    RECORDS_FILE,
    REJECTED_FILE,
    ensure_writable,
    finalize,
    read_dataset,
    replace_dir,
    write_dataset,
    write_json,
)
from kd.runtime.ask import Totals
from kd.runtime.environment import collect, resolved
from kd.runtime.local import LocalTeacher
from kd.runtime.logits import LOGITS_FILE, TAIL_FLOOR, pack, save_logits
from kd.runtime.refusals import is_refused
from kd.runtime.served import ServedFeatures, feature_teacher
from kd.runtime.tokenize import encode, tokenizer_digest


def score_batch(model: Any, items: list[Item], pad_id: int, top_k: int,
                temperatures: tuple[float, ...] = ()) -> list[dict[str, Any]]:
    """Teacher top-k log-probs at each completion position of a batch of records (right-padded), the tail at
    T = 1 and, for each of `temperatures`, the tail at T: log Σ_{j∉top-k} p_j^{1/T}."""
    import torch

    device = next(model.parameters()).device
    width = max(len(it.ids) for it in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, it in enumerate(items):
        ids[row, :len(it.ids)] = torch.tensor(it.ids)
        mask[row, :len(it.ids)] = 1
    # Only positions from the earliest completion on are needed: `logits_to_keep` skips the prompt's lm_head.
    first = min(it.start for it in items) - 1
    with torch.inference_mode():
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), logits_to_keep=width - first).logits
        out = []
        for row, it in enumerate(items):
            # logits[:, j] is position first + j; completion token t is predicted at position t − 1.
            pos = slice(it.start - 1 - first, len(it.ids) - 1 - first)
            logp = torch.log_softmax(logits[row, pos].float(), dim=-1)
            values, top = logp.topk(top_k, dim=-1)
            rest = logp.scatter(-1, top, float("-inf"))
            tail = torch.logsumexp(rest, dim=-1).clamp_min(TAIL_FLOOR)
            out.append({"input_ids": torch.tensor(it.ids, dtype=torch.int32), "topk_ids": top.to(torch.int32).cpu(),
                        "topk_logprobs": values.half().cpu(), "tail_logprob": tail.half().cpu()})
            if temperatures:
                out[-1][TEMPERED] = torch.stack([torch.logsumexp(rest / t, dim=-1).clamp_min(TAIL_FLOOR)
                                                 for t in temperatures], dim=-1).half().cpu()
    return out


def elicit_features(name: str, cfg: Feature, teacher: LocalTeacher | ServedFeatures, data_dir: Path,
                    cache_dir: Path, card: Callable[[dict[str, Any]], str] | None = None,
                    temperatures: tuple[float, ...] = ()) -> dict[str, Any]:
    """Score `cfg.dataset` with the teacher (local, or a server's prompt log-probs) and write `data/<name>/`
    atomically; return counts.

    `card(manifest)`, if given, renders the dataset card (README.md) written with the dataset. `temperatures`:
    the T ≠ 1 at which the teacher's tail is stored too (a local teacher only: a server returns no full logits).

    Returns:
        {"manifest": ..., "cached": n, "new": n, "tokens": n, "completion_tokens": n}
    """
    from tqdm import tqdm

    if temperatures and isinstance(teacher, ServedFeatures):
        raise KdError(f"datasets.{name}: students train on it at temperature {', '.join(f'{t:g}' for t in temperatures)}"
                      f", but a served teacher returns only top-k log-probs and the tail at T ≠ 1 needs the full "
                      f"logits; use a local teacher or kd.temperature 1.0")
    source_manifest, sources = read_dataset(data_dir / cfg.dataset)
    tok = teacher.tokenizer()  # enough for the cache keys; the weights load only when a record misses
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
        items.append(Item(rec, ids, start, feature_key(identity, ids, cfg.top_k, temperatures), temperatures))

    cache = FeatureCache(cache_dir)
    results: dict[str, dict[str, Any]] = {}
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
        if misses:
            cache.ensure_writable()  # before the teacher runs: a read-only cache must not waste forward passes
        if isinstance(teacher, ServedFeatures):
            refused: set[str] = set()

            def on_result(it: Item, response: dict[str, Any]) -> None:
                if is_refused(response):  # that record only, as for chat requests; never cached
                    refused.add(it.key)
                    rejected.append({"reason": response["finish_reason"], "detail": response["error"],
                                     "source_id": it.source["id"], "source_dataset": cfg.dataset})
                else:
                    cache.put(it, response)  # persisted as it arrives: a kill loses only the requests in flight
                    results[it.key] = response
                bar.update(len(it.ids) - it.start)

            teacher.score(misses, cfg.top_k, on_result)
            items = [it for it in items if it.key not in refused]
        else:
            model = teacher.loaded()[0] if misses else None
            for i in range(0, len(misses), cfg.batch_size):
                batch = misses[i:i + cfg.batch_size]
                for it, tensors in zip(batch, score_batch(model, batch, pad, cfg.top_k, temperatures), strict=True):
                    cache.put(it, tensors)  # persisted now: a kill loses at most the batch in flight
                    results[it.key] = tensors
                    bar.update(len(it.ids) - it.start)
    finally:
        bar.close()

    manifest = _write(name, cfg, items, results, rejected, data_dir, identity, digest, source_manifest,
                      vocab=teacher.vocab_size(), card=card, temperatures=temperatures,
                      environment=collect(*resolved([teacher])))
    return {"manifest": manifest, "cached": cached, "new": len(misses),
            "tokens": sum(len(it.ids) for it in items), "completion_tokens": sum(len(it.ids) - it.start for it in items)}


def _write(name: str, cfg: Feature, items: list[Item], results: dict[str, dict[str, Any]],
           rejected: list[dict[str, Any]], data_dir: Path, identity: dict[str, Any], digest: str,
           source_manifest: dict[str, Any], vocab: int, card: Callable[[dict[str, Any]], str] | None,
           temperatures: tuple[float, ...] = (), environment: dict[str, Any] | None = None) -> dict[str, Any]:
    """Records (sorted by id) + flat arrays in the same order, moved into place as one directory; the
    `environment` (kd.runtime.environment) goes to the manifest only."""
    rows = []
    for it in items:
        rows.append((finalize({
            "source_id": it.source["id"], "source_dataset": cfg.dataset, "tokens": len(it.ids),
            "completion_start": it.start, "completion_tokens": len(it.ids) - it.start,
            "top_k": cfg.top_k, "features_key": it.key,
            "tokenizer_digest": digest,
        }), it))
    rows.sort(key=lambda r: r[0]["id"])
    records = []
    for row, (rec, it) in enumerate(rows):
        records.append({**rec, "provenance": {
            "method": "feature", "stage": name, "row": row, "teacher": identity, "tokenizer_digest": digest,
            "top_k": cfg.top_k, "max_length": cfg.max_length, "cache_key": it.key,
            "parents": [{"dataset": cfg.dataset, "id": it.source["id"]}], "seeds": [], "requests": [], "filters": []}})
    arrays = pack([results[it.key] for _, it in rows], [it.start for _, it in rows], cfg.top_k, vocab, temperatures)
    tokens, completion_tokens = (int(x) for x in arrays["offsets"][-1])
    out_dir = data_dir / name
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        size = save_logits(tmp / LOGITS_FILE, arrays, cfg.top_k, temperatures)
        extra = {
            "files": {"records": RECORDS_FILE, "rejected": REJECTED_FILE, "logits": LOGITS_FILE},
            "top_k": cfg.top_k, "tokenizer_digest": digest, "feature_format": FORMAT,
            "source": {"name": cfg.dataset, "fingerprint": source_manifest["fingerprint"]},
            "tokens": tokens, "completion_tokens": completion_tokens,
            "bytes_per_token": round(size / max(completion_tokens, 1), 1),
            **({"tail_temperatures": list(temperatures)} if temperatures else {}),  # absent: T = 1 only, as before
            **({"environment": environment} if environment is not None else {}),
        }
        manifest = write_dataset(tmp / "dataset", name, "feature", records, rejected, {}, identity, extra, card=card)
        os.replace(tmp / LOGITS_FILE, tmp / "dataset" / LOGITS_FILE)
        replace_dir(tmp / "dataset", out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def build_features(name: str, root: Path = Path("."), data_dir: Path | None = None, metrics_dir: Path | None = None,
                   cache_dir: Path | None = None) -> str:
    """A feature dataset: the teacher scores every record of its input dataset (white-box: in-process, or a
    server's prompt log-probs; its own cache, logits written next to the records). Returns the summary line."""
    summary = Summary()
    params = load_params(root)
    cfg: Feature = dataset_config(params, name, "feature")
    data_dir = data_dir or root / DATA_DIR
    cache_dir = cache_dir or root / CACHE_DIR
    metrics_dir = metrics_dir or root / METRICS_DIR
    ensure_writable(data_dir, metrics_dir)  # before the teacher's forward passes, not after them
    print(feature_forecast(name, params, root, data_dir, cache_dir).line(), flush=True)
    teacher = feature_teacher(cfg.teacher, params.teachers[cfg.teacher], root)

    def card(manifest: dict) -> str:
        usage = {"prompt_tokens": manifest["tokens"], "completion_tokens": 0}  # scored by forward passes
        return render_card(manifest, [parent_ref(data_dir, cfg.dataset)], usage,
                           money(cost_of(params, cfg.teacher, manifest["tokens"], 0)))

    result = elicit_features(name, cfg, teacher, data_dir, FeatureCache.within(cache_dir).dir, card=card,
                             temperatures=tail_temperatures(params.students, name))
    manifest = result["manifest"]
    metrics = {
        "records": manifest["records"],
        "rejected": sum(manifest["rejected"].values()),
        "rejected_by_reason": manifest["rejected"],
        **{k: manifest[k] for k in ("tokens", "completion_tokens", "bytes_per_token", "top_k")},
    }
    write_json(metrics_dir / f"{name}.json", metrics)
    totals = Totals(cached=result["cached"], new=result["new"])
    return summary.line(name, manifest, totals)
