"""RRHF and PRO pinned on hand-computed examples, their limits, and sequence log-probabilities."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kd.distill.preference import pro_loss, rrhf_loss, sequence_logprobs


def test_rrhf_by_hand():
    # scores 3 > 2 > 1 for candidates 0, 1, 2; log-probs -1, -2, -0.5.
    # pairs (worse i, better j): (1, 0): max(0, -2 - -1) = 0; (2, 0): max(0, -0.5 - -1) = 0.5;
    # (2, 1): max(0, -0.5 - -2) = 1.5 -> rank 2.0. SFT on the best (candidate 0): -(-1) = 1.0. Total 3.0.
    p = torch.tensor([[-1.0, -2.0, -0.5]])
    s = torch.tensor([[3.0, 2.0, 1.0]])
    assert rrhf_loss(p, s).item() == pytest.approx(3.0)
    assert rrhf_loss(p, s, rank_weight=0.5).item() == pytest.approx(0.5 * 2.0 + 1.0)
    assert rrhf_loss(p, s, sft_nll=torch.tensor([0.25])).item() == pytest.approx(2.25)


def test_rrhf_ordered_policy_and_equal_scores_leave_only_sft():
    p = torch.tensor([[-0.5, -1.0, -2.0]])  # already ranked like the scores: no hinge
    assert rrhf_loss(p, torch.tensor([[3.0, 2.0, 1.0]])).item() == pytest.approx(0.5)
    # equal scores: no pair has an order to learn; the best is the first (argmax tie-break) -> SFT 0.5
    assert rrhf_loss(p, torch.tensor([[1.0, 1.0, 1.0]])).item() == pytest.approx(0.5)


def test_rrhf_mask_ignores_padded_candidates_and_averages_batch():
    # row 0: candidate 2 is padding, so only the pair (1, 0): max(0, -0.5 - -1) = 0.5, SFT 1 -> 1.5
    # row 1: scores 1 < 2: pair (0, 1): max(0, -1 - -3) = 2, SFT on candidate 1: 3 -> 5; mean (1.5 + 5) / 2
    p = torch.tensor([[-1.0, -0.5, 9.0], [-1.0, -3.0, 0.0]])
    s = torch.tensor([[2.0, 1.0, 99.0], [1.0, 2.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    assert rrhf_loss(p, s, mask=mask).item() == pytest.approx((1.5 + 5.0) / 2)


def test_pro_by_hand():
    # p = [-1, -2, -0.5] sorted by score. k=1: -log(e^-1 / (e^-1 + e^-2 + e^-0.5)); k=2: -log(e^-2 / (e^-2 + e^-0.5))
    a, b, c = math.exp(-1), math.exp(-2), math.exp(-0.5)
    expected = -math.log(a / (a + b + c)) - math.log(b / (b + c))
    assert pro_loss(torch.tensor([[-1.0, -2.0, -0.5]])).item() == pytest.approx(expected, rel=1e-6)


def test_pro_with_two_candidates_is_bradley_terry():
    p1, p2 = -0.7, -1.9
    assert pro_loss(torch.tensor([[p1, p2]])).item() == pytest.approx(-F.logsigmoid(torch.tensor(p1 - p2)).item())


def test_pro_temperatures_by_hand():
    # scores 3, 2, 0: k=1 weights: p2*(3-2)=p2*1, p3*(3-0)=p3*3, p1*max(1, 3)=p1*3;
    # k=2 weights: p3*(2-0)=p3*2, p2*2.  With p = [-1, -2, -0.5]:
    # k=1: z = [-3, -2, -1.5] -> logsumexp(z) - (-3); k=2: z = [-4, -1] -> logsumexp(z) - (-4)
    z1, z2 = torch.tensor([-3.0, -2.0, -1.5]), torch.tensor([-4.0, -1.0])
    expected = (torch.logsumexp(z1, 0) + 3.0 + torch.logsumexp(z2, 0) + 4.0).item()
    got = pro_loss(torch.tensor([[-1.0, -2.0, -0.5]]), scores=torch.tensor([[3.0, 2.0, 0.0]]))
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_pro_equal_scores_give_no_gradient_and_mask_gives_finite_grads():
    p = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    loss = pro_loss(p, scores=torch.tensor([[1.0, 1.0, 1.0]]))  # every weight 0: log 3 + log 2, flat
    loss.backward()
    assert loss.item() == pytest.approx(math.log(3) + math.log(2))
    assert torch.all(p.grad == 0)
    # a padded third slot: same as the n = 2 loss, and gradients stay finite (no NaN through masked slots)
    q = torch.tensor([[-1.0, -2.0, 0.0], [-0.3, 0.0, 0.0]], requires_grad=True)
    loss = pro_loss(q, mask=torch.tensor([[1, 1, 0], [1, 0, 0]]))
    loss.backward()
    assert loss.item() == pytest.approx(-F.logsigmoid(torch.tensor(1.0)).item() / 2)  # row 2 has nothing to rank
    assert torch.isfinite(q.grad).all() and q.grad[:, 2].abs().sum() == 0


def test_sequence_logprobs_match_a_manual_gather():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1)).eval()
    ids = torch.tensor([[1, 5, 7, 9, 3], [1, 4, 6, 0, 0]])
    attn = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    comp = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 1, 0, 0]])  # completions: 3 tokens, 1 token
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=attn).logits.float(), -1)
        row0 = sum(logp[0, t - 1, ids[0, t]] for t in (2, 3, 4))
        row1 = logp[1, 1, ids[1, 2]]
        summed = sequence_logprobs(model, ids, attn, comp, length_normalise=False)
        mean = sequence_logprobs(model, ids, attn, comp)
    assert summed.tolist() == pytest.approx([row0.item(), row1.item()], rel=1e-5)
    assert mean.tolist() == pytest.approx([row0.item() / 3, row1.item()], rel=1e-5)
