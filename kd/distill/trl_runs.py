"""Objectives trained by TRL: `sft` (SFTTrainer) and `on_policy` (GKDTrainer), with kd's logging and resume.

kd logs to MLflow itself through a TrainerCallback (`report_to="none"`), so the run carries kd's params,
dataset fingerprints and tags. Checkpoints are the Trainer's own (`checkpoint-N/`: safetensors weights,
optimizer, scheduler and RNG states, loaded back with `weights_only=True`), written into kd's checkpoint
directory outside the stage outs; the Trainer writes `trainer_state.json` last, so a checkpoint holding it
is complete.

References: Agarwal et al., On-Policy Distillation of Language Models (GKD), 2024,
https://arxiv.org/abs/2306.13649
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kd.config.students import OnPolicy, Training
from kd.distill.loop import Result, check_stop
from kd.runtime.tokenize import encode, holds_control_tokens, split_record


def leave_out_control_tokens(name: str, objective: str, tok: Any, records: list[dict[str, Any]],
                             messages: Callable[[dict[str, Any]], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """`records` without those whose text holds one of the tokenizer's control tokens, said on stderr. For the
    objectives whose TRL trainer applies the chat template itself (`dpo`, `grpo`, `rloo`): there such text would
    become message structure (a forged turn), which kd's own encoding (kd.runtime.tokenize.chat_ids) prevents."""
    kept = [r for r in records if not holds_control_tokens(tok, messages(r))]
    if len(kept) < len(records):
        print(f"kd: warning: students.{name}: {len(records) - len(kept)} of {len(records)} records left out: their "
              f"text holds the tokenizer's control tokens, which {objective} (TRL applies the chat template) would "
              f"read as message structure", file=sys.stderr)
    return kept


def step_callback(on_step: Callable[[dict[str, float]], None]) -> Any:
    from transformers import TrainerCallback

    class KdCallback(TrainerCallback):
        """Step metrics to MLflow; the KD_TEST_STOP_AFTER_STEP hook (after step N and its checkpoint)."""

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            check_stop(state.global_step)

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step >= state.max_steps:
                control.should_save = False  # the final model is written by kd; a last checkpoint is waste

        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kw: Any) -> None:
            if logs and "loss" in logs:
                on_step(_metrics(state.global_step, logs))

    return KdCallback()


def _metrics(step: int, logs: dict[str, Any]) -> dict[str, float]:
    m = {"step": step, **{k: float(v) for k, v in logs.items() if isinstance(v, int | float) and k != "epoch"}}
    if "num_tokens" in m:
        m["tokens"] = m.pop("num_tokens")
    if "learning_rate" in m:
        m["lr"] = m.pop("learning_rate")
    return m


def trainer_args(t: Training, ckpt_dir: Path, device: str) -> dict[str, Any]:
    """TrainingArguments shared by every TRL objective, from `training:`. The model comes loaded in float32
    (kd.runtime.device.training_dtypes) and `bf16` / `fp16` are the Trainer's mixed precision: autocast over
    float32 master weights (with loss scaling for fp16)."""
    return dict(
        output_dir=str(ckpt_dir), per_device_train_batch_size=t.batch_size, gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr, num_train_epochs=t.epochs, max_steps=t.max_steps or -1, lr_scheduler_type="linear",
        warmup_steps=t.warmup_ratio,  # transformers 5: a float below 1 is a ratio of the total steps
        weight_decay=t.weight_decay, seed=t.seed, data_seed=t.seed, logging_steps=t.log_every,
        save_strategy="steps", save_steps=t.checkpoint_every, save_total_limit=1, report_to="none",
        use_cpu=device == "cpu", bf16=t.dtype == "bfloat16", fp16=t.dtype == "float16", gradient_checkpointing=False,
        max_length=t.max_length,
        dataloader_num_workers=0,
    )


def _resume_point(ckpt_dir: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    if not ckpt_dir.is_dir():
        return None
    last = get_last_checkpoint(str(ckpt_dir))
    return last if last and (Path(last) / "trainer_state.json").is_file() else None


def run_trainer(trainer: Any, ckpt_dir: Path) -> Result:
    resume = _resume_point(ckpt_dir)
    trainer.train(resume_from_checkpoint=resume)
    history = [_metrics(h["step"], h) for h in trainer.state.log_history if "loss" in h]
    result = Result(history=history, steps=trainer.state.global_step,
                    resumed_from=int(Path(resume).name.split("-")[-1]) if resume else 0)
    result.tokens = int(history[-1].get("tokens", 0)) if history else 0
    model = trainer.model
    model.config.use_cache = True  # trainers switch the KV cache off for training; generation wants it back
    model.eval()
    return result


def train_sft(model: Any, tok: Any, records: list[dict[str, Any]], t: Training, ckpt_dir: Path, device: str,
              on_step: Callable[[dict[str, float]], None]) -> Result:
    """Sequence-level KD: SFT on the teacher's completions; the loss covers completion tokens only."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    rows = []
    for r in records:
        # kd tokenises, not TRL, so control tokens in a record's text stay text (kd.runtime.tokenize.chat_ids); TRL
        # takes `input_ids` + `completion_mask` rows as they are, then truncates them to max_length as before
        ids, start = encode(tok, r, 1 << 30)
        rows.append({"input_ids": ids, "completion_mask": [0] * start + [1] * (len(ids) - start)})
    args = SFTConfig(**trainer_args(t, ckpt_dir, device), completion_only_loss=True, packing=False)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         callbacks=[step_callback(on_step)])
    return run_trainer(trainer, ckpt_dir)


def gkd_rows(tok: Any, records: list[dict[str, Any]], max_length: int) -> list[dict[str, Any]]:
    """GKD's rows, tokenised by kd (kd.runtime.tokenize.chat_ids keeps control tokens in a record's text as text) and
    cut as TRL's ChatML collator cuts them: the last `max_length` tokens; its collator takes `input_ids` +
    `completion_mask` as they are and reads `messages` only for its unused prompt text."""
    rows = []
    for r in records:
        prompt, completion = split_record(r)
        ids, start = encode(tok, r, 1 << 30)
        cut = max(len(ids) - max_length, 0)
        ids, start = ids[cut:], max(start - cut, 0)
        rows.append({"messages": prompt + completion, "input_ids": ids,
                     "completion_mask": [0] * start + [1] * (len(ids) - start)})
    return rows


def train_on_policy(model: Any, tok: Any, teacher: Any, records: list[dict[str, Any]], t: Training, op: OnPolicy,
                    ckpt_dir: Path, device: str, on_step: Callable[[dict[str, float]], None]) -> Result:
    """GKD: with probability λ a batch is the student's own samples, scored by the teacher online.

    TRL's GKD applies `temperature` to sampling only; its loss is the generalised JSD at T = 1.
    """
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    rows = gkd_rows(tok, records, t.max_length)
    args = GKDConfig(**trainer_args(t, ckpt_dir, device), lmbda=op.lmbda, beta=op.beta, temperature=op.temperature,
                     max_new_tokens=op.max_new_tokens, seq_kd=False, disable_dropout=True)
    trainer = GKDTrainer(model=model, teacher_model=teacher, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tok, callbacks=[step_callback(on_step)])
    return run_trainer(trainer, ckpt_dir)
