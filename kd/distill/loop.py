"""kd's own training loop, and the token-level objective it runs: distillation from stored top-k teacher logits,
cross-entropy on the teacher's completions, and an optional hidden-state term from a teacher run online.

Small on purpose (a reader follows one optimiser step top to bottom): AdamW, linear warmup and decay,
gradient accumulation with the loss averaged over the step's examples by the objective's weight (completion
tokens here, prompts for the rank objectives of kd.distill.rank), gradient clipping at 1.0 (as transformers'
Trainer does). Mixed precision as the Trainer's `bf16`/`fp16`: float32 weights and optimizer state, forward and
backward under autocast in `training.dtype`, float16 with a GradScaler (kd.runtime.device.training_dtypes). An objective gives the loop only its loss on a micro-batch. Data order is a pure function of
(seed, epoch), so a resumed run sees exactly the batches an uninterrupted one would, and CPU runs are
bit-reproducible.

References: DistillKit (offline top-k logits); Hinton et al. 2015 (soft targets mixed with hard labels);
FitNets / DistilBERT (hidden-state hints).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from kd.config.students import Divergence, Hidden, Training
from kd.distill import checkpoint, ranks
from kd.distill.losses import hidden_loss, topk_divergence
from kd.errors import KdError
from kd.runtime.device import training_dtypes

STOP_ENV = "KD_TEST_STOP_AFTER_STEP"  # tests: raise after this many optimiser steps, as a kill would
MAX_GRAD_NORM = 1.0


class TrainingStopped(RuntimeError):
    """Raised by the KD_TEST_STOP_AFTER_STEP hook: a stand-in for preemption in tests."""


def check_stop(done: int) -> None:
    stop = os.environ.get(STOP_ENV)
    if stop and done >= int(stop):
        raise TrainingStopped(f"{STOP_ENV}={stop}: stopped after step {done}")


@dataclass
class Result:
    history: list[dict[str, float]] = field(default_factory=list)  # one entry per optimiser step
    steps: int = 0
    tokens: int = 0
    resumed_from: int = 0


def _as_logged(sums: dict[str, float], weight: float) -> dict[str, float]:
    return sums


@dataclass
class Objective:
    """What an objective gives the loop.

    `loss(micro_batch, step_weight)` returns the micro-batch's share of the step loss (a scalar tensor; the step
    loss is the mean over the step's examples, each counted `weight(example)` times) and metric parts that the
    loop adds up over the micro-batches (a `tokens` part counts the tokens trained on). `summarise(sums,
    step_weight)` turns the summed parts into the step's logged metrics.
    """

    name: str
    loss: Callable[[list[Any], float], tuple[Any, dict[str, float]]]
    weight: Callable[[Any], float]
    modules: dict[str, Any] = field(default_factory=dict)  # trained with the model (hidden-state projections)
    summarise: Callable[[dict[str, float], float], dict[str, float]] = _as_logged


def global_batch(t: Training, world: int = 1) -> int:
    """Examples per optimiser step: batch_size × grad_accum on each of `world` processes."""
    return t.batch_size * t.grad_accum * world


def plan(n_examples: int, t: Training, world: int = 1) -> tuple[int, int]:
    """(steps per epoch, total optimiser steps): `max_steps` when set, else ceil(epochs × steps per epoch)."""
    per_step = global_batch(t, world)
    per_epoch = max(1, math.ceil(n_examples / per_step))
    return per_epoch, t.max_steps or max(1, math.ceil(t.epochs * n_examples / per_step))


def step_batches(step: int, n: int, t: Training, world: int = 1) -> list[list[int]]:
    """Example indices of optimiser step `step` (0-based), as micro-batches (grad_accum × world of them).

    The examples form one stream: epoch e is a permutation drawn from a generator seeded with (seed, e), and
    step s takes the next global batch of them, crossing epoch boundaries when n does not divide. Process r of
    `world` runs micro-batches r, r + world, ...: the step sees the same examples whatever the world size.
    """
    import torch

    per_step = global_batch(t, world)
    picked: list[int] = []
    for pos in range(step * per_step, (step + 1) * per_step):
        epoch, i = divmod(pos, n)
        if i == 0 or not picked:
            gen = torch.Generator().manual_seed(t.seed * 1_000_003 + epoch)
            perm = torch.randperm(n, generator=gen).tolist()
        picked.append(perm[i])
    return [picked[i:i + t.batch_size] for i in range(0, per_step, t.batch_size)]


def lr_lambda(total: int, warmup_ratio: float) -> Callable[[int], float]:
    warmup = math.ceil(total * warmup_ratio)

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))
    return f


def train(model: Any, examples: list[Any], t: Training, objective: Objective, ckpt_dir: Path,
          on_step: Callable[[dict[str, float]], None]) -> Result:
    """Train `model` in place on `examples` with `objective`.

    Args:
        ckpt_dir: resume from its latest checkpoint if any; write one every `checkpoint_every` steps.
        on_step: receives each new step's metrics (MLflow logging); steps before a resume were logged already.
    """
    import torch

    world, rank = ranks.world_size(), ranks.rank()
    if world > 1:
        ranks.start(cpu=next(model.parameters()).device.type == "cpu")
    torch.manual_seed(t.seed)
    _, total = plan(len(examples), t, world)
    modules = {"model": model} | objective.modules
    params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
    master, half = training_dtypes(t.dtype)
    if any(p.dtype != master for p in params):  # the optimiser steps float32 weights, or small updates round away
        raise ValueError(f"train: parameters must be {master} (training.dtype {t.dtype} is the autocast precision)")
    device_type = next(model.parameters()).device.type
    scaler = torch.amp.GradScaler(device_type, enabled=half == torch.float16)  # float16 gradients underflow unscaled
    optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total, t.warmup_ratio))
    result = Result()
    last = checkpoint.latest(ckpt_dir)
    if last is not None:
        state = checkpoint.load(last, modules, optimizer, scheduler)
        if "scaler" in state["extra"]:
            scaler.load_state_dict(state["extra"]["scaler"])
        result.history, result.resumed_from = state["history"], state["step"]
        result.tokens = int(result.history[-1]["tokens"]) if result.history else 0
    model.train()
    bar = tqdm(total=total, initial=result.resumed_from, desc=objective.name, unit="step", dynamic_ncols=True,
               disable=not ranks.is_main())
    for step in range(result.resumed_from, total):
        check_stop(step)
        micro = [[examples[i] for i in idx] for idx in step_batches(step, len(examples), t, world)]
        weight = sum(objective.weight(e) for b in micro for e in b)  # the step's loss is a mean over this
        loss_sum, sums = 0.0, {}
        for batch in micro[rank::world]:
            with torch.autocast(device_type, dtype=half, enabled=half is not None):
                loss, parts = objective.loss(batch, weight)
            scaler.scale(loss).backward()
            loss_sum += loss.item()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v
        if world > 1:  # every process gets the step's whole gradient and metrics, so all step alike
            ranks.sum_grads(params)
            keys = sorted(sums)
            loss_sum, *summed = ranks.sum_floats([loss_sum, *(sums[k] for k in keys)])
            sums = dict(zip(keys, summed, strict=True))
        result.tokens += int(sums.pop("tokens", 0))
        scaler.unscale_(optimizer)  # clip the true gradient (a no-op without float16)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        scaler.step(optimizer)  # skipped when a float16 gradient overflowed; the scale is then lowered
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        metrics = {"step": step + 1, "loss": loss_sum, **objective.summarise(sums, weight),
                   "grad_norm": float(grad_norm), "lr": scheduler.get_last_lr()[0], "tokens": result.tokens}
        result.history.append(metrics)
        if ((step + 1) % t.log_every == 0 or step + 1 == total) and ranks.is_main():
            on_step(metrics)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_sum:.3f}")
        if (step + 1) % t.checkpoint_every == 0 and step + 1 < total:
            if ranks.is_main():
                checkpoint.save(ckpt_dir, step + 1, modules, optimizer, scheduler, result.history,
                                {"scaler": scaler.state_dict()} if scaler.is_enabled() else None)
            ranks.barrier()
    bar.close()
    model.eval()
    result.steps = total
    return result


@dataclass
class Example:
    """One training sequence: token ids, where the completion starts, and the teacher's top-k for it."""

    ids: list[int]
    start: int
    teacher: tuple[Any, Any, Any] | None = None  # (topk_ids [C, k], topk_logprobs [C, k], tail at the student's T [C])


def _collate(batch: list[Example], pad: int, device: Any) -> dict[str, Any]:
    """Right-padded ids, attention mask, and (row, position) of every completion token's prediction."""
    import torch

    width = max(len(e.ids) for e in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    rows, pos, targets, teacher = [], [], [], [[], [], []]
    for r, e in enumerate(batch):
        ids[r, :len(e.ids)] = torch.tensor(e.ids)
        mask[r, :len(e.ids)] = 1
        c = len(e.ids) - e.start
        rows += [r] * c
        pos += range(e.start - 1, len(e.ids) - 1)  # logits at j-1 predict token j
        targets += e.ids[e.start:]
        if e.teacher is not None:
            for part, x in zip(teacher, e.teacher, strict=True):
                part.append(x[:c])
    out = {"ids": ids.to(device), "mask": mask.to(device), "rows": torch.tensor(rows, device=device),
           "pos": torch.tensor(pos, device=device), "targets": torch.tensor(targets, device=device)}
    if teacher[0]:
        out["topk_ids"], out["topk_logprobs"], out["tail"] = (torch.cat(p).to(device) for p in teacher)
    return out


class HiddenTerm:
    """Hidden-state similarity to a teacher run online, through learned student->teacher projections."""

    def __init__(self, cfg: Hidden, teacher: Any, student: Any, key: str) -> None:
        import torch

        self.cfg, self.teacher = cfg, teacher
        ns, nt = student.config.num_hidden_layers, teacher.config.num_hidden_layers
        for s, t in cfg.pairs:
            if not (0 <= s < ns and 0 <= t < nt):
                raise KdError(f"{key}.pairs: [{s}, {t}] out of range (student layers 0..{ns - 1}, teacher 0..{nt - 1})")
        ds, dt = student.config.hidden_size, teacher.config.hidden_size
        self.projections = torch.nn.ModuleList(torch.nn.Linear(ds, dt, bias=False) for _ in cfg.pairs)
        if ds == dt:  # same width (from_teacher): start from the identity, i.e. the copied layers' own geometry
            for p in self.projections:
                torch.nn.init.eye_(p.weight)
        self.projections.to(next(student.parameters()).device, next(student.parameters()).dtype)

    def __call__(self, student_hidden: tuple[Any, ...], ids: Any, mask: Any) -> Any:
        import torch

        with torch.no_grad():  # not inference_mode: its tensors cannot enter the student's autograd graph
            t_hidden = self.teacher(input_ids=ids.to(self.teacher.device), attention_mask=mask.to(self.teacher.device),
                                    output_hidden_states=True).hidden_states
        # hidden_states[0] is the embeddings; layer i's output is hidden_states[i + 1].
        terms = [hidden_loss(student_hidden[s + 1], t_hidden[t + 1].to(ids.device), proj, self.cfg.loss, mask)
                 for (s, t), proj in zip(self.cfg.pairs, self.projections, strict=True)]
        return torch.stack(terms).mean()


def token_objective(model: Any, kd: Divergence | None, hidden: HiddenTerm | None, pad_id: int,
                    grad_accum: int) -> Objective:
    """Per completion token: w·CE(teacher's token) + (1 − w)·divergence to the stored teacher top-k, w =
    `kd.ce_weight` (without `kd`, plain SFT: CE alone), plus an optional hidden-state term (a mean over
    micro-batches).
    Examples are `Example`s, carrying `teacher` when `kd` is given."""
    import torch.nn.functional as F

    w = kd.ce_weight if kd else 1.0
    base, head = model.base_model, model.get_output_embeddings()
    device = next(model.parameters()).device

    def loss(batch: list[Example], n_tokens: float) -> tuple[Any, dict[str, float]]:
        b = _collate(batch, pad_id, device)
        out = base(input_ids=b["ids"], attention_mask=b["mask"], output_hidden_states=hidden is not None)
        # Logits only where a completion token is predicted: [N, V], never [B, L, V].
        logits = head(out.last_hidden_state[b["rows"], b["pos"]]).float()
        ce = F.cross_entropy(logits, b["targets"], reduction="none")
        parts = {"tokens": float(b["mask"].sum())}
        loss_tok = ce * w
        if kd is not None:
            div = topk_divergence(logits, b["topk_ids"], b["topk_logprobs"], b["tail"], kd.divergence,
                                  kd.beta, kd.temperature, kd.alpha)
            loss_tok = loss_tok + (1 - w) * div
            parts["kd"] = div.detach().sum().item() / n_tokens
        total = loss_tok.sum() / n_tokens
        parts["ce"] = ce.detach().sum().item() / n_tokens
        if hidden is not None:
            h = hidden(out.hidden_states, b["ids"], b["mask"]) / grad_accum
            parts["hidden"] = h.item()
            total = total + hidden.cfg.weight * h
        return total, parts

    return Objective("train", loss, weight=lambda e: len(e.ids) - e.start,
                     modules={"hidden": hidden.projections} if hidden else {})
