"""One tokenisation of prompt + completion records for every objective, and a digest that says two
tokenizers mean the same thing by the same ids.

Stored teacher logits are indexed by token position, so the feature stage and every student must cut a
record into exactly the same ids; both call `encode`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from kd.errors import KdError


def record_prompt(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The conversation a record's answer follows: its `prompt`, or its `messages` before the last turn."""
    return record["prompt"] if "prompt" in record else record["messages"][:-1]


def split_record(record: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(prompt messages, completion messages) of a conversational record: `prompt` + `completion`, or
    `messages` whose last assistant turn is the completion."""
    rid = record.get("id", "?")
    if "prompt" in record and "completion" in record:
        prompt, completion = record["prompt"], record["completion"]
    elif "messages" in record and record["messages"] and record["messages"][-1].get("role") == "assistant":
        # A `messages` record: the last assistant turn is the completion, everything before it the prompt.
        prompt, completion = record["messages"][:-1], record["messages"][-1:]
    else:
        raise KdError(f"record {rid}: needs `prompt` + `completion` (or `messages` ending with an assistant turn)")
    if not isinstance(prompt, list) or not isinstance(completion, list):
        raise KdError(f"record {rid}: `prompt` and `completion` must be lists of chat messages "
                      f"(conversational format), not plain strings")
    return prompt, completion


def _ids(tokenizer: Any, messages: list[dict[str, Any]], **kw: Any) -> list[int]:
    # transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True); older versions a list.
    out = tokenizer.apply_chat_template(messages, tokenize=True, **kw)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def encode(tokenizer: Any, record: dict[str, Any], max_length: int) -> tuple[list[int], int]:
    """Token ids of a prompt + completion record through the chat template, and where the completion starts.

    The prompt is rendered with the generation prompt (`<|im_start|>assistant\\n` for ChatML), the whole
    conversation without it; the second must start with the first, else token positions of the completion
    would be ambiguous. Truncation keeps the prompt and cuts the completion: a record left with no
    completion token comes back with `completion_start == len(ids)`, and the caller skips (rejects) it.

    Raises:
        KdError: naming the record when its chat template output does not extend the prompt.
    """
    prompt, completion = split_record(record)
    prompt_ids = _ids(tokenizer, prompt, add_generation_prompt=True)
    full = _ids(tokenizer, prompt + completion)
    if full[:len(prompt_ids)] != prompt_ids:
        raise KdError(f"record {record.get('id', '?')}: the chat template renders prompt + completion so that it "
                      f"does not start with the rendered prompt; its completion tokens cannot be located")
    if len(prompt_ids) >= max_length:
        return prompt_ids, len(prompt_ids)
    return full[:max_length], len(prompt_ids)


def _merge(m: Any) -> str:
    # tokenizers writes merges as "a b" (old) or ["a", "b"] (new); one form keeps the digest stable.
    return m if isinstance(m, str) else " ".join(m)


def tokenizer_digest(tokenizer: Any) -> str:
    """sha256 over what decides which id a text becomes: vocabulary, merges, added and special tokens,
    normaliser and pre-tokeniser, and the chat template.

    Equal for the same tokenizer loaded from a model directory, from a GGUF, or re-saved with a student.
    The pad token is left out on purpose: trainers often set it (to eos) without changing any id's meaning.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        model = dict(spec.get("model") or {})
        if isinstance(model.get("merges"), list):
            model["merges"] = [_merge(m) for m in model["merges"]]
        core: dict[str, Any] = {
            "model": model,
            "added_tokens": sorted((a["id"], a["content"], bool(a.get("special"))) for a in spec.get("added_tokens", [])),
            "normalizer": spec.get("normalizer"),
            "pre_tokenizer": spec.get("pre_tokenizer"),
        }
    else:  # a slow (Python) tokenizer: its vocabulary is all we can see
        core = {"vocab": sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])}
    core["special"] = {name: getattr(tokenizer, name, None) for name in ("bos_token", "eos_token", "unk_token")}
    core["chat_template"] = getattr(tokenizer, "chat_template", None)
    text = json.dumps(core, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
