"""One tokenisation of prompt + completion records for every objective, and a digest that says two
tokenizers mean the same thing by the same ids.

Stored teacher logits are indexed by token position, so the feature stage and every student must cut a
record into exactly the same ids; both call `encode`.
"""

from __future__ import annotations

import hashlib
import json
import re
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


def control_tokens(tokenizer: Any) -> list[str]:
    """The texts a tokenizer turns into special ids wherever they appear (`<|im_start|>`, `<|eot_id|>`, ...),
    longest first as the tokenizer matches them."""
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    names = {t.content for t in added.values() if t.special} | set(getattr(tokenizer, "all_special_tokens", []))
    return sorted((n for n in names if n), key=len, reverse=True)


def holds_control_tokens(tokenizer: Any, messages: list[dict[str, Any]]) -> bool:
    """Whether any message's text contains one of the tokenizer's control tokens (kd.runtime.tokenize.chat_ids
    keeps such text as text; a trainer that applies the chat template itself would read it as structure)."""
    specials = control_tokens(tokenizer)
    return any(s in m["content"] for m in messages if isinstance(m.get("content"), str) for s in specials)


def _template_ids(tokenizer: Any, messages: list[dict[str, Any]], **kw: Any) -> list[int]:
    # transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True); older versions a list.
    out = tokenizer.apply_chat_template(messages, tokenize=True, **kw)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def chat_ids(tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool = False,
             where: str = "a conversation") -> list[int]:
    """Token ids of `messages` through the tokenizer's chat template, in which only the template's own control
    tokens are control tokens: `hi<|im_end|>\n<|im_start|>system\n...` in a message's text stays text and
    cannot forge a turn. Every chat template applied to kd's messages goes through here.

    Messages without control-token text get exactly the ids `apply_chat_template(tokenize=True)` gives. The
    others: the template is rendered once more with a marker for each message's text, so the text's place in
    the rendered conversation is known; the template's control tokens there become their ids, and the rest is
    encoded with `split_special_tokens=True`, as plain text.

    Raises:
        KdError: naming `where`, when a message holds control-token text and the chat template rewrites message
            text beyond trimming it, so its place cannot be known.
    """
    if not holds_control_tokens(tokenizer, messages):
        return _template_ids(tokenizer, messages, add_generation_prompt=add_generation_prompt)
    specials = control_tokens(tokenizer)
    texts = [m.get("content") if isinstance(m.get("content"), str) else "" for m in messages]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    marks = [f"\ue000kd-message-{i}\ue001" for i in range(len(messages))]
    skeleton = tokenizer.apply_chat_template([{**m, "content": marks[i]} if isinstance(m.get("content"), str) else m
                                              for i, m in enumerate(messages)],
                                             tokenize=False, add_generation_prompt=add_generation_prompt)
    spans = _spans(text, re.split("(" + "|".join(map(re.escape, marks)) + ")", skeleton), marks, texts)
    if spans is None:
        raise KdError(f"{where}: a message holds control-token text ({', '.join(s for s in specials if any(s in t for t in texts))}) "
                      f"and the chat template rewrites message text, so it cannot be kept from becoming structure")
    control = re.compile("(" + "|".join(map(re.escape, specials)) + ")")
    ids: list[int] = []
    run = ""  # text between two of the template's control tokens: template text and message text, as plain text
    for piece, is_message in spans:
        parts = [piece] if is_message else control.split(piece)
        for n, part in enumerate(parts):
            if n % 2:  # a control token the template wrote
                ids += _plain(tokenizer, run) + [tokenizer.convert_tokens_to_ids(part)]
                run = ""
            else:
                run += part
    return ids + _plain(tokenizer, run)


def _plain(tokenizer: Any, text: str) -> list[int]:
    """`text` encoded with no special token recognised in it."""
    if not text:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a slow tokenizer takes the choice per call
        return list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])
    # `tokenizer(..., split_special_tokens=True)` leaves the flag set on the shared backend, and TRL's GKD collator
    # encodes through the backend directly: it would then read the template's own control tokens as text
    before = backend.encode_special_tokens
    backend.encode_special_tokens = True
    try:
        return list(backend.encode(text, add_special_tokens=False).ids)
    finally:
        backend.encode_special_tokens = before


def _spans(text: str, skeleton: list[str], marks: list[str], texts: list[str]) -> list[tuple[str, bool]] | None:
    """`text` cut into (piece, is a message's text) along the skeleton's template pieces and markers; None when
    the rendered text is not the skeleton with each marker replaced by its message's text (or that text trimmed,
    as Llama-3's template does)."""
    spans, at = [], 0
    for n, piece in enumerate(skeleton):
        if n % 2 == 0:
            if not text.startswith(piece, at):
                return None
            spans.append((piece, False))
            at += len(piece)
            continue
        following = skeleton[n + 1] if n + 1 < len(skeleton) else ""
        i = marks.index(piece)
        for option in dict.fromkeys((texts[i], texts[i].strip())):
            if text.startswith(option + following, at):
                spans.append((option, True))
                at += len(option)
                break
        else:
            return None
    return spans if at == len(text) else None


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
    where = f"record {record.get('id', '?')}"
    prompt_ids = chat_ids(tokenizer, prompt, add_generation_prompt=True, where=where)
    full = chat_ids(tokenizer, prompt + completion, where=where)
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
