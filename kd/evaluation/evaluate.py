"""Evaluation (issue 3 §6): the teacher, the untrained baseline and every student on held-out prompts.

Every model answers the same prompts greedily (batched, left padding, as the local teacher does). Then:
- teacher-agreement: token-level KL(teacher || model) over the full vocabulary on the *teacher's* answers,
  teacher-forced, in float32 and averaged over all completion tokens (the quantity KD minimises);
- the teacher's mean per-token log-probability of the *model's* answers (does the teacher find them likely?);
- ROUGE-L F1 of each answer against the teacher's (kd.runtime.novelty's bit-parallel LCS on ROUGE words);
- exact match against short seed references, normalised, and a lenient "appears as a whole word" variant;
- mean answer length in tokens (the end-of-turn token not counted);
- with `evaluation.reward_model` / `judge`: every model's mean reward and each student's win rate against the
  baseline, judged by the teacher in both orders (kd/eval_feedback.py).

Results are deterministic for the same models (greedy decoding, fixed batch composition); wall times are
kept apart from the metrics so reports stay byte-stable. kd/report.py writes the files.

References: Lin 2004, "ROUGE"; Gu et al. 2024, "MiniLLM" (teacher-scored student outputs); Agarwal et al.
2024, "On-Policy Distillation of Language Models" (GKD; token-level divergences on teacher outputs).
"""

from __future__ import annotations

import sys
import time
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from kd.config import Params
from kd.errors import KdError
from kd.evaluation.feedback import add_feedback, check
from kd.evaluation.results import BASELINE, TEACHER, EvalPrompt, ModelResult, Output, Run
from kd.paths import MODELS_DIR, under
from kd.records import read_jsonl, sha256_text
from kd.runtime.device import resolve_device
from kd.runtime.init import init_student
from kd.runtime.local import generate_ids
from kd.runtime.models import directory_digest, load_teacher, read_info
from kd.runtime.novelty import rouge_l, words
from kd.runtime.tokenize import encode, tokenizer_digest


def load_prompts(path: Path) -> list[EvalPrompt]:
    rows = read_jsonl(path)
    if not rows:
        raise KdError(f"{path}: no prompts")
    out = []
    for n, r in enumerate(rows, 1):
        if not isinstance(r.get("instruction"), str) or not r["instruction"].strip():
            raise KdError(f"{path}:{n}: needs a non-empty `instruction`")
        out.append(EvalPrompt(str(r.get("id", n)), str(r.get("category") or "uncategorised"), r["instruction"],
                              str(r.get("reference") or "")))
    if len({p.id for p in out}) != len(out):
        raise KdError(f"{path}: prompt ids are not unique")
    return out


def normalise(text: str) -> str:
    """Lower case, punctuation (and markdown marks such as ` and ^) deleted, whitespace collapsed."""
    kept = "".join(c for c in text.lower() if not unicodedata.category(c).startswith(("P", "Sk")))
    return " ".join(kept.split())


def exact_match(answer: str, reference: str) -> bool:
    return normalise(answer) == normalise(reference) != ""


def contains_match(answer: str, reference: str) -> bool:
    """The reference appears as whole words in the answer ("The answer is 56." contains "56", "560" not)."""
    ref = normalise(reference)
    return bool(ref) and f" {ref} " in f" {normalise(answer)} "


def rouge(a: str, b: str) -> float:
    """ROUGE-L F1 of two texts; two empty answers agree perfectly."""
    vocab: dict[str, int] = {}
    ia, ib = ([vocab.setdefault(w, len(vocab)) for w in words(t)] for t in (a, b))
    return 1.0 if not ia and not ib else rouge_l(ia, ib)


def chat_ids(tok: Any, messages: list[dict[str, str]]) -> list[int]:
    out = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _progress(total: int, desc: str) -> Any:
    return tqdm(total=total, desc=desc, unit="prompt", file=sys.stderr, disable=None, dynamic_ncols=True)


def generate(model: Any, tok: Any, prompts: list[list[int]], max_new_tokens: int, batch_size: int,
             device: Any, desc: str = "generate") -> list[Output]:
    """Greedy answers in the prompts' order; similar lengths share a batch so little goes to padding."""
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    out: list[Output | None] = [None] * len(prompts)
    with _progress(len(prompts), desc) as bar:
        for s in range(0, len(order), batch_size):
            rows = order[s:s + batch_size]
            for i, (ids, stopped) in zip(rows, generate_ids(model, tok, [prompts[i] for i in rows], max_new_tokens,
                                                            device), strict=True):
                text = tok.decode(ids[:-1] if stopped else ids, skip_special_tokens=True).strip()
                out[i] = Output(ids, stopped, text)
            bar.update(len(rows))
    return [o for o in out if o is not None]


def _logprobs(model: Any, seqs: list[tuple[list[int], list[int]]], vocab: int, device: Any) -> Iterator[Any]:
    """Per sequence, float32 log-softmax over the first `vocab` logits at each position that predicts a
    completion token; one row at a time, so a batch never holds its float32 vocabulary-wide copy at once.

    Right padding: positions start at 0 in every row, and pads come after all real tokens, so under the
    causal mask they change nothing."""
    import torch

    width = max(len(p) + len(c) for p, c in seqs)
    ids = torch.zeros((len(seqs), width), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, (p, c) in enumerate(seqs):
        ids[row, :len(p) + len(c)] = torch.tensor(p + c)
        mask[row, :len(p) + len(c)] = 1
    # No grad-mode context may stay open across a `yield`: it would leak into the caller (and disable
    # autograd for whatever runs next in the process).
    with torch.inference_mode():
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
    for row, (p, c) in enumerate(seqs):
        with torch.inference_mode():
            out = torch.log_softmax(logits[row, len(p) - 1:len(p) + len(c) - 1, :vocab].float(), dim=-1)
        yield out


def _vocab(model: Any) -> int:
    return model.get_output_embeddings().weight.shape[0]


def teacher_logprob(teacher: Any, seqs: list[tuple[list[int], list[int]]], batch_size: int, device: Any) -> float:
    """Mean per-token log-probability the teacher gives the completions, teacher-forced, over all tokens."""
    import torch

    total, count = 0.0, 0
    for s in range(0, len(seqs), batch_size):
        batch = seqs[s:s + batch_size]
        for lp, (_, c) in zip(_logprobs(teacher, batch, _vocab(teacher), device), batch, strict=True):
            total += lp.gather(-1, torch.tensor(c, device=lp.device)[:, None]).sum().item()
            count += len(c)
    return total / max(count, 1)


def token_kl(teacher: Any, model: Any, seqs: list[tuple[list[int], list[int]]], batch_size: int,
             device: Any) -> float:
    """KL(teacher || model) over the full vocabulary, in float32, averaged over all completion tokens.

    Both models see identical padded batches, so a model equal to the teacher scores exactly 0.
    """
    vocab = min(_vocab(teacher), _vocab(model))  # rows past the tokenizer's last id (padding) never occur
    total, count = 0.0, 0
    for s in range(0, len(seqs), batch_size):
        batch = seqs[s:s + batch_size]
        for t, m in zip(_logprobs(teacher, batch, vocab, device), _logprobs(model, batch, vocab, device), strict=True):
            total += (t.exp() * (t - m)).sum().item()
            count += t.shape[0]
    return total / max(count, 1)


@dataclass
class _Teacher:
    model: Any
    tok: Any
    digest: str  # tokenizer digest: models sharing it are scored on token ids, others re-tokenised
    prompt_ids: list[list[int]]
    outputs: list[Output]


def _score(name: str, kind: str, about: dict[str, Any], model: Any, tok: Any, t: _Teacher, run: Run,
           batch_size: int, device: Any) -> ModelResult:
    """Generate with one model and compute every metric against the teacher."""
    start = time.perf_counter()
    same_tok = tokenizer_digest(tok) == t.digest
    prompt_ids = t.prompt_ids if same_tok else [chat_ids(tok, p.messages) for p in run.prompts]
    outputs = t.outputs if model is t.model else generate(model, tok, prompt_ids, run.max_new_tokens, batch_size,
                                                          device, desc=f"evaluate {name}")
    generated = time.perf_counter()
    if same_tok:
        scored = [(p, o.ids) for p, o in zip(t.prompt_ids, outputs, strict=True)]
    else:  # the teacher reads the answer through its own chat template, as training data would be encoded
        scored = []
        for p, o in zip(run.prompts, outputs, strict=True):
            record = {"prompt": p.messages, "completion": [{"role": "assistant", "content": o.text}]}
            ids, cut = encode(t.tok, record, 1 << 30)
            scored.append((ids[:cut], ids[cut:]))
    teacher_seqs = [(p, o.ids) for p, o in zip(t.prompt_ids, t.outputs, strict=True)]
    if model is t.model:
        kl: float | None = 0.0
    else:
        kl = token_kl(t.model, model, teacher_seqs, batch_size, device) if same_tok else None
    targets = [(p, o) for p, o in zip(run.prompts, outputs, strict=True) if p.exact_target]
    metrics = {
        "kl": kl,
        "teacher_logprob": teacher_logprob(t.model, scored, batch_size, device),
        "rouge_l": sum(rouge(o.text, r.text) for o, r in zip(outputs, t.outputs, strict=True)) / len(outputs),
        "exact_match": sum(exact_match(o.text, p.reference) for p, o in targets) / len(targets) if targets else None,
        "contains_match": sum(contains_match(o.text, p.reference) for p, o in targets) / len(targets) if targets else None,
        "length": sum(o.length for o in outputs) / len(outputs),
    }
    metrics = {k: None if v is None else round(v, 4) for k, v in metrics.items()}
    return ModelResult(name, kind, about, outputs, metrics, generated - start, time.perf_counter() - generated,
                       sum(len(o.ids) for o in outputs))


def _device(spec: str) -> Any:
    import torch

    return torch.device(resolve_device(spec))


def evaluate(params: Params, root: Path, log: Any = print) -> Run:
    """Evaluate `evaluation.teacher`, the baseline and `evaluation.students`; `log` receives timing lines.

    Raises:
        KdError: no `evaluation` section, a student named like a built-in row, or a student not built yet.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer


    cfg = params.evaluation
    if cfg is None:
        raise KdError("params.yaml: no `evaluation` section (teacher, students) to evaluate")
    for name in cfg.students:
        if name in (TEACHER, BASELINE):
            raise KdError(f"evaluation.students: '{name}' is the name of a built-in row of the report; rename the student")
    reward_model = check(params, root, {TEACHER, BASELINE, *cfg.students})
    prompts_path = root / cfg.prompts
    prompts = load_prompts(prompts_path)
    run = Run(prompts, cfg.prompts, sha256_text(prompts_path.read_text(encoding="utf-8")), cfg.max_new_tokens,
              cfg.teacher)
    started = time.perf_counter()
    tcfg = params.teachers[cfg.teacher]
    device = _device(tcfg.device)
    torch.manual_seed(0)  # greedy decoding draws nothing, but a model's code might; keep it fixed

    tmodel, ttok = load_teacher(params, cfg.teacher, root)
    tmodel.to(device)
    tpath = under(root, tcfg.path)
    prompt_ids = [chat_ids(ttok, p.messages) for p in prompts]
    t0 = time.perf_counter()
    t = _Teacher(tmodel, ttok, tokenizer_digest(ttok), prompt_ids,
                 generate(tmodel, ttok, prompt_ids, cfg.max_new_tokens, cfg.batch_size, device, desc="evaluate teacher"))
    generated = time.perf_counter()
    about = {"teacher": cfg.teacher, "path": tcfg.path, "digest": directory_digest(tpath),
             "dtype": str(tmodel.dtype).removeprefix("torch.")}
    res = _score(TEACHER, "teacher", about, tmodel, ttok, t, run, cfg.batch_size, device)
    res.generate_s = generated - t0
    _log(log, res)
    run.results.append(res)

    # Every model runs in the teacher's dtype: one precision for all rows of the table (a copy of the teacher
    # then scores KL 0 exactly), and bf16 generation is ~3x faster than float32 on CPU.
    dtype = tmodel.dtype
    base = cfg.baseline or cfg.students[0]
    bcfg = params.students[base]
    model, tok = init_student(bcfg.init, params, root, dtype, seed=bcfg.training.seed, key=f"students.{base}.init")
    about = {"student": base, "init": bcfg.init.model_dump(mode="json", exclude_none=True)}
    run.results.append(_log(log, _score(BASELINE, "baseline", about, model.to(device), tok, t, run, cfg.batch_size,
                                        device)))
    del model

    for name in cfg.students:
        mdir = root / MODELS_DIR / name
        info = read_info(mdir).model_dump(mode="json")
        tok = AutoTokenizer.from_pretrained(mdir)
        model = AutoModelForCausalLM.from_pretrained(mdir, dtype=dtype, use_safetensors=True).eval()
        run.results.append(_log(log, _score(name, "student", info, model.to(device), tok, t, run, cfg.batch_size,
                                            device)))
        del model
    if cfg.reward_model is not None or cfg.judge is not None:
        del t, tmodel  # a local judge loads its own copy of the teacher: never hold two
        add_feedback(run, params, root, reward_model, log)
    run.seconds = time.perf_counter() - started
    return run


def _log(log: Any, res: ModelResult) -> ModelResult:
    rate = res.tokens_generated / res.generate_s if res.generate_s else 0.0
    log(f"evaluate: {res.name}: {res.tokens_generated} tokens in {res.seconds:.1f} s (generate {res.generate_s:.1f} s "
        f"at {rate:.0f} tok/s, score {res.score_s:.1f} s)")
    return res


def best_agreement(run: Run) -> ModelResult | None:
    """The non-teacher model closest to the teacher: lowest KL, else highest ROUGE-L when KL is unknown."""
    rows = [r for r in run.results if r.kind != "teacher"]
    with_kl = [r for r in rows if r.metrics["kl"] is not None]
    if with_kl:
        return min(with_kl, key=lambda r: r.metrics["kl"])
    return max(rows, key=lambda r: r.metrics["rouge_l"] or 0.0, default=None)


def summary(run: Run) -> str:
    best = best_agreement(run)
    tail = ""
    if best is not None:
        kl = best.metrics["kl"]
        tail = f"; best teacher-agreement: {best.name} " + (f"(KL {kl:.2f})" if kl is not None
                                                             else f"(ROUGE-L {best.metrics['rouge_l']:.2f})")
    return f"evaluate: {len(run.results)} models x {len(run.prompts)} prompts in {run.seconds:.0f} s{tail}"
