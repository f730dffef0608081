"""Rank optimisation on feedback datasets (survey §3.2.4): objectives `dpo`, `rrhf` and `pro`.

The student usually starts from an SFT student and learns from the teacher's ranking of candidate answers:

- `dpo`: TRL's DPOTrainer on each record's (chosen, rejected) pair, against an explicit frozen reference, the
  student's initialisation built again from disk (a copy of the model being trained would move with it).
- `rrhf`, `pro`: kd's own loop (kd.distill.loop) over each record's whole ranked `candidates` list; this module
  gives it only the loss, from `kd.distill.preference`, averaged over the step's prompts.

References: Rafailov et al. 2023, "Direct Preference Optimization", https://arxiv.org/abs/2305.18290;
Yuan et al. 2023 (RRHF), https://arxiv.org/abs/2304.05302; Song et al. 2023 (PRO), https://arxiv.org/abs/2306.17492
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kd.config import Params, Student
from kd.distill import loop
from kd.distill.loop import Objective, Result
from kd.distill.preference import pro_loss, rrhf_loss, sequence_logprobs
from kd.distill.trl_runs import leave_out_control_tokens, run_trainer, step_callback, trainer_args
from kd.errors import KdError
from kd.runtime.init import frozen_init
from kd.runtime.tokenize import encode


@dataclass
class Ranked:
    """One prompt's usable candidates, best first: token ids, where each completion starts, the scores."""

    ids: list[list[int]]
    starts: list[int]
    scores: list[float]


def _ranked(record: dict[str, Any], tok: Any, max_length: int, pair: bool = False) -> Ranked | None:
    """A record's candidates tokenised (completion cut to `max_length`), sorted by score, best first; with
    `pair`, only its chosen and rejected answers (also the fallback when it has no `candidates` list).

    A candidate with no completion token left within `max_length` is dropped; a record left with fewer than
    two (nothing to rank) is None.
    """
    cands = record.get("candidates")
    if pair or not cands:
        cands = [{"completion": record["chosen"], "score": record["score_chosen"]},
                 {"completion": record["rejected"], "score": record["score_rejected"]}]
    kept = []
    for c in sorted(cands, key=lambda c: -float(c["score"])):  # stable: ties keep their order
        ids, start = encode(tok, {"id": record.get("id", "?"), "prompt": record["prompt"],
                                  "completion": c["completion"]}, max_length)
        if start < len(ids):
            kept.append((ids, start, float(c["score"])))
    return Ranked(*map(list, zip(*kept, strict=True))) if len(kept) >= 2 else None


def preflight(name: str, cfg: Student, tok: Any, records: list[dict[str, Any]]) -> list[tuple[dict, Ranked]]:
    """The usable records with their ranked candidates; a KdError naming `students.<name>` when none is left.
    Called before the MLflow run starts, so a user mistake leaves no FAILED run."""
    dpo = cfg.objective == "dpo"
    max_length = cfg.training.max_length
    if dpo:  # TRL's DPOTrainer applies the chat template itself: a control token in the text would become structure
        records = leave_out_control_tokens(name, "dpo", tok, records,
                                           lambda r: [*r["prompt"], *r["chosen"], *r["rejected"]])
    kept = [(r, x) for r in records if (x := _ranked(r, tok, max_length, pair=dpo)) is not None]
    if not kept:
        what = "its chosen and rejected answers" if dpo else "two candidates"
        raise KdError(f"students.{name}: no feedback record keeps {what} with a completion token within "
                      f"training.max_length ({max_length})")
    return kept


def train_rank(name: str, cfg: Student, params: Params, root: Path, model: Any, tok: Any,
               records: list[dict[str, Any]], ckpt_dir: Path, device: str,
               on_step: Callable[[dict[str, float]], None]) -> Result:
    """Train `model` in place with the student's rank objective (see the module docstring).

    Raises:
        KdError: naming `students.<name>` when no record is left with two answers to compare.
    """
    kept = preflight(name, cfg, tok, records)
    if cfg.objective == "dpo":
        return _dpo(name, cfg, params, root, model, tok, [r for r, _ in kept], ckpt_dir, device, on_step)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return loop.train(model, [x for _, x in kept], cfg.training, rank_objective(cfg, model, pad_id), ckpt_dir, on_step)


def _dpo(name: str, cfg: Student, params: Params, root: Path, model: Any, tok: Any, records: list[dict[str, Any]],
         ckpt_dir: Path, device: str, on_step: Callable[[dict[str, float]], None]) -> Result:
    """DPO on (prompt, chosen, rejected), conversational. TRL logs `rewards/{chosen,rejected,margins,accuracies}`
    (implicit rewards β·log π/π_ref), `logps/{chosen,rejected}` and more; all reach `on_step` and the history."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    t = cfg.training
    # `records` hold only pairs with both answers within max_length, as for rrhf/pro (TRL itself drops only a
    # prompt that fills max_length, and would train on a pair whose answer is cut away entirely).
    rows = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in records]
    ref = frozen_init(cfg.init, params, root, dtype=next(model.parameters()).dtype, seed=t.seed,
                      key=f"students.{name}.init").to(device)
    args = DPOConfig(**trainer_args(t, ckpt_dir, device), beta=cfg.rank.beta, loss_type=[cfg.rank.loss_type])
    trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tok, callbacks=[step_callback(on_step)])
    return run_trainer(trainer, ckpt_dir)


def _collate(batch: list[Ranked], pad: int, device: Any) -> dict[str, Any]:
    """Every candidate of the micro-batch as one right-padded row; `counts` says how many each prompt has."""
    import torch

    seqs = [(ids, start) for ex in batch for ids, start in zip(ex.ids, ex.starts, strict=True)]
    width = max(len(ids) for ids, _ in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    attn = torch.zeros_like(ids)
    comp = torch.zeros_like(ids)
    for r, (x, start) in enumerate(seqs):
        ids[r, :len(x)] = torch.tensor(x)
        attn[r, :len(x)] = 1
        comp[r, start:len(x)] = 1
    counts = [len(ex.ids) for ex in batch]
    n = max(counts)
    scores = torch.tensor([ex.scores + [0.0] * (n - len(ex.scores)) for ex in batch])
    mask = torch.tensor([[i < c for i in range(n)] for c in counts])
    return {"ids": ids.to(device), "attn": attn.to(device), "comp": comp.to(device), "counts": counts,
            "scores": scores.to(device), "mask": mask.to(device)}


def _ranking_stats(r: Any, scores: Any, mask: Any, counts: list[int]) -> tuple[float, int, int]:
    """(Σ over prompts of r(best) − r(worst), pairs ordered like the scores, pairs with different scores)."""
    import torch

    worst = r.gather(1, torch.tensor(counts, device=r.device)[:, None] - 1).squeeze(1)
    margin = (r[:, 0] - worst).sum().item()
    ordered = (scores[:, :, None] > scores[:, None, :]) & mask[:, :, None] & mask[:, None, :]  # i above j
    right = ordered & (r[:, :, None] > r[:, None, :])
    return margin, int(right.sum()), int(ordered.sum())


def rank_objective(cfg: Student, model: Any, pad_id: int) -> Objective:
    """RRHF or PRO for kd's loop: the step loss is the mean over the step's prompts of the per-prompt loss;
    `margin` is the mean of r(best) − r(worst) and `rank_acc` the fraction of differently-scored candidate pairs
    the policy orders like the scores, r being the (length-normalised, with `rank.length_normalise`) sequence
    log-probability."""
    import torch

    rank = cfg.rank
    device = next(model.parameters()).device

    def loss(batch: list[Ranked], n_prompts: float) -> tuple[Any, dict[str, float]]:
        b = _collate(batch, pad_id, device)
        total_lp = sequence_logprobs(model, b["ids"], b["attn"], b["comp"], length_normalise=False)
        mean_lp = total_lp / b["comp"][:, 1:].sum(-1).clamp_min(1)  # per-token mean: RRHF's SFT term
        per_prompt = [list(x.split(b["counts"])) for x in (total_lp, mean_lp)]
        total_lp, mean_lp = (torch.nn.utils.rnn.pad_sequence(x, batch_first=True) for x in per_prompt)
        r = mean_lp if rank.length_normalise else total_lp
        if cfg.objective == "rrhf":
            value = rrhf_loss(r, b["scores"], sft_nll=-mean_lp[:, 0], mask=b["mask"], rank_weight=rank.rank_weight)
        else:
            value = pro_loss(r, b["scores"] if rank.score_weighted else None, mask=b["mask"])
        margin, right, pairs = _ranking_stats(r.detach(), b["scores"], b["mask"], b["counts"])
        return value * len(batch) / n_prompts, {"margin": margin, "right": right, "pairs": pairs,
                                                 "tokens": float(b["attn"].sum())}

    def summarise(sums: dict[str, float], n_prompts: float) -> dict[str, float]:
        return {"margin": sums["margin"] / n_prompts, "rank_acc": sums["right"] / sums["pairs"] if sums["pairs"] else 0.0}

    return Objective(cfg.objective, loss, weight=lambda _: 1, summarise=summarise)
