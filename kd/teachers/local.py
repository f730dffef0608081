"""The `local` backend: a transformers model in this process, batched with left padding.

Sampling is reproducible per request: each request draws from its own generator seeded from its cache key,
so its answer does not depend on which other requests share its batch or on the order they run in.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from kd.config import LocalTeacher as LocalConfig
from kd.device import resolve_device, resolve_dtype_name
from kd.errors import KdError

DIGEST_MEMO = Path(".kd/digests.json")
_MODEL_FILES = (".safetensors", ".json", ".model", ".txt", ".jinja")
_PROVENANCE_FILES = ("README.md", "kd_model.json")  # kd.distill.student.CARD_FILE, INFO_FILE


def directory_digest(path: Path) -> str:
    """sha256 over the weights, config and tokenizer files of a model directory.

    kd's own provenance files (the `README.md` card, `kd_model.json`) are left out: they name the git commit and
    MLflow run, so a byte-identical model rebuilt elsewhere would otherwise get another identity, and a student
    used as a generator would draw different samples (sampling is seeded from the request key).

    Hashing gigabytes on every stage start is wasteful, so digests are memoised by (path, size, mtime).
    """
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in _MODEL_FILES
                   and p.name not in _PROVENANCE_FILES)
    if not files:
        raise KdError(f"{path}: no model files (expected safetensors, config.json and tokenizer files)")
    stamp = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    memo_key = str(path.resolve())
    try:
        memo = json.loads(DIGEST_MEMO.read_text())
    except (OSError, ValueError):
        memo = {}
    if memo.get(memo_key, {}).get("stamp") == stamp:
        return memo[memo_key]["digest"]
    h = hashlib.sha256()
    for p in files:
        fh = hashlib.sha256()
        with p.open("rb") as f:
            while chunk := f.read(1 << 22):
                fh.update(chunk)
        h.update(f"{p.name}:{fh.hexdigest()}\n".encode())
    digest = h.hexdigest()
    memo[memo_key] = {"stamp": stamp, "digest": digest}
    try:
        DIGEST_MEMO.parent.mkdir(parents=True, exist_ok=True)
        tmp = DIGEST_MEMO.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(memo))
        os.replace(tmp, DIGEST_MEMO)
    except OSError:
        pass  # the memo only saves time
    return digest


def seed_of(key: str) -> int:
    return int(key[:15], 16)


class LocalTeacher:
    def __init__(self, name: str, cfg: LocalConfig, root: Path) -> None:
        self.name, self.cfg = name, cfg
        self.path = (root / cfg.path) if not Path(cfg.path).is_absolute() else Path(cfg.path)
        self._identity: dict[str, Any] | None = None
        self._model = self._tok = None

    @property
    def identity(self) -> dict[str, Any]:
        if self._identity is None:
            if not self.path.is_dir():
                raise KdError(f"teachers.{self.name}.path: {self.cfg.path} does not exist "
                              f"(the `teacher` stage builds the embedded one: `dvc repro teacher`)")
            self._identity = {"backend": "local", "model": self.path.name, "digest": directory_digest(self.path),
                              "revision": self.cfg.revision, "dtype": self.dtype_name}
        return self._identity

    @property
    def dtype_name(self) -> str:
        """The precision the model runs in (`dtype: auto` resolved for this machine)."""
        return resolve_dtype_name(self.cfg.dtype, resolve_device(self.cfg.device))

    def _load(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        device = resolve_device(self.cfg.device)
        dtype = getattr(torch, self.dtype_name)
        kw = {"revision": self.cfg.revision, "trust_remote_code": self.cfg.trust_remote_code}
        self._tok = AutoTokenizer.from_pretrained(self.path, **kw)
        self._model = AutoModelForCausalLM.from_pretrained(self.path, dtype=dtype, use_safetensors=True, **kw)
        self._model.to(device).eval()
        self.device = torch.device(device)

    def generate(self, items: list[tuple[str, dict[str, Any]]], on_result: Any) -> None:
        if not items:
            return
        if self._model is None:
            self._load()
        tok = self._tok
        prompts = {k: tok.apply_chat_template(r["messages"], add_generation_prompt=True, tokenize=True)["input_ids"]
                   for k, r in items}
        # One generate() call takes one set of sampling params; within a group, similar lengths share a batch
        # so little time goes to padding.
        groups: dict[str, list[tuple[str, dict[str, Any]]]] = {}
        for key, req in items:
            groups.setdefault(json.dumps(req["sampling"], sort_keys=True), []).append((key, req))
        for group in groups.values():
            group.sort(key=lambda kr: (len(prompts[kr[0]]), kr[0]))
            for i in range(0, len(group), self.cfg.batch_size):
                batch = group[i:i + self.cfg.batch_size]
                for key, response in zip((k for k, _ in batch),
                                         self._generate_batch([prompts[k] for k, _ in batch], [k for k, _ in batch],
                                                              batch[0][1]["sampling"]), strict=True):
                    on_result(key, response)

    def _generate_batch(self, prompts: list[list[int]], keys: list[str], sampling: dict[str, Any]) -> list[dict]:
        from transformers import LogitsProcessorList

        processors = LogitsProcessorList()
        if sampling["temperature"] > 0:
            processors.append(_PerRequestSampler(keys, sampling["temperature"], sampling["top_p"], self.device))
        rows = generate_ids(self._model, self._tok, prompts, sampling["max_tokens"], self.device,
                            stop=sampling["stop"], processors=processors)
        results = []
        for p, (new, stopped) in zip(prompts, rows, strict=True):
            finish = "stop" if stopped else "length"
            new = new[:-1] if stopped else new
            text = self._tok.decode(new, skip_special_tokens=True)
            for s in sampling["stop"]:
                if s in text:
                    text, finish = text[:text.index(s)], "stop"
            results.append({"text": text, "finish_reason": finish,
                            "usage": {"prompt_tokens": len(p), "completion_tokens": len(new)}})
        return results


def eos_ids(model: Any, tok: Any) -> set[int]:
    """Every id that ends a turn: the generation config's (often several) and the tokenizer's."""
    eos = model.generation_config.eos_token_id
    return {i for i in set(eos if isinstance(eos, list) else [eos]) | {tok.eos_token_id} if i is not None}


def generate_ids(model: Any, tok: Any, prompts: list[list[int]], max_new_tokens: int, device: Any,
                 stop: list[str] | tuple[str, ...] = (), processors: Any = None) -> list[tuple[list[int], bool]]:
    """One left-padded generate() call (greedy unless `processors` sample); shared with kd.evaluate.

    Returns:
        per prompt, its new token ids up to and including the first end-of-turn id, and whether it ended
        there (False: cut at `max_new_tokens`, or at a stop string, which the caller cuts from the text).
    """
    import torch
    from transformers import GenerationConfig

    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    ends = eos_ids(model, tok)
    gen = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                           eos_token_id=sorted(ends), stop_strings=list(stop) or None)
    with torch.inference_mode():
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gen,
                             logits_processor=processors, tokenizer=tok if stop else None)
    rows = []
    for row in range(len(prompts)):
        new = out[row, width:].tolist()
        cut = next((n for n, t in enumerate(new) if t in ends), None)
        rows.append((new, False) if cut is None else (new[:cut + 1], True))
    return rows


class _PerRequestSampler:
    """Temperature + top-p sampling with one generator per row, then a one-hot mask for greedy decoding."""

    def __init__(self, keys: list[str], temperature: float, top_p: float, device: Any) -> None:
        import torch

        self.temperature, self.top_p = temperature, top_p
        self.generators = [torch.Generator(device=device).manual_seed(seed_of(k)) for k in keys]

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_p, order = probs.sort(dim=-1, descending=True)
            drop = sorted_p.cumsum(-1) - sorted_p > self.top_p  # keep the smallest prefix reaching top_p
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        out = torch.full_like(scores, float("-inf"))
        for row, g in enumerate(self.generators):
            out[row, torch.multinomial(probs[row], 1, generator=g)] = 0.0
        return out
