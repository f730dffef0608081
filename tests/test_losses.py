"""Distillation losses pinned numerically: zeros, β limits, top-k = full at k = V, TRL and float64 references."""

from __future__ import annotations

import math
import os

import pytest
import torch

from kd.distill.losses import KINDS, StudentBuckets, full_divergence, hidden_loss, topk_divergence

TEMPERATURES = [0.5, 1.0, 2.0, 4.0]
N, V, K = 7, 40, 6


def logits(seed: int, scale: float = 3.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(N, V, generator=g, dtype=torch.float64) * scale).to(dtype)


def stored(teacher: torch.Tensor, k: int, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the feature stage keeps: top-k ids and log-probs (T = 1), and the tail at `temperature`,
    log Σ_{j∉K} p_j^{1/T} (−inf when none)."""
    logq = torch.log_softmax(teacher, -1)
    values, ids = logq.topk(k, -1)
    tail = torch.logsumexp(logq.scatter(-1, ids, float("-inf")) / temperature, -1) if k < teacher.shape[-1] \
        else torch.full(values.shape[:1], float("-inf"), dtype=values.dtype)
    return ids, values, tail


def reference(p: torch.Tensor, q: torch.Tensor, kind: str, beta: float, alpha: float = 0.1) -> torch.Tensor:
    """Float64 divergences from probabilities (p student, q teacher), written from the definitions (GKD Eq. 1
    for JSD, DistiLLM Eq. 4-5 for the skew KLs)."""
    p, q = p.double(), q.double()

    def kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.where(a > 0, a * (a.log() - b.log()), torch.zeros_like(a)).sum(-1)

    if kind == "forward_kl" or (kind == "jsd" and beta == 0):
        return kl(q, p)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1):
        return kl(p, q)
    if kind == "jsd":
        m = beta * q + (1 - beta) * p
        return beta * kl(q, m) + (1 - beta) * kl(p, m)
    if kind == "skew_forward_kl":
        return kl(q, alpha * q + (1 - alpha) * p)
    if kind == "skew_reverse_kl":
        return kl(p, alpha * p + (1 - alpha) * q)
    return 0.5 * (p - q).abs().sum(-1)


def buckets(probs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    top = probs.gather(-1, ids)
    return torch.cat([top, (1 - top.sum(-1, keepdim=True)).clamp_min(0)], -1)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_identical_distributions_give_zero(kind: str, temperature: float) -> None:
    # regression: at T != 1 the teacher's tail bucket was tempered as one token and the student's tail exactly,
    # so a student equal to the teacher scored forward KL 3.33, reverse KL 4.84, JSD 0.85 at T = 2
    t = logits(0, dtype=torch.float64)
    assert full_divergence(t, t.clone(), kind, beta=0.3, temperature=temperature).abs().max() < 1e-6
    for k in (1, K, V):
        assert topk_divergence(t, *stored(t, k, temperature), kind, beta=0.3, temperature=temperature).abs().max() < 1e-6


def test_jsd_beta_limits_are_the_kls() -> None:
    s, t = logits(1, dtype=torch.float64), logits(2, dtype=torch.float64)
    fkl, rkl = full_divergence(s, t, "forward_kl"), full_divergence(s, t, "reverse_kl")
    # TRL's convention: β = 0 is forward KL(teacher‖student), β = 1 reverse KL(student‖teacher), exactly ...
    torch.testing.assert_close(full_divergence(s, t, "jsd", beta=0.0), fkl)
    torch.testing.assert_close(full_divergence(s, t, "jsd", beta=1.0), rkl)
    # ... and the mixture formula tends to them after scaling: JSD_β/β -> forward KL, JSD_β/(1-β) -> reverse KL.
    eps = 1e-9  # the next-order term is β·χ², large for these peaked distributions
    torch.testing.assert_close(full_divergence(s, t, "jsd", beta=eps) / eps, fkl, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(full_divergence(s, t, "jsd", beta=1 - eps) / eps, rkl, rtol=1e-4, atol=1e-6)
    ids, values, tail = stored(t, K)
    torch.testing.assert_close(topk_divergence(s, ids, values, tail, "jsd", beta=0.0),
                               topk_divergence(s, ids, values, tail, "forward_kl"))
    torch.testing.assert_close(topk_divergence(s, ids, values, tail, "jsd", beta=1.0),
                               topk_divergence(s, ids, values, tail, "reverse_kl"))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_topk_covering_the_vocabulary_equals_full(kind: str, temperature: float) -> None:
    s, t = logits(3), logits(4)
    got = topk_divergence(s, *stored(t, V), kind, beta=0.3, temperature=temperature)  # tail = -inf
    torch.testing.assert_close(got, full_divergence(s, t, kind, beta=0.3, temperature=temperature),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_agrees_with_trl_generalized_jsd(beta: float) -> None:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd import GKDTrainer

    s, t = logits(5), logits(6)
    trl = GKDTrainer.generalized_jsd_loss(s, t, beta=beta, reduction="batchmean")  # mean over the N positions
    torch.testing.assert_close(full_divergence(s, t, "jsd", beta=beta).mean(), trl, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(topk_divergence(s, *stored(t, V), "jsd", beta=beta).mean(), trl, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
def test_agrees_with_float64_reference(kind: str, temperature: float) -> None:
    s, t = logits(7), logits(8)
    scale = 1.0 if kind == "tvd" else temperature**2  # TVD stays in [0, 1]
    p, q = torch.softmax(s.double() / temperature, -1), torch.softmax(t.double() / temperature, -1)
    want = reference(p, q, kind, 0.3, 0.2) * scale
    torch.testing.assert_close(full_divergence(s, t, kind, 0.3, temperature, alpha=0.2).double(), want,
                               atol=1e-5, rtol=1e-5)
    # Top-k: both sides are the exact tempered distributions p, q restricted to the same k + 1 buckets.
    ids, values, tail = stored(t, K, temperature)
    want = reference(buckets(p, ids), buckets(q, ids), kind, 0.3, 0.2) * scale
    got = topk_divergence(s, ids, values, tail, kind, 0.3, temperature, alpha=0.2)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.5, 0.9])
def test_skew_kls_against_float64_and_their_limits(alpha: float) -> None:
    s, t = logits(17, dtype=torch.float64), logits(18, dtype=torch.float64)
    p, q = torch.softmax(s, -1), torch.softmax(t, -1)
    for kind in ("skew_forward_kl", "skew_reverse_kl"):
        torch.testing.assert_close(full_divergence(s, t, kind, alpha=alpha), reference(p, q, kind, 0.5, alpha),
                                   atol=1e-10, rtol=1e-8)
        torch.testing.assert_close(topk_divergence(s, *stored(t, V), kind, alpha=alpha),
                                   reference(p, q, kind, 0.5, alpha), atol=1e-8, rtol=1e-8)
    # α = 0 is the plain KL; a skewed KL is bounded by log(1/α) however far apart the two are
    if alpha == 0:
        torch.testing.assert_close(full_divergence(s, t, "skew_forward_kl", alpha=0.0), full_divergence(s, t, "forward_kl"))
        torch.testing.assert_close(full_divergence(s, t, "skew_reverse_kl", alpha=0.0), full_divergence(s, t, "reverse_kl"))
    else:
        far = logits(19, scale=50.0, dtype=torch.float64)
        assert (full_divergence(far, t, "skew_forward_kl", alpha=alpha) <= math.log(1 / alpha) + 1e-9).all()


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_tvd_is_bounded(temperature: float) -> None:
    s, t = logits(9, scale=30.0), logits(10, scale=30.0)  # near one-hot, mostly on different tokens
    for got in (full_divergence(s, t, "tvd", temperature=temperature),
                topk_divergence(s, *stored(t, K, temperature), "tvd", temperature=temperature)):
        assert (got >= 0).all() and (got <= 1 + 1e-6).all()
    assert full_divergence(s, t, "tvd").max() > 0.9


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_finite_when_tail_mass_vanishes(kind: str) -> None:
    t = logits(11)
    ids, values, tail = stored(t, K)
    s = logits(12)
    s.scatter_(-1, ids, 200.0)  # the student puts all its mass on the teacher's top-k: its tail is ~e^-200
    for teacher in ((ids, values, torch.full_like(tail, -80.0)), (ids, values, torch.full_like(tail, float("-inf"))),
                    stored(t, V)):
        x = s.clone().requires_grad_(True)
        loss = topk_divergence(x, *teacher, kind, beta=0.5).sum()
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


def test_bucket_gradient_matches_finite_differences() -> None:
    # The student side is a hand-written autograd function (chunked, recomputes softmax in backward).
    s = logits(13, dtype=torch.float64).requires_grad_(True)
    ids = stored(logits(14), K)[0]
    for temperature in (1.0, 0.5, 2.0):
        assert torch.autograd.gradcheck(lambda z, t=temperature: StudentBuckets.apply(z, ids, t), (s,))


def test_bfloat16_student_logits() -> None:
    s, t = logits(15).bfloat16().requires_grad_(True), logits(16)
    loss = topk_divergence(s, *stored(t, K), "forward_kl").mean()
    loss.backward()
    assert s.grad.dtype == torch.bfloat16 and torch.isfinite(s.grad.float()).all()
    torch.testing.assert_close(loss, topk_divergence(s.detach().float(), *stored(t, K), "forward_kl").mean(),
                               atol=1e-5, rtol=1e-5)


def test_hidden_loss() -> None:
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 5, 8, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert hidden_loss(h, h, torch.nn.Identity(), "l2", mask) == 0
    assert hidden_loss(3 * h, h, torch.nn.Identity(), "cosine", mask).abs() < 1e-6  # scale-free
    other = torch.randn(2, 5, 8, generator=g)
    want = ((h - other) ** 2).mean(-1)[mask.bool()].mean()
    torch.testing.assert_close(hidden_loss(h, other, torch.nn.Identity(), "l2", mask), want)
    # Masked positions do not count, whatever they hold.
    junk = other.clone()
    junk[0, 3:] = 1e6
    torch.testing.assert_close(hidden_loss(h, junk, torch.nn.Identity(), "l2", mask), want)
    proj = torch.nn.Linear(8, 16)
    loss = hidden_loss(h, torch.randn(2, 5, 16, generator=g), proj, "cosine", mask)
    loss.backward()
    assert proj.weight.grad is not None and math.isfinite(loss.item())


def test_kd_objective_is_the_documented_mix() -> None:
    # regression (docs): the KD student's loss is ½ CE + ½ forward KL at ce_weight 0.5, but docs/methods.md and
    # params.yaml called it "forward KL + ½ CE"; the field description (the source of docs/params.md) states it
    from transformers import LlamaConfig, LlamaForCausalLM

    from kd.config.students import Divergence
    from kd.distill.loop import Example, token_objective

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    ids, start = torch.randint(0, V, (10,)).tolist(), 4
    teacher = stored(logits(20)[: 10 - start], K)
    w = 0.3
    kd = Divergence(divergence="forward_kl", ce_weight=w)
    got, _ = token_objective(model, kd, None, 0, 1).loss([Example(ids, start, teacher)], 10 - start)
    z = model(torch.tensor([ids])).logits[0, start - 1:-1].float()
    ce = torch.nn.functional.cross_entropy(z, torch.tensor(ids[start:]))
    want = w * ce + (1 - w) * topk_divergence(z, *teacher, "forward_kl").mean()
    torch.testing.assert_close(got, want)
    assert "w·CE + (1 − w)·divergence" in Divergence.model_fields["ce_weight"].description
