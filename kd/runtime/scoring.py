"""White-box scorers that answer like teachers: a teacher's log-likelihood of a completion (`loglik`), its
choice among short options (`choice`), and a reward model's scalar (`reward`). Their answers are request-cache
entries (requests with `"kind"`), so kd.runtime.ask counts and caches them like any teacher's.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from kd.cache.store import request_key
from kd.errors import KdError
from kd.runtime.ask import Asker, Call
from kd.runtime.local import LocalTeacher
from kd.runtime.models import directory_digest
from kd.runtime.quality import repeats
from kd.runtime.tokenize import encode

SCORE_DIGITS = 6  # scores are rounded so float noise below this never changes a record's bytes


def score_call(asker: Asker, kind: str, prompt: list[dict[str, str]], completion: str, max_length: int) -> Call:
    """A white-box scoring request: the conversation prompt, the completion, and the token budget. A `loglik`
    request names the judge score it asks for, so a change of the score never reuses old cached answers."""
    identity = asker.teacher.identity
    request = {"kind": kind, "backend": identity["backend"], "teacher": identity, "messages": prompt,
               "completion": completion, "max_length": max_length}
    if kind == "loglik":
        request["score"] = JUDGE_SCORE
    return Call(request_key(request), request, None)


JUDGE_SCORE = "mean_logprob_repeat_floor_v1"
REPEAT_FLOOR = -10.0  # the log-probability a token that repeats a 4-gram of its own answer is scored at


def judge_score(token_logprobs: list[float], ids: list[int]) -> float:
    """The likelihood judge's score of a completion: its mean token log-probability under the teacher, with every
    token that completes a 4-gram already seen in the completion scored at REPEAT_FLOOR.

    A plain mean rewards loops: once a model repeats itself, each next repetition is very likely, and blank lines
    scored −2.5 against −7.9 for real answers. The floor makes a loop the least likely thing a judge can see,
    while ordinary text (which rarely repeats a 4-gram) keeps its plain mean; an empty completion scores the floor.
    """
    if not token_logprobs:
        return REPEAT_FLOOR
    floored = [REPEAT_FLOOR if r else lp for lp, r in zip(token_logprobs, repeats(ids), strict=True)]
    return sum(floored) / len(floored)


def _encode_all(tok: Any, items: list[tuple[str, dict[str, Any]]]
                ) -> tuple[dict[str, tuple[list[int], int]], list[tuple[str, dict[str, Any]]]]:
    """Token ids (chat template, teacher-forced) and completion start per key; the answers of those that cannot
    be scored (over-long, or a text the chat template cannot place after its prompt) are given back at once."""
    encoded, unscored = {}, []
    for key, req in items:
        record = {"prompt": req["messages"], "completion": [{"role": "assistant", "content": req["completion"]}]}
        try:
            ids, start = encode(tok, record, 10**9)
        except KdError:  # e.g. leading newlines that merge with the template's own into one token
            unscored.append((key, {"text": "", "finish_reason": "unencodable",
                                   "usage": {"prompt_tokens": 0, "completion_tokens": 0}}))
            continue
        if len(ids) > req["max_length"]:
            unscored.append((key, _too_long(len(ids))))  # a mean over a cut-off candidate would judge another text
        else:
            encoded[key] = (ids, start)
    return encoded, unscored


def _length_sorted_batches(encoded: dict[str, tuple[list[int], int]], size: int) -> list[list[str]]:
    keys = sorted(encoded, key=lambda k: (len(encoded[k][0]), k))  # similar lengths pad little
    return [keys[i:i + size] for i in range(0, len(keys), size)]


def _right_padded(rows: list[list[int]], pad: int) -> tuple[Any, Any]:
    import torch

    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, :len(row)] = torch.tensor(row)
        mask[r, :len(row)] = 1
    return ids, mask


def _too_long(n: int) -> dict[str, Any]:
    return {"text": "", "finish_reason": "length", "usage": {"prompt_tokens": n, "completion_tokens": 0}}


class LoglikScorer:
    """The teacher's mean token log-probability of a completion after its prompt (length-normalised).

    Teacher-forced through the chat template (kd.runtime.tokenize.encode, as students are trained), batched
    with right padding, log_softmax in float32 whatever dtype the model runs in.
    """

    def __init__(self, teacher: LocalTeacher, batch_size: int) -> None:
        self.teacher, self.batch_size = teacher, batch_size
        self.name = teacher.name

    @property
    def identity(self) -> dict[str, Any]:
        return self.teacher.identity

    def generate(self, items: Iterable[tuple[str, dict[str, Any]]], on_result: Any) -> None:
        items = list(items)  # sorted into batches by length: all of them at once
        if not items:
            return
        model, tok = self.teacher.loaded()
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        choices = [(k, r) for k, r in items if r.get("kind") == "choice"]
        if choices:
            self._choose(model, tok, pad, choices, on_result)
        scored = [(k, r) for k, r in items if r.get("kind") != "choice"]
        for key, req in scored:
            if not req["completion"].strip():  # nothing said: the floor, without asking
                on_result(key, {"text": "", "finish_reason": "stop", "score": REPEAT_FLOOR,
                                "usage": {"prompt_tokens": 0, "completion_tokens": 0}})
        encoded, unscored = _encode_all(tok, [(k, r) for k, r in scored if r["completion"].strip()])
        for key, answer in unscored:
            on_result(key, answer)
        for batch in _length_sorted_batches(encoded, self.batch_size):
            means = judge_scores(model, [encoded[k] for k in batch], pad, self.teacher.device)
            for key, mean in zip(batch, means, strict=True):
                on_result(key, {"text": "", "finish_reason": "stop", "score": round(mean, SCORE_DIGITS),
                                "usage": {"prompt_tokens": len(encoded[key][0]), "completion_tokens": 0}})

    def _choose(self, model: Any, tok: Any, pad: int, items: list[tuple[str, dict[str, Any]]], on_result: Any) -> None:
        """`choice` requests: the log-probability of each option's first token where the assistant's answer
        begins, from one forward pass of the prompt (the options must start with different tokens)."""
        import torch

        encoded: dict[str, tuple[list[int], int]] = {}
        firsts: dict[str, list[int]] = {}
        for key, req in items:
            rows = [encode(tok, {"prompt": req["messages"], "completion": [{"role": "assistant", "content": o}]},
                    10**9) for o in req["options"]]
            prompt = rows[0][0][:rows[0][1]]
            if len(prompt) > req["max_length"]:
                on_result(key, _too_long(len(prompt)))
                continue
            firsts[key] = [ids[start] for ids, start in rows]
            if len(set(firsts[key])) < len(firsts[key]) or any(ids[:start] != prompt for ids, start in rows):
                raise KdError(f"judge options {req['options']} must begin with different tokens after one prompt")
            encoded[key] = (prompt, len(prompt))
        for batch in _length_sorted_batches(encoded, self.batch_size):
            ids, mask = _right_padded([encoded[k][0] for k in batch], pad)
            first = min(encoded[k][1] for k in batch) - 1
            with torch.inference_mode():
                logits = model(input_ids=ids.to(self.teacher.device), attention_mask=mask.to(self.teacher.device),
                               logits_to_keep=ids.shape[1] - first).logits
            for row, key in enumerate(batch):
                logp = torch.log_softmax(logits[row, encoded[key][1] - 1 - first].float(), dim=-1)
                scores = [round(logp[t].item(), SCORE_DIGITS) for t in firsts[key]]
                on_result(key, {"text": "", "finish_reason": "stop", "scores": scores,
                                "usage": {"prompt_tokens": encoded[key][1], "completion_tokens": 0}})


def choice_call(asker: Asker, messages: list[dict[str, str]], options: tuple[str, ...], max_length: int) -> Call:
    """A white-box multiple-choice request: which of `options` the judge is likeliest to begin its answer with."""
    identity = asker.teacher.identity
    request = {"kind": "choice", "backend": identity["backend"], "teacher": identity, "messages": messages,
               "options": list(options), "max_length": max_length}
    return Call(request_key(request), request, None)


def judge_scores(model: Any, rows: list[tuple[list[int], int]], pad: int, device: Any) -> list[float]:
    """`judge_score` of each row's completion tokens `ids[start:]` under a causal LM, teacher-forced.

    One batch, right-padded; logits only from the earliest completion on; log_softmax in float32 whatever
    dtype the model runs in. The likelihood judge, the evaluation's judge column and the RL students' teacher
    reward all call this, so a reward in training is the score the judge gives.

    Args:
        rows: (token ids, completion start) per sequence, as `kd.runtime.tokenize.encode` returns them.
    """
    import torch

    ids, mask = _right_padded([r[0] for r in rows], pad)
    first = min(start for _, start in rows) - 1  # logits before the earliest completion are not needed
    with torch.inference_mode():
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                       logits_to_keep=ids.shape[1] - first).logits
    out = []
    for row, (row_ids, start) in enumerate(rows):
        # logits[:, j] is position first + j; token t is predicted at position t - 1
        pos = slice(start - 1 - first, len(row_ids) - 1 - first)
        logp = torch.log_softmax(logits[row, pos].float(), dim=-1)
        target = torch.tensor(row_ids[start:], device=logp.device)
        out.append(judge_score(logp.gather(-1, target[:, None])[:, 0].tolist(), row_ids[start:]))
    return out


def load_reward_model(path: Path) -> tuple[Any, Any]:
    """A reward model directory as (AutoModelForSequenceClassification in float32, eval mode; tokenizer)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32, use_safetensors=True).eval()
    if model.config.num_labels != 1:
        raise KdError(f"reward_model: {path} has {model.config.num_labels} labels; a reward model has one "
                      f"(a scalar score)")
    if model.config.pad_token_id is None:  # batches need it to find each row's last token
        model.config.pad_token_id = tok.pad_token_id or tok.eos_token_id
    model.requires_grad_(False)
    return model, tok


def reward_scores(model: Any, rows: list[list[int]]) -> list[float]:
    """A reward model's scalar for each token sequence (prompt + completion through the chat template), one
    right-padded batch. `RewardScorer` and the RL students' reward both call this, so a reward in training is
    the score kd's reward filter and evaluation give."""
    import torch

    ids, mask = _right_padded(rows, model.config.pad_token_id)
    with torch.inference_mode():
        return model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits[:, 0].float().tolist()


def reward_identity(path: Path) -> dict[str, Any]:
    """A reward model directory's identity (it answers `reward` requests like a teacher)."""
    if not path.is_dir():
        raise KdError(f"reward_model: {path} does not exist (train it first: `dvc repro {path.name}`)")
    return {"backend": "reward_model", "model": path.name, "digest": directory_digest(path)}


class RewardScorer:
    """A reward model directory (AutoModelForSequenceClassification, num_labels=1): its scalar on the
    prompt + completion conversation, as TRL's RewardTrainer trains it."""

    def __init__(self, path: Path, batch_size: int, loaded: tuple[Any, Any] | None = None) -> None:
        """`loaded`: an in-memory (model, tokenizer) to score with instead of loading `path` (a reward model
        being trained, scored by exactly the code that later scores its saved directory)."""
        self.path, self.batch_size = path, batch_size
        self.name = path.name
        self._identity: dict[str, Any] | None = None
        self._model, self._tok = loaded or (None, None)

    @property
    def identity(self) -> dict[str, Any]:
        if self._identity is None:
            self._identity = reward_identity(self.path)
        return self._identity

    def generate(self, items: Iterable[tuple[str, dict[str, Any]]], on_result: Any) -> None:
        items = list(items)  # sorted into batches by length: all of them at once
        if not items:
            return
        if self._model is None:
            self._model, self._tok = load_reward_model(self.path)
        encoded, unscored = _encode_all(self._tok, items)
        for key, answer in unscored:
            on_result(key, answer)
        for batch in _length_sorted_batches(encoded, self.batch_size):
            scores = reward_scores(self._model, [encoded[k][0] for k in batch])
            for key, score in zip(batch, scores, strict=True):
                on_result(key, {"text": "", "finish_reason": "stop", "score": round(score, SCORE_DIGITS),
                                "usage": {"prompt_tokens": len(encoded[key][0]), "completion_tokens": 0}})
