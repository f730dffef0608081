"""Online RL from a distilled reward (objectives `grpo`, `rloo`; survey §3.2.3), trained by TRL.

The student samples `rl.num_generations` completions per prompt; a reward scores each one; the advantage of a
completion is its reward against the others of its group (GRPO: group-normalised; RLOO: leave-one-out mean);
a KL penalty `rl.beta` holds the policy near its initialisation.

The reward is kd's own scorer, not TRL's tokenisation of it: a reward model scores prompt + completion exactly
as `kd.runtime.scoring.RewardScorer` does (self-knowledge's filter, evaluation), the teacher's likelihood exactly
as the `likelihood` judge does (`LoglikScorer`). Both go through `kd.runtime.tokenize.encode`, so the number the
student is trained to raise is the number kd reports.

References: Shao et al. 2024, DeepSeekMath (GRPO), https://arxiv.org/abs/2402.03300; Ahmadian et al. 2024,
"Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human Feedback in LLMs" (RLOO),
https://arxiv.org/abs/2402.14740
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kd.config import Params, Student
from kd.distill.loop import Result
from kd.distill.trl_runs import leave_out_control_tokens, run_trainer, step_callback, trainer_args
from kd.errors import KdError
from kd.paths import MODELS_DIR
from kd.runtime.models import load_teacher
from kd.runtime.scoring import judge_scores, load_reward_model, reward_scores
from kd.runtime.tokenize import chat_ids, encode, record_prompt

Reward = Callable[..., list[float]]  # TRL's reward_funcs protocol: f(prompts, completions, **kw) -> one per pair


def _encoded(tok: Any, prompts: list[list[dict]], completions: list[list[dict]]) -> list[tuple[list[int], int]]:
    # No length cut: a score of a cut-off text would judge another text (completions are max_new_tokens long).
    return [encode(tok, {"prompt": p, "completion": c}, 10**9) for p, c in zip(prompts, completions, strict=True)]


def model_reward(model: Any, tok: Any, batch_size: int) -> Reward:
    """A reward model's scalar (`kd.runtime.scoring.reward_scores`) for each conversational prompt + completion."""
    def reward_model(prompts: list[list[dict]], completions: list[list[dict]], **_: Any) -> list[float]:
        rows = [ids for ids, _ in _encoded(tok, prompts, completions)]
        return [s for i in range(0, len(rows), batch_size) for s in reward_scores(model, rows[i:i + batch_size])]

    return reward_model


def likelihood_reward(model: Any, tok: Any, batch_size: int) -> Reward:
    """The teacher's likelihood judge score of each completion (`kd.runtime.scoring.judge_scores`)."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def teacher_likelihood(prompts: list[list[dict]], completions: list[list[dict]], **_: Any) -> list[float]:
        rows = _encoded(tok, prompts, completions)
        return [s for i in range(0, len(rows), batch_size)
                for s in judge_scores(model, rows[i:i + batch_size], pad, model.device)]

    return teacher_likelihood


def make_reward(name: str, cfg: Student, params: Params, root: Path, device: str) -> Reward:
    """The reward `students.<name>.rl` declares, its model loaded onto `device`, frozen."""
    rl, bs = cfg.rl, cfg.training.batch_size
    if rl.reward_model is not None:
        path = root / MODELS_DIR / rl.reward_model
        if not path.is_dir():
            raise KdError(f"students.{name}.rl.reward_model: models/{rl.reward_model} does not exist "
                          f"(train it first: `dvc repro {rl.reward_model}`)")
        model, tok = load_reward_model(path)
        return model_reward(model.to(device), tok, bs)
    model, tok = load_teacher(params, rl.teacher, root)
    return likelihood_reward(model.to(device), tok, bs)


def prompts(records: list[dict[str, Any]], tok: Any, max_length: int, max_new_tokens: int) -> list[list[dict]]:
    """Each distinct prompt conversation once, in order, that leaves room for `max_new_tokens` within
    `max_length` (TRL's RL trainers cut no prompt: a longer one would overrun what training.max_length allows)."""
    out, seen = [], set()
    for r in records:
        prompt = record_prompt(r)
        key = json.dumps(prompt, sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        n = len(chat_ids(tok, prompt, add_generation_prompt=True, where="an RL prompt"))
        if n + max_new_tokens <= max_length:
            out.append(prompt)
    return out


def check_batches(name: str, cfg: Student, n_prompts: int) -> None:
    """TRL samples a step's completions in one generation batch of whole prompt groups: batch_size × grad_accum
    completions, `num_generations` per prompt; a group split across batches would have no baseline."""
    t, g = cfg.training, cfg.rl.num_generations
    per_step = t.batch_size * t.grad_accum
    if per_step % g:
        raise KdError(f"students.{name}.training.batch_size: batch_size × grad_accum ({t.batch_size} × {t.grad_accum}"
                      f" = {per_step} completions a step) must be a multiple of rl.num_generations ({g})")
    if n_prompts < per_step // g:
        raise KdError(f"students.{name}.datasets: {n_prompts} distinct prompt(s) fit training.max_length, but a step "
                      f"samples {per_step // g} prompts (batch_size × grad_accum / rl.num_generations); lower "
                      f"training.batch_size or add data")


def preflight(name: str, cfg: Student, root: Path, tok: Any, records: list[dict[str, Any]]) -> list[list[dict]]:
    """Every user mistake this objective can hit, before any run starts; returns the prompts to train on."""
    rl, t = cfg.rl, cfg.training
    if rl.reward_model is not None and not (root / MODELS_DIR / rl.reward_model).is_dir():
        raise KdError(f"students.{name}.rl.reward_model: models/{rl.reward_model} does not exist "
                      f"(train it first: `dvc repro {rl.reward_model}`)")
    # TRL's RL trainers apply the chat template to prompts themselves: control-token text would become structure
    records = leave_out_control_tokens(name, cfg.objective, tok, records, record_prompt)
    rows = prompts(records, tok, t.max_length, rl.max_new_tokens)
    if not rows:
        raise KdError(f"students.{name}.training.max_length: no prompt leaves room for rl.max_new_tokens "
                      f"({rl.max_new_tokens}) within max_length ({t.max_length})")
    check_batches(name, cfg, len(rows))
    return rows


def _save_reference(model: Any, ckpt_dir: Path) -> Path:
    """The initialisation, saved (safetensors) for TRL to load as the KL reference.

    TRL builds the reference itself, with `from_pretrained(model.config._name_or_path)`: for a `from_teacher`
    student that path is the teacher's directory (its config was copied), for `from_config` it is empty. The
    model passed to `train_rl` is the untrained init (train_student builds it just before), so it is saved here
    again on every run, resumed or not.
    """
    path = ckpt_dir / "reference"
    shutil.rmtree(path, ignore_errors=True)
    model.save_pretrained(path)
    return path


def train_rl(name: str, cfg: Student, params: Params, root: Path, model: Any, tok: Any,
             records: list[dict[str, Any]], ckpt_dir: Path, device: str,
             on_step: Callable[[dict[str, float]], None]) -> Result:
    """GRPO or RLOO on the prompts of the student's datasets; returns the run's Result (history carries TRL's
    `reward`, `reward_std`, `kl`, `entropy`, `completions/*`, ... next to loss, lr and tokens)."""
    from datasets import Dataset

    rl, t = cfg.rl, cfg.training
    rows = preflight(name, cfg, root, tok, records)
    reward = make_reward(name, cfg, params, root, device)
    # TRL's RL configs take no max_length (nor max_prompt_length in 1.16): prompts() applied it above.
    args = {k: v for k, v in trainer_args(t, ckpt_dir, device).items() if k != "max_length"}
    args |= dict(num_generations=rl.num_generations, max_completion_length=rl.max_new_tokens,
                 temperature=rl.temperature, beta=rl.beta, disable_dropout=True, use_vllm=False)
    original_name = model.config._name_or_path
    if rl.beta > 0:
        model.config._name_or_path = str(_save_reference(model, ckpt_dir))
    try:
        trainer = _trainer(cfg.objective, model, tok, reward, args, Dataset.from_list([{"prompt": p} for p in rows]),
                           on_step)
    finally:
        model.config._name_or_path = original_name  # the student's config.json must not name a checkpoint dir
    if trainer.ref_model is not None:
        trainer.ref_model.eval().requires_grad_(False)
    return run_trainer(trainer, ckpt_dir)


def _trainer(objective: str, model: Any, tok: Any, reward: Reward, args: dict[str, Any], data: Any,
             on_step: Callable[[dict[str, float]], None]) -> Any:
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    kw = dict(model=model, reward_funcs=reward, train_dataset=data, processing_class=tok,
              callbacks=[step_callback(on_step)])
    match objective:
        case "grpo":
            return GRPOTrainer(args=GRPOConfig(**args), **kw)
        case "rloo":
            return RLOOTrainer(args=RLOOConfig(**args), **kw)
    raise AssertionError(objective)
