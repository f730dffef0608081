"""A student's stage: `students.<name>` -> models/<name>/, metrics/<name>.json, plots/<name>.csv.

The student is initialised as `init:` declares, trained with its objective inside the training envelope
(kd.distill.envelope: checkpoints, resume, MLflow, the model directory):
- `sft` (TRL SFTTrainer), `on_policy` (TRL GKDTrainer), `dpo` (TRL DPOTrainer), `grpo`/`rloo` (TRL);
- `kd` (stored teacher top-k logits), `sft` with a `hidden` term, `rrhf` and `pro`: kd's own loop.
"""

from __future__ import annotations

import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from kd.config import Params, Student, load_params
from kd.distill import envelope, loop, rank, ranks, rl
from kd.distill.trl_runs import train_on_policy, train_sft
from kd.errors import KdError
from kd.records import REJECTED_FILE, read_jsonl
from kd.runtime.init import freeze, init_student
from kd.runtime.local import LocalTeacher
from kd.runtime.logits import check_compatible, load_logits
from kd.runtime.models import load_teacher
from kd.runtime.tokenize import encode


def student_config(params: Params, name: str) -> Student:
    if name not in params.students:
        raise KdError(f"params.yaml: students.{name}: not declared (declared: {', '.join(params.students) or 'none'})")
    return params.students[name]


def logits_ref(cfg: Student, root: Path) -> dict[str, str] | None:
    """{name, path, fingerprint} of the student's logits dataset, if it has one."""
    if not cfg.logits:
        return None
    records, refs = envelope.read_training_data(root, [cfg.logits])
    return refs[0]


def _kd_examples(name: str, cfg: Student, records: list[dict[str, Any]], logits: dict[str, str], tok: Any,
                 params: Params, root: Path) -> list[loop.Example]:
    """Examples carrying the stored teacher top-k, after checking the logits fit this student."""
    key = f"students.{name}.logits"
    store = load_logits(Path(logits["path"]))
    teacher = params.datasets[cfg.logits].teacher
    try:
        check_compatible(store, tok, LocalTeacher(teacher, params.teachers[teacher], root).identity)
    except KdError as e:
        raise KdError(f"{key}: {e}") from None
    temperature = cfg.kd.temperature
    store.check_temperature(temperature, f"students.{name}.kd.temperature")
    # Records the feature stage could not score (no completion token within its max_length) are skipped
    # here too: the student would truncate them the same way. Any other missing record means the logits
    # were built from other data.
    unscored = {row.get("source_id") for row in read_jsonl(Path(logits["path"]) / REJECTED_FILE)}
    examples = []
    for r in records:
        if r["id"] in unscored:
            continue
        if r["id"] not in store:
            raise KdError(f"{key}: '{cfg.logits}' has no logits for record {r['id'][:12]} of this student's datasets; "
                          f"point the feature dataset at the same data (datasets.{cfg.logits}.dataset) and rebuild it")
        row = store.get(r["id"])
        end = min(len(row.input_ids), cfg.training.max_length)
        if row.completion_start >= end:
            continue  # no completion token within max_length
        examples.append(loop.Example(row.input_ids[:end].tolist(), row.completion_start,
                                     (row.topk_ids, row.topk_logprobs, row.tail(temperature))))
    return examples


def _sft_examples(records: list[dict[str, Any]], tok: Any, max_length: int) -> list[loop.Example]:
    out = []
    for r in records:
        ids, start = encode(tok, r, max_length)
        if start < len(ids):
            out.append(loop.Example(ids, start))
    return out


def train_student(name: str, root: Path = Path(".")) -> str:
    """Build `models/<name>/`, `metrics/<name>.json`, `plots/<name>.csv`; return the summary line."""
    params = load_params(root)
    cfg = student_config(params, name)
    t = cfg.training
    records, refs = envelope.read_training_data(root, cfg.datasets)
    if not records:
        raise envelope.no_records("students", name, cfg.datasets)
    records = envelope.subsample(records, t)
    job = envelope.prepare(name, "students", cfg, params, root, refs, logits_ref(cfg, root))
    model, tok = init_student(cfg.init, params, root, dtype=job.dtype, seed=t.seed, key=f"students.{name}.init")
    model.to(job.device)
    freeze(model, t.freeze_layers, f"students.{name}.training.freeze_layers")
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    # Everything a user can get wrong is checked before an MLflow run exists (no FAILED runs for typos).
    own_loop = cfg.objective == "kd" or (cfg.objective == "sft" and (cfg.hidden is not None or cfg.loop == "kd"))
    examples: list[loop.Example] = []
    if cfg.objective == "kd":
        examples = _kd_examples(name, cfg, records, job.logits, tok, params, root)
    elif own_loop:
        examples = _sft_examples(records, tok, t.max_length)
    elif cfg.objective in ("dpo", "rrhf", "pro"):
        rank.preflight(name, cfg, tok, records)
    elif cfg.objective in ("grpo", "rloo"):
        rl.preflight(name, cfg, root, tok, records)
    if own_loop and not examples:
        raise KdError(f"students.{name}: no record has a completion token within training.max_length ({t.max_length})")

    warning = envelope.world_warning("students", name, t, ranks.world_size())
    if warning and ranks.is_main():
        print(warning, file=sys.stderr)
    run = job.start_run() if ranks.is_main() else None  # under N processes only the main one writes

    def on_step(metrics: dict[str, float]) -> None:
        if run is not None:
            run.log_metrics({k: v for k, v in metrics.items() if k != "step"}, step=int(metrics["step"]))

    with run.failing() if run is not None else nullcontext():
        match cfg.objective:
            case "kd" | "sft" if own_loop:
                # sft with `loop: kd` or a hidden term runs kd's loop with the same completion-only cross-entropy
                # (SFTTrainer has no hook for an extra loss).
                hidden = None
                if cfg.hidden is not None:
                    teacher, _ = load_teacher(params, cfg.hidden.teacher, root)
                    hidden = loop.HiddenTerm(cfg.hidden, teacher.to(job.device), model, f"students.{name}.hidden")
                objective = loop.token_objective(model, cfg.kd if cfg.objective == "kd" else None, hidden, pad_id,
                                                 t.grad_accum * ranks.world_size())
                result = loop.train(model, examples, t, objective, job.ckpt_dir, on_step)
            case "sft":
                result = train_sft(model, tok, records, t, job.ckpt_dir, job.device, on_step)
            case "dpo" | "rrhf" | "pro":
                result = rank.train_rank(name, cfg, params, root, model, tok, records, job.ckpt_dir, job.device,
                                         on_step)
            case "grpo" | "rloo":
                result = rl.train_rl(name, cfg, params, root, model, tok, records, job.ckpt_dir, job.device, on_step)
            case "on_policy":
                teacher, _ = load_teacher(params, cfg.on_policy.teacher, root, dtype=job.declared)
                result = train_on_policy(model, tok, teacher.to(job.device), records, t, cfg.on_policy, job.ckpt_dir,
                                         job.device, on_step)
            case _:
                raise AssertionError(cfg.objective)
    if run is None:
        return f"{name}: process {ranks.rank()} of {ranks.world_size()} done"
    return job.finish(run, model, tok, result, cfg.objective, f"{_k(result.tokens)} tokens")


def _k(n: int) -> str:
    return f"{n / 1000:.0f}k" if n >= 10_000 else str(n)
