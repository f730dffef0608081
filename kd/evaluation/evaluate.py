"""Evaluation: the teacher, a context-free baseline, the untrained baseline and every student on held-out prompts.

Every model answers the same prompts greedily (batched, left padding, as the local teacher does), asked the way
the students were trained (`evaluation.template`: the training template's system message). Per prompt:
- teacher-agreement: token-level KL(teacher ‖ model) over the full vocabulary on the *teacher's* answers,
  teacher-forced, in float32 (the quantity KD minimises); the `context_free` row is the best a model that ignores
  its context can do: one distribution, the teacher's mean next-token distribution over the evaluated positions;
- whether the answer ends with the end-of-turn token, and whether it is degenerate (empty, or looping:
  kd.runtime.quality), its distinct-2 and longest repeated run (generation stops a row once it repeats one
  token RUN times: its answer is degenerate whatever follows);
- the teacher's judge score of the answer: its mean token log-probability with repeated 4-grams scored at a
  floor (kd.runtime.scoring.judge_score), so a loop cannot look likely (a degenerate answer scores the floor);
- ROUGE-L F1 against the teacher's answer; exact match of the extracted final answer against short seed
  references, and whether the reference appears as whole words; all three on what the answer adds to the
  question (kd.runtime.quality.without_echo), and scored also for two cheap answers (the question echoed, a
  constant) that no row is credited for not beating;
- the answer's length in tokens (the end-of-turn token not counted).
Every figure is a ratio of per-prompt sums, so it carries a bootstrap interval over prompts (kd.evaluation.stats).
With `evaluation.reward_model` / `judge`, kd.evaluation.feedback adds rewards, win rates and the sanity set.

Results are deterministic for the same models (greedy decoding, fixed batch composition); wall times are kept
apart from the metrics so reports stay byte-stable. kd.evaluation.outputs writes the files.

References: Lin 2004, "ROUGE"; Gu et al. 2024, "MiniLLM" (teacher-scored student outputs); Agarwal et al.
2024, "On-Policy Distillation of Language Models" (GKD; token-level divergences on teacher outputs); Holtzman
et al. 2020, "The Curious Case of Neural Text Degeneration" (repetition in greedy decoding).
"""

from __future__ import annotations

import re
import sys
import time
import unicodedata
from pathlib import Path
from typing import Any

from tqdm import tqdm

from kd.config import Params
from kd.errors import KdError
from kd.evaluation import feedback
from kd.evaluation.results import (
    BASELINE,
    CONTEXT_FREE,
    ROWS,
    TEACHER,
    Comparison,
    EvalPrompt,
    ModelResult,
    Output,
    Run,
    Scores,
)
from kd.evaluation.stats import paired_difference
from kd.paths import MODELS_DIR, under
from kd.prompts import load_prompt
from kd.records import read_jsonl, sha256_text
from kd.runtime.device import resolve_device
from kd.runtime.environment import collect
from kd.runtime.init import init_student
from kd.runtime.local import generate_ids
from kd.runtime.models import directory_digest, load_teacher, read_info
from kd.runtime.novelty import rouge_l, words
from kd.runtime.quality import (
    CONSTANT_ANSWER,
    RUN,
    degeneracy,
    distinct_n,
    final_answer,
    longest_run,
    without_echo,
)
from kd.runtime.scoring import REPEAT_FLOOR, judge_scores
from kd.runtime.tokenize import chat_ids as conversation_ids
from kd.runtime.tokenize import encode, tokenizer_digest

VARIABLES = ("instruction", "category")  # what `evaluation.template` may use, as a labeling template


def load_prompts(path: Path, root: Path, template: str | None) -> list[EvalPrompt]:
    rows = read_jsonl(path)
    if not rows:
        raise KdError(f"{path}: no prompts")
    prompt = load_prompt(root, template, VARIABLES) if template else None
    out = []
    for n, r in enumerate(rows, 1):
        if not isinstance(r.get("instruction"), str) or not r["instruction"].strip():
            raise KdError(f"{path}:{n}: needs a non-empty `instruction`")
        category = str(r.get("category") or "uncategorised")
        user = {"role": "user", "content": r["instruction"]}
        # the training records keep the template's system message and the bare instruction as the user turn
        system = [m for m in prompt.render(instruction=r["instruction"], category=category)
                  if m["role"] == "system"] if prompt else []
        out.append(EvalPrompt(str(r.get("id", n)), category, r["instruction"], str(r.get("reference") or ""),
                              tuple(system + [user])))
    if len({p.id for p in out}) != len(out):
        raise KdError(f"{path}: prompt ids are not unique")
    return out


def normalise(text: str) -> str:
    """Lower case, punctuation (and markdown marks such as ` and ^) deleted, whitespace collapsed."""
    kept = "".join(c for c in text.lower() if not unicodedata.category(c).startswith(("P", "Sk")))
    return " ".join(kept.split())


# what an answer says last is its answer: "The chemical symbol for gold is Au." -> "au"
_COPULA = re.compile(r".*(?:\b(?:is|was|are|were|equals)\b|=)\s*(.+)$")


def extracted(answer: str, reference: str, question: str = "") -> str | None:
    """The answer's final answer, read the way the reference is written, from what the answer adds to the question
    (kd.runtime.quality.without_echo: an echo of "What is 144 divided by 12?" does not answer 12). For a numeric
    reference: the last number of what it states as its answer ("the answer is …"), else its last number; else
    what it states as its answer, or its last line, after its last "is"/"was"/"="."""
    text = without_echo(answer, question)
    stated = final_answer(text, "stated")
    if final_answer(reference, "last_number") == normalise(reference).replace(" ", ""):
        return final_answer(stated or "", "last_number") or final_answer(text, "last_number")
    m = _COPULA.match(stated or "")
    return m.group(1).strip(" .*_`\"'") or None if m else stated


def exact_match(answer: str, reference: str, question: str = "") -> bool:
    """The extracted final answer equals the reference, after normalising both."""
    got = extracted(answer, reference, question)
    return got is not None and normalise(got) == normalise(reference) != ""


def contains_match(answer: str, reference: str, question: str = "") -> bool:
    """The reference appears as whole words in what the answer adds to the question ("The answer is 56." contains
    "56", "560" not)."""
    ref = normalise(reference)
    return bool(ref) and f" {ref} " in f" {normalise(without_echo(answer, question))} "


def rouge(a: str, b: str, question: str = "") -> float:
    """ROUGE-L F1 of what two answers add to the question; two empty answers agree perfectly."""
    a, b = without_echo(a, question), without_echo(b, question)
    vocab: dict[str, int] = {}
    ia, ib = ([vocab.setdefault(w, len(vocab)) for w in words(t)] for t in (a, b))
    return 1.0 if not ia and not ib else rouge_l(ia, ib)


def chat_ids(tok: Any, messages: tuple[dict[str, str], ...]) -> list[int]:
    return conversation_ids(tok, list(messages), add_generation_prompt=True, where="an evaluation prompt")


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
            # a row stuck repeating one token is degenerate whatever follows: it does not hold the batch
            for i, (ids, stopped) in zip(rows, generate_ids(model, tok, [prompts[i] for i in rows], max_new_tokens,
                                                            device, stop_loops=RUN), strict=True):
                text = tok.decode(ids[:-1] if stopped else ids, skip_special_tokens=True).strip()
                out[i] = Output(ids, stopped, text)
            bar.update(len(rows))
    return [o for o in out if o is not None]


def completion_logprobs(model: Any, seqs: list[tuple[list[int], list[int]]], vocab: int, device: Any) -> list[Any]:
    """Per sequence, float32 log-softmax over the first `vocab` logits at each position that predicts one of its
    completion tokens (right padding: pads come after all real tokens, so under the causal mask they change
    nothing). Only those positions go through the LM head."""
    import torch

    width = max(len(p) + len(c) for p, c in seqs)
    ids = torch.zeros((len(seqs), width), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, (p, c) in enumerate(seqs):
        ids[row, :len(p) + len(c)] = torch.tensor(p + c)
        mask[row, :len(p) + len(c)] = 1
    first = min(len(p) for p, _ in seqs) - 1
    with torch.inference_mode():
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), logits_to_keep=width - first).logits
        return [torch.log_softmax(logits[row, len(p) - 1 - first:len(p) + len(c) - 1 - first, :vocab].float(), dim=-1)
                for row, (p, c) in enumerate(seqs)]


def _vocab(model: Any) -> int:
    return model.get_output_embeddings().weight.shape[0]


def teacher_judge(teacher: Any, seqs: list[tuple[list[int], list[int]]], batch_size: int, device: Any) -> list[float]:
    """The teacher's judge score of each (prompt ids, completion ids), as the likelihood judge scores it; batches
    of similar lengths, so little of the forward passes goes to padding."""
    order = sorted(range(len(seqs)), key=lambda i: (len(seqs[i][0]) + len(seqs[i][1]), i))
    out: list[float] = [0.0] * len(seqs)
    for s in range(0, len(order), batch_size):
        rows = order[s:s + batch_size]
        for i, score in zip(rows, judge_scores(teacher, [(seqs[i][0] + seqs[i][1], len(seqs[i][0])) for i in rows],
                                               0, device), strict=True):
            out[i] = score
    return out


class TeacherView:
    """The teacher's answers and its log-probabilities on them, computed once and compared with every model."""

    def __init__(self, model: Any, tok: Any, prompt_ids: list[list[int]], outputs: list[Output], batch_size: int,
                 device: Any) -> None:
        self.model, self.tok, self.prompt_ids, self.outputs = model, tok, prompt_ids, outputs
        self.digest = tokenizer_digest(tok) if tok is not None else None
        self.seqs = [(p, o.ids) for p, o in zip(prompt_ids, outputs, strict=True)]
        self.device = device
        # batches of similar lengths, so little of each forward pass goes to padding
        order = sorted(range(len(self.seqs)), key=lambda i: (len(self.seqs[i][0]) + len(self.seqs[i][1]), i))
        self.batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
        self.logprobs: list[Any] = [None] * len(self.seqs)
        for rows in self.batches:
            for i, lp in zip(rows, completion_logprobs(model, [self.seqs[i] for i in rows], _vocab(model), device),
                             strict=True):
                self.logprobs[i] = lp

    def kl(self, model: Any) -> list[tuple[float, int]]:
        """Per prompt, (Σ over the teacher's answer tokens of KL(teacher ‖ model), tokens)."""
        vocab = min(_vocab(self.model), _vocab(model))  # rows past the tokenizer's last id never occur
        out: list[tuple[float, int]] = [(0.0, 0)] * len(self.seqs)
        for rows in self.batches:
            for i, m in zip(rows, completion_logprobs(model, [self.seqs[i] for i in rows], vocab, self.device),
                            strict=True):
                t = self.logprobs[i][:, :vocab]
                out[i] = ((t.exp() * (t - m)).sum().item(), t.shape[0])
        return out

    def context_free(self) -> list[tuple[float, int]]:
        """Per prompt, the KL of the best context-free model: the teacher's mean distribution over every
        evaluated position (an oracle constant: it is fitted on the very positions it is scored on)."""
        total = sum(t.exp().sum(0) for t in self.logprobs)
        mean = (total / sum(t.shape[0] for t in self.logprobs)).clamp_min(1e-30).log()
        return [((t.exp() * (t - mean)).sum().item(), t.shape[0]) for t in self.logprobs]


def _content(o: Output) -> list[int]:
    """The answer's token ids without its end-of-turn token."""
    return o.ids[:-1] if o.stopped else o.ids


def _degenerate(o: Output) -> str | None:
    """Why an answer is degenerate, or None: an answer that decodes to nothing is empty."""
    return degeneracy(_content(o)) if o.text else "empty"


def scores_of(prompts: list[EvalPrompt], outputs: list[Output], kl: list[tuple[float, int]] | None,
              judge: list[float | None], degenerate: list[str | None], teacher: list[Output]) -> list[Scores]:
    """Every per-prompt figure of one model's answers (its KL and judge scores computed by the caller)."""
    out = []
    for i, (p, o) in enumerate(zip(prompts, outputs, strict=True)):
        content = _content(o)
        out.append(Scores(
            kl=kl[i] if kl else None, judge=judge[i], rouge=rouge(o.text, teacher[i].text, p.instruction),
            exact=exact_match(o.text, p.reference, p.instruction) if p.exact_target else None,
            contains=contains_match(o.text, p.reference, p.instruction) if p.exact_target else None,
            stopped=o.stopped, degenerate=degenerate[i],
            distinct_2=distinct_n(content, 2), longest_run=longest_run(content), length=o.length))
    return out


def cheap_answers(prompts: list[EvalPrompt], teacher: list[Output]) -> list[ModelResult]:
    """Two fixed answers scored on the text figures like a model's answers: the question echoed, and a constant
    (kd.runtime.quality.CONSTANT_ANSWER). What they score needs no model, so the report bolds no row that does
    not beat them."""
    out = []
    for name, texts in (("echo", [p.instruction for p in prompts]), ("constant", [CONSTANT_ANSWER] * len(prompts))):
        fixed = [Output([], True, t) for t in texts]
        out.append(ModelResult(name, "cheap", {}, None, scores_of(prompts, fixed, None, [None] * len(prompts),
                                                                  [None] * len(prompts), teacher)))
    return out


def _score(name: str, kind: str, about: dict[str, Any], model: Any, tok: Any, t: TeacherView, run: Run,
           batch_size: int, device: Any) -> ModelResult:
    """Generate with one model and compute every figure against the teacher."""
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
            record = {"prompt": list(p.messages), "completion": [{"role": "assistant", "content": o.text}]}
            ids, cut = encode(t.tok, record, 1 << 30)
            scored.append((ids[:cut], ids[cut:]))
    if model is t.model:
        kl: list[tuple[float, int]] | None = [(0.0, len(o.ids)) for o in t.outputs]
    else:
        kl = t.kl(model) if same_tok else None
    # A degenerate answer scores the judge's floor without a forward pass (it is what the floor is for).
    degenerate = [_degenerate(o) for o in outputs]
    sound = [i for i, why in enumerate(degenerate) if why is None]
    judged = dict(zip(sound, teacher_judge(t.model, [scored[i] for i in sound], batch_size, device), strict=True))
    scores = scores_of(run.prompts, outputs, kl, [judged.get(i, REPEAT_FLOOR) for i in range(len(outputs))], degenerate,
                     t.outputs)
    return ModelResult(name, kind, about, outputs, scores, generated - start, time.perf_counter() - generated)


def evaluate(params: Params, root: Path, log: Any = print) -> Run:
    """Evaluate `evaluation.teacher`, the context-free and untrained baselines and `evaluation.students`; `log`
    receives timing lines.

    Raises:
        KdError: no `evaluation` section, a student named like a built-in row, or a student not built yet.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = params.evaluation
    if cfg is None:
        raise KdError("params.yaml: no `evaluation` section (teacher, students) to evaluate")
    for name in cfg.students:
        if name in ROWS:
            raise KdError(f"evaluation.students: '{name}' is the name of a built-in row of the report; rename the student")
    reward_model = feedback.check(params, root)
    prompts_path = root / cfg.prompts
    prompts = load_prompts(prompts_path, root, cfg.template)
    run = Run(prompts, cfg.prompts, sha256_text(prompts_path.read_text(encoding="utf-8")), cfg.template,
              cfg.max_new_tokens, cfg.teacher)
    started = time.perf_counter()
    tcfg = params.teachers[cfg.teacher]
    device = resolve_device(tcfg.device)
    torch.manual_seed(0)  # greedy decoding draws nothing, but a model's code might; keep it fixed

    tmodel, ttok = load_teacher(params, cfg.teacher, root)
    tmodel.to(device)
    prompt_ids = [chat_ids(ttok, p.messages) for p in prompts]
    t0 = time.perf_counter()
    outputs = generate(tmodel, ttok, prompt_ids, cfg.max_new_tokens, cfg.batch_size, device, desc="evaluate teacher")
    t = TeacherView(tmodel, ttok, prompt_ids, outputs, cfg.batch_size, device)
    generated = time.perf_counter()
    about = {"teacher": cfg.teacher, "path": tcfg.path, "digest": directory_digest(under(root, tcfg.path)),
             "dtype": str(tmodel.dtype).removeprefix("torch.")}
    run.environment = collect(str(device), about["dtype"])  # every row runs in the teacher's dtype (below)
    res = _score(TEACHER, "teacher", about, tmodel, ttok, t, run, cfg.batch_size, device)
    res.generate_s = generated - t0
    run.results.append(_log(log, res))
    run.cheap = cheap_answers(prompts, outputs)
    run.results.append(ModelResult(CONTEXT_FREE, "context_free", {"fitted_on": "the evaluated teacher positions"},
                                   None, [Scores(kl=kl) for kl in t.context_free()]))

    # Every model runs in the teacher's dtype: one precision for all rows of the table (a copy of the teacher
    # then scores KL 0 exactly).
    dtype = tmodel.dtype
    base = cfg.baseline or cfg.students[0]
    bcfg = params.students[base]
    model, tok = init_student(bcfg.init, params, root, dtype, seed=bcfg.training.seed, key=f"students.{base}.init")
    # the init as written: a default `every` is not shown beside explicit `layers`
    about = {"student": base, "init": bcfg.init.model_dump(mode="json", exclude_unset=True)}
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
    del t, tmodel  # the judges and the reward model load what they need: never hold two teachers
    feedback.add_feedback(run, params, root, reward_model, log)
    run.comparisons = [compare(run, c.a, c.b, c.claim) for c in cfg.compare]
    run.seconds = time.perf_counter() - started
    return run


COMPARED = ("kl", "terminates_cleanly", "rouge_l", "judge")


def compare(run: Run, a: list[str], b: list[str], claim: str) -> Comparison:
    """b against a on the figures that matter for distillation, paired over prompts (and over seeds)."""
    diffs = {}
    for metric in COMPARED:
        parts_a = [run.row(n).parts(metric) for n in a]
        parts_b = [run.row(n).parts(metric) for n in b]
        if all(parts_a) and all(parts_b) and len({len(p) for p in parts_a + parts_b}) == 1:
            point, (lo, hi) = paired_difference(parts_a, parts_b)
            diffs[metric] = (round(point, 4), (round(lo, 4), round(hi, 4)))
    return Comparison(a, b, claim, diffs)


def _log(log: Any, res: ModelResult) -> ModelResult:
    rate = res.tokens_generated / res.generate_s if res.generate_s else 0.0
    log(f"evaluate: {res.name}: {res.tokens_generated} tokens in {res.seconds:.1f} s (generate {res.generate_s:.1f} s "
        f"at {rate:.0f} tok/s, score {res.score_s:.1f} s)")
    return res


def best_agreement(run: Run) -> ModelResult | None:
    """The student or baseline closest to the teacher: lowest KL, else highest ROUGE-L when KL is unknown."""
    rows = [r for r in run.results if r.kind in ("baseline", "student")]
    with_kl = [r for r in rows if r.value("kl") is not None]
    if with_kl:
        return min(with_kl, key=lambda r: r.value("kl"))
    return max(rows, key=lambda r: r.value("rouge_l") or 0.0, default=None)


def summary(run: Run) -> str:
    best = best_agreement(run)
    tail = ""
    if best is not None:
        kl = best.value("kl")
        tail = f"; best teacher-agreement: {best.name} " + (f"(KL {kl:.2f})" if kl is not None
                                                             else f"(ROUGE-L {best.value('rouge_l'):.2f})")
    return f"evaluate: {len(run.results)} rows x {len(run.prompts)} prompts in {run.seconds:.0f} s{tail}"
