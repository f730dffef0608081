"""Rank losses over scored candidate lists (survey §3.2.4): RRHF and PRO, and the sequence log-probabilities
they rank. Pure torch; a student objective feeds them from a feedback dataset's `candidates` list.

Shapes: B prompts, n candidates each. `logprobs[b, i]` is the policy's (usually length-normalised) log
p(y_i | x_b); `scores[b, i]` is the judge's score of y_i. `mask[b, i]` (optional) marks real candidates when
prompts have fewer than n (padded slots are ignored).
"""

from __future__ import annotations

from typing import Any

import torch


def sequence_logprobs(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      completion_mask: torch.Tensor, length_normalise: bool = True) -> torch.Tensor:
    """Log-probability of each row's completion tokens under `model`, teacher-forced.

    The LM head runs only where a completion token is predicted ([C, V], never [N, L, V]): a prompt is usually
    most of a row, and the full-vocabulary logits of every position were most of the time and memory of a step.

    Args:
        input_ids, attention_mask: [N, L] prompt + completion, padded.
        completion_mask: [N, L], 1 on the completion tokens to score (not the prompt, not padding).
        length_normalise: divide by the number of completion tokens (RRHF's and PRO's r(x, y)); without
            it, the summed log-probability.

    Returns:
        [N] float32, differentiable through the model.
    """
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    mask = completion_mask[:, 1:].bool()
    rows, pos = mask.nonzero(as_tuple=True)  # the hidden state at `pos` predicts token `pos + 1`
    # float32 so bf16 logits do not round the ranking away
    logits = model.get_output_embeddings()(hidden[rows, pos]).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:  # Gemma-style models squash their logits in forward(); the bare head does not
        logits = torch.tanh(logits / cap) * cap
    token = -torch.nn.functional.cross_entropy(logits, input_ids[rows, pos + 1], reduction="none")
    total = token.new_zeros(input_ids.shape[0]).index_add(0, rows, token)
    return total / mask.sum(-1).clamp_min(1) if length_normalise else total


def _valid(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return torch.ones_like(x, dtype=torch.bool) if mask is None else mask.bool()


def rrhf_loss(logprobs: torch.Tensor, scores: torch.Tensor, sft_nll: torch.Tensor | None = None,
              mask: torch.Tensor | None = None, rank_weight: float = 1.0) -> torch.Tensor:
    """RRHF: a ranking hinge on the policy's log-probabilities plus SFT on the best candidate.

    L = rank_weight * Σ_{r_i < r_j} max(0, p_i − p_j)  +  NLL(best candidate),  averaged over the batch.

    Pairs with equal scores contribute nothing (no order to learn). Without `sft_nll`, the SFT term is
    −logprobs[best], which is the best candidate's mean token NLL when `logprobs` are length-normalised (as in
    the reference implementation).

    Args:
        logprobs: [B, n] length-normalised sequence log-probs (from `sequence_logprobs`).
        scores: [B, n] judge scores (higher = better); the best is argmax (first on ties).
        sft_nll: [B] the best candidate's NLL, when computed another way.
        mask: [B, n] real candidates.

    References: Yuan et al. 2023, "RRHF: Rank Responses to Align Language Models with Human Feedback
    without tears", https://arxiv.org/abs/2304.05302 (Eq. 2-4).
    """
    valid = _valid(logprobs, mask)
    # better[b, i, j]: candidate j outscored candidate i, both real
    better = (scores[:, None, :] > scores[:, :, None]) & valid[:, :, None] & valid[:, None, :]
    hinge = (logprobs[:, :, None] - logprobs[:, None, :]).clamp_min(0.0)  # max(0, p_i − p_j)
    rank = (hinge * better).sum(dim=(1, 2))
    if sft_nll is None:
        best = scores.masked_fill(~valid, float("-inf")).argmax(-1)
        sft_nll = -logprobs.gather(-1, best[:, None]).squeeze(-1)
    return (rank_weight * rank + sft_nll).mean()


def pro_loss(logprobs: torch.Tensor, scores: torch.Tensor | None = None,
             mask: torch.Tensor | None = None) -> torch.Tensor:
    """PRO: the best candidate against all below it, then the next against the rest, and so on.

    L = −Σ_{k=1}^{n−1} log( exp(p_k) / Σ_{i≥k} exp(p_i) ),  averaged over the batch,

    with candidates sorted by score, best first (position 1). With `scores` (sorted the same way), PRO's
    temperatures weight each term by the score gaps: p_i is multiplied by (s_k − s_i) for i > k and p_k by
    max_{i>k}(s_k − s_i), so a clearly worse candidate is pushed down harder (the paper's T = 1/(s_k − s_i)).
    For n = 2 and no scores this is the Bradley-Terry loss −log σ(p_1 − p_2).

    Args:
        logprobs: [B, n] length-normalised sequence log-probs, sorted by score descending.
        scores: [B, n] the scores in the same order, for the temperature weights (optional).
        mask: [B, n] real candidates; they must come first in each row (padding at the end).

    References: Song et al. 2023, "Preference Ranking Optimization for Human Alignment",
    https://arxiv.org/abs/2306.17492 (Eq. 6, and §3.3 for the dynamic temperature).
    """
    valid = _valid(logprobs, mask)
    n = logprobs.shape[-1]
    total = logprobs.new_zeros(logprobs.shape[0])
    for k in range(n - 1):
        rest = valid.clone()
        rest[:, :k] = False  # the candidates ranked k and below
        if scores is None:
            z = logprobs
        else:
            gap = (scores[:, k:k + 1] - scores).clamp_min(0.0)
            top = gap.masked_fill(~rest, 0.0)[:, k + 1:].amax(-1, keepdim=True)
            weight = torch.where(torch.arange(n, device=logprobs.device) == k, top, gap)
            z = logprobs * weight
        # a term needs candidate k and at least one real candidate below it; other rows get finite dummies
        # (zeros), so no NaN reaches the gradient through the discarded branch of `where`
        has = valid[:, k] & (rest.sum(-1) >= 2)
        z = torch.where(has[:, None], z.masked_fill(~rest, float("-inf")), torch.zeros_like(z))
        term = torch.logsumexp(z, dim=-1) - z[:, k]
        total = total + torch.where(has, term, torch.zeros_like(term))
    return total.mean()
