"""A served feature teacher: top-k log-probs from an OpenAI-compatible server that returns prompt log-probs.

vLLM answers `POST /v1/completions` with `prompt` = token ids and `prompt_logprobs: k` with, per prompt position
t, the log-probs of token t given the tokens before it: `{"<token id>": {"logprob": x, "rank": r, ...}}` holding
the top k plus the prompt's own token when it ranks lower (position 0 is null). kd sends its own encoding of each
record (kd.runtime.tokenize.encode, with the tokenizer the params name), so the positions are kd's and the
result has the local capture's layout (kd.runtime.logits). Requests go through kd.runtime.openai: the same
concurrency, retries and per-record refusals as chat requests.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kd.cache.features import Item
from kd.config import LocalTeacher as LocalConfig
from kd.config import OpenAITeacher as OpenAIConfig
from kd.errors import KdError
from kd.paths import under
from kd.runtime.local import LocalTeacher
from kd.runtime.logits import TAIL_FLOOR
from kd.runtime.openai import OpenAITeacher, identity


class ServedFeatures:
    """The parts of a feature teacher the stage needs (tokenizer, identity, vocab), for a served model."""

    def __init__(self, name: str, cfg: OpenAIConfig, root: Path) -> None:
        if cfg.tokenizer is None:  # validation refuses this; a config built around it gets the same words
            raise KdError(f"teachers.{name}.tokenizer: a feature dataset scored by this server needs the directory "
                          f"of the tokenizer it runs")
        self.name, self.cfg = name, cfg
        self.path = under(root, cfg.tokenizer)
        self._tok: Any = None

    @property
    def identity(self) -> dict[str, Any]:
        return identity(self.cfg)

    def tokenizer(self) -> Any:
        if self._tok is None:
            from transformers import AutoTokenizer

            if not self.path.is_dir():
                raise KdError(f"teachers.{self.name}.tokenizer: {self.cfg.tokenizer} is not a directory")
            self._tok = AutoTokenizer.from_pretrained(self.path)
        return self._tok

    def vocab_size(self) -> int:
        """The tokenizer's length, or the model's (padded) vocabulary when its config.json lies beside it."""
        config = self.path / "config.json"
        width = 0
        if config.is_file():
            data = json.loads(config.read_text())
            width = int(data.get("vocab_size") or (data.get("text_config") or {}).get("vocab_size") or 0)
        return max(len(self.tokenizer()), width)

    def score(self, items: list[Item], top_k: int, on_result: Callable[[Item, dict[str, Any]], None]) -> None:
        """Ask the server for each item's prompt log-probs; `on_result(item, tensors or a refusal)` as each arrives."""
        client = OpenAITeacher(self.name, self.cfg)  # here, not in __init__: `kd status` needs no API key
        by_key = {it.key: it for it in items}
        client.complete([(it.key, request(it.ids, top_k)) for it in items],
                        lambda key, content, at: parse(by_key[key], top_k, content),
                        lambda key, response: on_result(by_key[key], response))


def feature_teacher(name: str, cfg: LocalConfig | OpenAIConfig, root: Path) -> LocalTeacher | ServedFeatures:
    return LocalTeacher(name, cfg, root) if isinstance(cfg, LocalConfig) else ServedFeatures(name, cfg, root)


def request(ids: list[int], top_k: int) -> dict[str, Any]:
    """The completions body: the ids as the prompt, one greedy token (vLLM needs >= 1), top-k per prompt position."""
    return {"prompt": ids, "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": top_k}


def parse(item: Item, top_k: int, content: bytes) -> dict[str, Any]:
    """The item's tensors from a completions body; ValueError (retried, then a one-line failure) when unusable."""
    try:
        positions = json.loads(content)["choices"][0]["prompt_logprobs"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, IndexError, TypeError):
        raise ValueError(f"body of {len(content)} bytes has no choices[0].prompt_logprobs "
                         f"(does the server return prompt log-probs? vLLM does)") from None
    return topk_tensors(item, positions, top_k)


def topk_tensors(item: Item, positions: Any, top_k: int) -> dict[str, Any]:
    """The local capture's tensors from a server's per-position log-probs; ValueError when they do not fit."""
    import torch

    if not isinstance(positions, list) or len(positions) != len(item.ids):
        raise ValueError(f"prompt_logprobs has {len(positions) if isinstance(positions, list) else 'no'} positions "
                         f"for {len(item.ids)} prompt tokens")
    ids, values, tails = [], [], []
    for t in range(item.start, len(item.ids)):  # completion token t: the distribution at prompt position t
        entry = positions[t]
        try:
            pairs = sorted(((float(v["logprob"]), int(k)) for k, v in entry.items()), key=lambda p: (-p[0], p[1]))
        except (AttributeError, KeyError, TypeError, ValueError):
            raise ValueError(f"prompt_logprobs[{t}] is not a {{token id: {{logprob}}}} map") from None
        if len(pairs) < top_k:
            raise ValueError(f"prompt_logprobs[{t}] has {len(pairs)} entries, fewer than top_k {top_k} "
                             f"(start vLLM with --max-logprobs >= {top_k})")
        top = pairs[:top_k]
        ids.append([i for _, i in top])
        values.append([v for v, _ in top])
        # the mass outside the top k, in float64 so a near-1 top mass does not round to log(0)
        rest = 1.0 - math.fsum(math.exp(v) for v, _ in top)
        tails.append(max(math.log(rest), TAIL_FLOOR) if rest > 0 else TAIL_FLOOR)
    return {"input_ids": torch.tensor(item.ids, dtype=torch.int32), "topk_ids": torch.tensor(ids, dtype=torch.int32),
            "topk_logprobs": torch.tensor(values, dtype=torch.float32).half(),
            "tail_logprob": torch.tensor(tails, dtype=torch.float32).half()}
