"""Token-level distillation losses: divergences to a teacher distribution, and hidden-state similarity.

`topk_divergence` works from stored top-k teacher log-probabilities (DistillKit-style offline KD): the
vocabulary is folded into k + 1 buckets — the teacher's top-k tokens and one tail bucket holding every other
token — and the divergence is taken between the two bucketed distributions. The student's bucket
log-probabilities come from a custom autograd function that reads its logits in row chunks and recomputes
softmaxes in backward, so beyond the student's own logits (and their gradient) memory is O(N·k + chunk·V):
no teacher vocabulary-sized tensor, no saved log-softmax copy.

Conventions (the KL and JSD ones match TRL's `GKDTrainer.generalized_jsd_loss`, which they are tested against):
- `forward_kl` = KL(teacher ‖ student) (mode-covering); `reverse_kl` = KL(student ‖ teacher) (mode-seeking).
- `jsd` with β: M = β·teacher + (1−β)·student; JSD_β = β·KL(teacher ‖ M) + (1−β)·KL(student ‖ M).
  It tends to 0 at both ends, but JSD_β/β → forward KL as β → 0 and JSD_β/(1−β) → reverse KL as β → 1;
  TRL defines β = 0 and β = 1 as exactly forward and reverse KL, and so do we.
- `skew_forward_kl` with α = KL(teacher ‖ α·teacher + (1−α)·student); `skew_reverse_kl` with α =
  KL(student ‖ α·student + (1−α)·teacher) (DistiLLM). α = 0 gives the plain KLs; a small α keeps the gradient
  bounded where the student puts almost no mass on the teacher's tokens.
- `tvd` = ½·Σ|p − q| ∈ [0, 1].
- temperature T: both distributions are softened and the KL-type losses are multiplied by T² so their gradient
  scale does not depend on T (Hinton et al.); TVD is not scaled, so it stays in [0, 1]. TRL does not multiply
  by T²; the two agree at T = 1. With top-k buckets each side is the exact tempered distribution restricted to
  k + 1 outcomes: softmax(z / T) over the whole vocabulary, then folded into the teacher's top-k tokens and one
  tail bucket. The tail at T is Σ_{j∉K} p_j^{1/T} (normalised), not (Σ_{j∉K} p_j)^{1/T}: tempering the tail bucket
  as one token would make it 0.13 instead of 0.95 on a flat tail at T = 2. The student's side comes from its full
  logits; the teacher's from its stored top-k log-probs (T = 1) and its tail at T, log Σ_{j∉K} p_j^{1/T}, which
  the feature stage stores for every temperature a student uses (kd.runtime.logits). So every divergence is
  exactly 0 when student = teacher at any T, and k = V is the full-vocabulary loss.

References:
    Hinton et al., Distilling the Knowledge in a Neural Network, 2015, https://arxiv.org/abs/1503.02531
    Agarwal et al., On-Policy Distillation of Language Models (GKD), 2024, https://arxiv.org/abs/2306.13649
    Gu et al., MiniLLM: Knowledge Distillation of Large Language Models, 2024, https://arxiv.org/abs/2306.08543
    Wen et al., f-Divergence Minimization for Sequence-Level KD (TVD), 2023, https://arxiv.org/abs/2307.15190
    Romero et al., FitNets: Hints for Thin Deep Nets, 2015, https://arxiv.org/abs/1412.6550
    Sanh et al., DistilBERT (cosine hidden-state loss), 2019, https://arxiv.org/abs/1910.01108
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Kind = Literal["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"]
KINDS: tuple[str, ...] = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")
# Log-probabilities below this are zero probability for every purpose here; clamping -inf to it keeps
# 0·log 0 terms at 0 with finite gradients (e.g. an empty tail bucket when top-k covers the vocabulary).
LOG_FLOOR = -1.0e4
# Rows of student logits processed at once inside the bucket function: bounds its scratch memory.
CHUNK_ROWS = 256


class StudentBuckets(torch.autograd.Function):
    """log p over k + 1 buckets from full student logits at temperature T: [N, V] logits, [N, k] ids, T ->
    [N, k + 1] (float32), p = softmax(logits / T).

    Bucket i < k is token ids[:, i]; bucket k is every other token, computed as a masked logsumexp (exact even
    when the tail is tiny, where log(1 − Σ top-k) would cancel catastrophically). T divides each chunk inside,
    so no tempered [N, V] copy of the logits is made.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, ids: Tensor, temperature: float = 1.0) -> Tensor:  # type: ignore[override]
        n, k = ids.shape
        # float32 at least (bf16 logits lose the tail), float64 kept for exact references and gradcheck.
        dtype = torch.promote_types(logits.dtype, torch.float32)
        out = logits.new_empty((n, k + 1), dtype=dtype)
        lse_all = logits.new_empty((n,), dtype=dtype)
        lse_tail = logits.new_empty((n,), dtype=dtype)
        for s in range(0, n, CHUNK_ROWS):
            z = logits[s:s + CHUNK_ROWS].to(dtype) / temperature
            i = ids[s:s + CHUNK_ROWS]
            all_ = torch.logsumexp(z, dim=-1)
            tail = torch.logsumexp(z.scatter(-1, i, float("-inf")), dim=-1)
            out[s:s + CHUNK_ROWS, :k] = z.gather(-1, i) - all_[:, None]
            out[s:s + CHUNK_ROWS, k] = tail - all_
            lse_all[s:s + CHUNK_ROWS], lse_tail[s:s + CHUNK_ROWS] = all_, tail
        ctx.save_for_backward(logits, ids, lse_all, lse_tail)
        ctx.temperature = temperature
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        # With z = logits / T: d log p_i / dz = onehot_i − softmax(z); d log p_tail / dz = 1[∉K]·softmax_tail(z) −
        # softmax(z); and dz / dlogits = 1 / T.
        logits, ids, lse_all, lse_tail = ctx.saved_tensors
        temperature = ctx.temperature
        k = ids.shape[1]
        out = torch.empty_like(logits)
        # An empty tail (lse = -inf) has no gradient; +inf makes its softmax exactly 0 instead of NaN.
        lse_tail = torch.where(torch.isneginf(lse_tail), torch.full_like(lse_tail, float("inf")), lse_tail)
        for s in range(0, logits.shape[0], CHUNK_ROWS):
            z = logits[s:s + CHUNK_ROWS].to(lse_all.dtype) / temperature
            i, g = ids[s:s + CHUNK_ROWS], grad[s:s + CHUNK_ROWS].to(lse_all.dtype) / temperature
            g_top, g_tail = g[:, :k], g[:, k]
            tail_soft = torch.exp(z - lse_tail[s:s + CHUNK_ROWS, None]).scatter(-1, i, 0.0)
            d = g_tail[:, None] * tail_soft - g.sum(-1, keepdim=True) * torch.exp(z - lse_all[s:s + CHUNK_ROWS, None])
            d = d.scatter_add(-1, i, g_top)
            out[s:s + CHUNK_ROWS] = d.to(logits.dtype)
        return out, None, None


def _divergence(logp: Tensor, logq: Tensor, kind: Kind, beta: float, alpha: float) -> Tensor:
    """Divergence between student (log p) and teacher (log q) distributions over the last dim -> [...]."""
    logp, logq = logp.clamp_min(LOG_FLOOR), logq.clamp_min(LOG_FLOOR)
    p, q = logp.exp(), logq.exp()
    match kind:
        case "forward_kl":
            return (q * (logq - logp)).sum(-1)
        case "reverse_kl":
            return (p * (logp - logq)).sum(-1)
        case "jsd":
            if beta == 0:
                return (q * (logq - logp)).sum(-1)
            if beta == 1:
                return (p * (logp - logq)).sum(-1)
            logm = torch.logaddexp(logp + math.log1p(-beta), logq + math.log(beta))
            return beta * (q * (logq - logm)).sum(-1) + (1 - beta) * (p * (logp - logm)).sum(-1)
        case "skew_forward_kl":
            if alpha == 0:
                return (q * (logq - logp)).sum(-1)
            logm = torch.logaddexp(logq + math.log(alpha), logp + math.log1p(-alpha))
            return (q * (logq - logm)).sum(-1)
        case "skew_reverse_kl":
            if alpha == 0:
                return (p * (logp - logq)).sum(-1)
            logm = torch.logaddexp(logp + math.log(alpha), logq + math.log1p(-alpha))
            return (p * (logp - logm)).sum(-1)
        case "tvd":
            return 0.5 * (p - q).abs().sum(-1)
    raise ValueError(f"unknown divergence {kind!r} (choose {', '.join(KINDS)})")


def _scale(kind: str, temperature: float) -> float:
    """T² for the KL-type losses (gradient scale independent of T); TVD stays in [0, 1]."""
    return 1.0 if kind == "tvd" else temperature**2


def _check(kind: str, beta: float, temperature: float, alpha: float) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown divergence {kind!r} (choose {', '.join(KINDS)})")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"alpha must be in [0, 1), got {alpha}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def topk_divergence(student_logits: Tensor, topk_ids: Tensor, topk_logprobs: Tensor, tail_logprob: Tensor,
                    kind: Kind, beta: float = 0.5, temperature: float = 1.0, alpha: float = 0.1) -> Tensor:
    """Per-position divergence between the student and a stored top-k teacher distribution.

    Args:
        student_logits: [N, V] raw student logits at the N scored positions (any float dtype).
        topk_ids: [N, k] the teacher's top-k token ids.
        topk_logprobs: [N, k] the teacher's log-probabilities of those tokens (T = 1).
        tail_logprob: [N] the teacher's tail at `temperature`: log Σ_{j∉top-k} p_j^{1/T} over its T = 1
            probabilities p (at T = 1 the log of its remaining mass; −inf or very low when top-k covers it all).
        kind: one of KINDS (see the module docstring for the conventions).
        beta: JSD mixture weight (0 = forward KL, 1 = reverse KL).
        temperature: both sides are softmax(z / T) restricted to the k + 1 buckets; KL-type results are scaled
            by T².
        alpha: the skew of `skew_forward_kl` / `skew_reverse_kl`.

    Returns:
        [N] divergence per position, float32 (float64 for float64 logits) (reduce it yourself, e.g. mean over
        completion tokens).
    """
    _check(kind, beta, temperature, alpha)
    logp = StudentBuckets.apply(student_logits, topk_ids.long(), temperature).clamp_min(LOG_FLOOR)
    # Bucket i < k: q_i^{1/T}; the tail: Σ_{j∉K} q_j^{1/T}, as stored. Their softmax is the exact tempered
    # restriction (the log-partition cancels); it also renormalises float16 storage (sums of 1 ± 1e-3 at T = 1).
    teacher = torch.cat([topk_logprobs.to(logp.dtype) / temperature, tail_logprob[:, None].to(logp.dtype)], dim=-1)
    logq = torch.log_softmax(teacher.clamp_min(LOG_FLOOR), dim=-1)
    return _divergence(logp, logq, kind, beta, alpha) * _scale(kind, temperature)


def full_divergence(student_logits: Tensor, teacher_logits: Tensor, kind: Kind, beta: float = 0.5,
                    temperature: float = 1.0, alpha: float = 0.1) -> Tensor:
    """Per-position divergence between two full-vocabulary distributions ([..., V] logits -> [...]).

    For online teachers (on-policy distillation) and as the exact reference for `topk_divergence`.
    """
    _check(kind, beta, temperature, alpha)
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    logp = torch.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    logq = torch.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    return _divergence(logp, logq, kind, beta, alpha) * _scale(kind, temperature)


def hidden_loss(student_h: Tensor, teacher_h: Tensor, projection: nn.Module, kind: Literal["l2", "cosine"],
                mask: Tensor | None = None) -> Tensor:
    """Similarity loss between hidden states after a learned projection of the student's (FitNets hint).

    Args:
        student_h: [B, L, D_student] hidden states of one student layer.
        teacher_h: [B, L, D_teacher] hidden states of its paired teacher layer (no gradient flows into it).
        projection: maps D_student -> D_teacher (e.g. nn.Linear; nn.Identity when the widths match).
        kind: `l2` = mean squared error over the hidden dimension; `cosine` = 1 − cosine similarity.
        mask: [B, L] true where a position counts (e.g. attention mask); all positions when None.

    Returns:
        Scalar mean over the counted positions (0 with a gradient path when none count).
    """
    projected = projection(student_h).float()
    target = teacher_h.detach().float()
    match kind:
        case "l2":
            per_pos = (projected - target).pow(2).mean(-1)
        case "cosine":
            per_pos = 1.0 - F.cosine_similarity(projected, target, dim=-1, eps=1e-8)
        case _:
            raise ValueError(f"unknown hidden loss {kind!r} (choose l2 or cosine)")
    if mask is None:
        return per_pos.mean()
    m = mask.to(per_pos.dtype)
    return (per_pos * m).sum() / m.sum().clamp_min(1.0)
