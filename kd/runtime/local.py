"""The `local` backend: a transformers model in this process, batched with left padding.

Sampling is reproducible per request: each request draws from its own generator seeded from its cache key,
so its answer does not depend on which other requests share its batch or on the order they run in.
A prompt that leaves no room for `max_tokens` in the model's context is refused as `too_long` before any
weights load (kd.runtime.refusals), not generated for minutes past the positions the model was trained on.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from kd.config import LocalTeacher as LocalConfig
from kd.errors import KdError
from kd.paths import under
from kd.runtime.device import resolve_device, resolve_dtype_name
from kd.runtime.models import directory_digest, load_causal_lm, trusted_code
from kd.runtime.refusals import refused
from kd.runtime.tokenize import chat_ids


def seed_of(key: str) -> int:
    return int(key[:15], 16)


class LocalTeacher:
    """A local model directory answering requests in-process; also the white-box view of a teacher (its
    tokenizer, weights and vocabulary) that scorers and feature elicitation read."""

    def __init__(self, name: str, cfg: LocalConfig, root: Path) -> None:
        self.name, self.cfg = name, cfg
        self.key = f"teachers.{name}"  # the params section its errors name
        self.path = under(root, cfg.path)
        self.device = resolve_device(cfg.device)
        self._identity: dict[str, Any] | None = None
        self._model = self._tok = None
        self._context: int | None = None
        self._token_bytes: int | None = None

    @property
    def dtype_name(self) -> str:
        """The precision the model runs in (`dtype: auto` resolved for this machine)."""
        return resolve_dtype_name(self.cfg.dtype, self.device)

    @property
    def identity(self) -> dict[str, Any]:
        if self._identity is None:
            if not self.path.is_dir():
                raise KdError(f"teachers.{self.name}.path: {self.cfg.path} does not exist "
                              f"(the `teacher` stage builds the embedded one: `dvc repro teacher`)")
            self._identity = {"backend": "local", "model": self.path.name, "digest": directory_digest(self.path),
                              "revision": self.cfg.revision, "dtype": self.dtype_name}
        return self._identity

    def tokenizer(self) -> Any:
        """The tokenizer alone (0.3 s), enough to compute cache keys; the weights (seconds) load on demand."""
        if self._tok is None:
            from transformers import AutoTokenizer

            self._tok = AutoTokenizer.from_pretrained(self.path, revision=self.cfg.revision,
                                                      trust_remote_code=trusted_code(self.path, self.cfg, self.key))
        return self._tok

    def loaded(self) -> tuple[Any, Any]:
        """(model on its device, in eval mode; tokenizer), loaded on first use."""
        if self._model is None:
            self._model, self._tok = load_causal_lm(self.path, self.cfg, self.key)
            self._model.to(self.device)
        return self._model, self._tok

    def vocab_size(self) -> int:
        """The logits' width, which may exceed the tokenizer's length (embedding rows padded for speed)."""
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(self.path, revision=self.cfg.revision,
                                            trust_remote_code=trusted_code(self.path, self.cfg, self.key))
        return max(len(self.tokenizer()), int(getattr(config.get_text_config(), "vocab_size", 0) or 0))

    def context_length(self) -> int:
        """Positions the model was trained on (`max_position_embeddings`); prompt + answer must fit in them."""
        if self._context is None:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(self.path, revision=self.cfg.revision,
                                                trust_remote_code=trusted_code(self.path, self.cfg, self.key)
                                                ).get_text_config()
            sizes = [getattr(config, a, None) for a in ("max_position_embeddings", "n_positions", "max_seq_len")]
            self._context = next((int(n) for n in sizes if isinstance(n, int) and n > 0), 0)
        return self._context

    def generate(self, items: Iterable[tuple[str, dict[str, Any]]], on_result: Any) -> None:
        items = list(items)  # sorted into batches by length: all of them at once
        if not items:
            return
        tok = self.tokenizer()
        # a 1 MB row takes seconds to tokenise; its bytes alone prove it too long in microseconds
        items = self._refuse_too_long(items, {k: self.least_tokens(r["messages"]) for k, r in items}, on_result,
                                      "at least ")
        prompts = {k: chat_ids(tok, r["messages"], add_generation_prompt=True, where=f"request {k[:12]}")
                   for k, r in items}
        items = self._refuse_too_long(items, {k: len(p) for k, p in prompts.items()}, on_result)
        if not items:
            return
        self.loaded()
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

    def least_tokens(self, messages: list[dict[str, Any]]) -> int:
        """A lower bound on a prompt's tokens without tokenising it: its text's bytes over the most bytes one token
        stands for."""
        if self._token_bytes is None:
            tok = self.tokenizer()
            backend = getattr(tok, "backend_tokenizer", None)
            # byte-level BPE spells each byte as one character; otherwise a character may be up to 4 bytes
            byte_level = type(getattr(backend, "decoder", None)).__name__ == "ByteLevel"
            added = set(tok.get_added_vocab())
            self._token_bytes = max(len(t) if byte_level and t not in added else len(t.encode())
                                    for t in tok.get_vocab())
        size = sum(len(m["content"].encode()) for m in messages if isinstance(m.get("content"), str))
        return size // max(self._token_bytes, 1)

    def _refuse_too_long(self, items: list[tuple[str, dict[str, Any]]], tokens: dict[str, int], on_result: Any,
                         bound: str = "") -> list[tuple[str, dict[str, Any]]]:
        """The items whose prompt (of `tokens`, or at least that many) leaves room for `max_tokens`; the others are
        answered `too_long` at once."""
        context = self.context_length()
        if not context:  # a config that names no context length: nothing to check against
            return items
        kept = []
        for key, req in items:
            n, room = tokens[key], context - req["sampling"]["max_tokens"]
            if n > room:
                on_result(key, refused("too_long", f"prompt of {bound}{n} tokens exceeds the {room} that teacher "
                                                   f"'{self.name}' has room for (context {context} - max_tokens "
                                                   f"{req['sampling']['max_tokens']})"))
            else:
                kept.append((key, req))
        return kept

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
                 stop: list[str] | tuple[str, ...] = (), processors: Any = None,
                 stop_loops: int | None = None) -> list[tuple[list[int], bool]]:
    """One left-padded generate() call (greedy unless `processors` sample); shared with kd.evaluation.evaluate.

    Args:
        stop_loops: stop a row once its last this-many new tokens are one token repeated (its answer is
            degenerate whatever would follow), so a looping model does not hold its batch to `max_new_tokens`.

    Returns:
        per prompt, its new token ids up to and including the first end-of-turn id, and whether it ended
        there (False: cut at `max_new_tokens`, at a loop, or at a stop string, which the caller cuts from the text).
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
    loops = _loop_stop(width, stop_loops) if stop_loops else None
    with torch.inference_mode():
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gen,
                             logits_processor=processors, tokenizer=tok if stop else None,
                             stopping_criteria=[loops] if loops else None)
    rows = []
    for row in range(len(prompts)):
        new = out[row, width:].tolist()
        cut = next((n for n, t in enumerate(new) if t in ends), None)
        if cut is not None and (loops is None or row not in loops.at or cut < loops.at[row]):
            rows.append((new[:cut + 1], True))
        else:
            rows.append((new[:loops.at[row]] if loops and row in loops.at else new, False))
    return rows


def _loop_stop(width: int, run: int) -> Any:
    import torch
    from transformers import StoppingCriteria

    class LoopStop(StoppingCriteria):
        """Marks a row done once its last `run` new tokens are one token repeated; `at[row]`: its length then."""

        def __init__(self) -> None:
            self.at: dict[int, int] = {}

        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            new = input_ids[:, width:]
            if new.shape[1] < run:
                return torch.zeros(new.shape[0], dtype=torch.bool, device=new.device)
            tail = new[:, -run:]
            done = (tail == tail[:, :1]).all(-1)
            for r in done.nonzero().flatten().tolist():
                self.at.setdefault(r, new.shape[1])
            return done

    return LoopStop()


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
