"""How far is the stored top-k loss from the full-vocabulary loss, on the real teacher's logits?

kd's `kd` objective sees only the teacher's top-k log-probabilities and one tail bucket (kd.distill.losses). This
compares, at every completion position of the sft dataset's first records, the top-k divergence with the exact
full-vocabulary one computed from the teacher's complete logits, for students near the teacher and far from it:

- `near`: the teacher's own logits plus Gaussian noise (σ = 1): what a well-trained student looks like;
- `trained`: models/student_fkl, if it is built;
- `far`: the untrained 20-layer slice of the default recipe (the students' initialisation).

For each divergence and temperature (0.5, 1, 2) it prints the mean full-vocabulary value, the top-k value, their
relative difference, and the cosine between the two losses' gradients with respect to the student's logits (1 = the
top-k loss pushes the student exactly where the full one would), for the top-k + tail rule of kd before issue 20
(`old`: the k + 1 buckets formed at T = 1, then tempered, the tail bucket as one token: (Σp)^{1/T}) and now
(`exact`: both sides softmax(z / T) restricted to the k + 1 buckets, the teacher's tail at T stored by the feature
stage). It also prints how far each rule's teacher buckets are from the exact tempered distribution restricted to
k + 1 outcomes (total variation, mean over positions), and the teacher's tail mass at T under each rule.
Results go to bench/results/topk_error.json.

    python bench/topk_error.py            # needs models/teacher and data/sft (make repro, or dvc repro sft)
    python bench/topk_error.py --k 20 --records 16
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from kd.config import load_params
from kd.distill.losses import LOG_FLOOR, StudentBuckets, full_divergence, topk_divergence
from kd.records import read_dataset
from kd.runtime.init import init_student
from kd.runtime.models import load_teacher
from kd.runtime.tokenize import encode

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl")
TEMPERATURES = (0.5, 1.0, 2.0)
TAIL_FLOOR = -80.0  # as kd.runtime.logits stores the tail


def positions(model, seqs: list[tuple[list[int], int]]) -> torch.Tensor:
    """Logits [N, V] at every position that predicts a completion token."""
    out = []
    with torch.no_grad():
        for ids, start in seqs:
            logits = model(input_ids=torch.tensor([ids])).logits[0].float()
            out.append(logits[start - 1:len(ids) - 1])
    return torch.cat(out)


def old_rule(student_logits: torch.Tensor, ids: torch.Tensor, values: torch.Tensor, tail1: torch.Tensor, kind: str,
             t: float) -> torch.Tensor:
    """kd's top-k loss before issue 20: both sides bucketed at T = 1, then each (k + 1)-way distribution tempered
    (full_divergence over the k + 1 bucket log-probabilities is exactly that)."""
    logp = StudentBuckets.apply(student_logits, ids).clamp_min(LOG_FLOOR)
    logq = torch.cat([values, tail1[:, None]], -1).clamp_min(LOG_FLOOR)
    return full_divergence(logp, logq, kind, beta=0.5, temperature=t)


def teacher_buckets(teacher: torch.Tensor, k: int) -> dict:
    """Per T: total variation between each rule's stored teacher buckets and the exact tempered restriction, and
    the mean tail mass under each."""
    logq = torch.log_softmax(teacher.double(), -1)
    values, ids = logq.topk(k, -1)
    rest = logq.scatter(-1, ids, float("-inf"))
    v16 = values.half().double()
    out = {}
    for t in TEMPERATURES:
        exact = torch.softmax(teacher.double() / t, -1)
        exact = torch.cat([exact.gather(-1, ids), 1 - exact.gather(-1, ids).sum(-1, keepdim=True)], -1)
        tail1 = torch.logsumexp(rest, -1).clamp_min(TAIL_FLOOR).half().double()
        tail_t = torch.logsumexp(rest / t, -1).clamp_min(TAIL_FLOOR).half().double()
        old = torch.softmax(torch.cat([v16, tail1[:, None]], -1) / t, -1)
        new = torch.softmax(torch.cat([v16 / t, tail_t[:, None]], -1), -1)
        out[f"T={t:g}"] = {"tail_mass_exact": round(exact[:, -1].mean().item(), 4),
                           "tail_mass_old": round(old[:, -1].mean().item(), 4),
                           "tail_mass_new": round(new[:, -1].mean().item(), 4),
                           "tv_old": round(0.5 * (old - exact).abs().sum(-1).mean().item(), 6),
                           "tv_new": round(0.5 * (new - exact).abs().sum(-1).mean().item(), 6)}
    return out


def compare(student: torch.Tensor, teacher: torch.Tensor, k: int) -> dict:
    logq = torch.log_softmax(teacher, -1)
    values, ids = logq.topk(k, -1)
    rest = logq.scatter(-1, ids, float("-inf"))
    values16 = values.half().float()  # as the feature stage stores them: fp16, the tail floored at -80
    tails = {t: torch.logsumexp(rest / t, -1).clamp_min(TAIL_FLOOR).half().float() for t in TEMPERATURES}
    rows = {}
    for kind in KINDS:
        for t in TEMPERATURES:
            grads, vals = {}, {}
            for rule in ("full", "old", "exact"):
                s = student.clone().requires_grad_(True)
                match rule:
                    case "full":
                        loss = full_divergence(s, teacher, kind, beta=0.5, temperature=t)
                    case "old":
                        loss = old_rule(s, ids, values16, tails[1.0], kind, t)
                    case "exact":
                        loss = topk_divergence(s, ids, values16, tails[t], kind, beta=0.5, temperature=t)
                loss.sum().backward()
                grads[rule], vals[rule] = s.grad.flatten(), loss.mean().item()
            f = vals["full"]
            row = {"full": round(f, 4)}
            for rule in ("old", "exact"):
                cos = torch.nn.functional.cosine_similarity(grads["full"], grads[rule], dim=0).item()
                row[rule] = {"topk": round(vals[rule], 4),
                             "relative_difference": round((vals[rule] - f) / f, 4) if f else None,
                             "gradient_cosine": round(cos, 4)}
            rows[f"{kind}@T={t:g}"] = row
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--records", type=int, default=16, help="sft records whose completions are scored")
    parser.add_argument("--out", default=str(ROOT / "bench/results/topk_error.json"))
    args = parser.parse_args()
    params = load_params(ROOT)
    teacher, tok = load_teacher(params, "smollm2", ROOT, dtype=torch.float32)
    _, records = read_dataset(ROOT / "data/sft")
    seqs = [encode(tok, r, 384) for r in records[:args.records]]
    start = time.time()
    t_logits = positions(teacher, seqs)
    students = {"near": t_logits + torch.randn(t_logits.shape, generator=torch.Generator().manual_seed(0))}
    trained = ROOT / "models/student_fkl"
    if trained.is_dir():
        from transformers import AutoModelForCausalLM

        students["trained"] = positions(AutoModelForCausalLM.from_pretrained(trained, dtype=torch.float32).eval(), seqs)
    cfg = params.students["student_fkl"]
    far, _ = init_student(cfg.init, params, ROOT, dtype=torch.float32)
    students["far"] = positions(far.eval(), seqs)
    results = {name: compare(s, t_logits, args.k) for name, s in students.items()}
    buckets = teacher_buckets(t_logits, args.k)
    print(f"top-{args.k} vs full vocabulary ({t_logits.shape[1]} tokens) on {t_logits.shape[0]} completion positions "
          f"of {len(seqs)} sft records")
    print("teacher's k + 1 buckets against the exact tempered distribution restricted to them (mean over positions):")
    print(f"{'T':>4} {'tail exact':>10} {'tail old':>9} {'tail new':>9} {'TV old':>9} {'TV new':>9}")
    for key, b in buckets.items():
        print(f"{key[2:]:>4} {b['tail_mass_exact']:10.4f} {b['tail_mass_old']:9.4f} {b['tail_mass_new']:9.4f} "
              f"{b['tv_old']:9.2e} {b['tv_new']:9.2e}")
    print(f"{'student':8} {'divergence':22} {'full':>8} {'old':>8} {'rel.diff':>9} {'grad cos':>9} {'exact':>8} "
          f"{'rel.diff':>9} {'grad cos':>9}")
    for name, rows in results.items():
        for key, r in rows.items():
            cells = []
            for rule in ("old", "exact"):
                x = r[rule]
                rel = "n/a" if x["relative_difference"] is None else f"{x['relative_difference']:+.2%}"
                cells.append(f"{x['topk']:8.4f} {rel:>9} {x['gradient_cosine']:9.4f}")
            print(f"{name:8} {key:22} {r['full']:8.4f} {' '.join(cells)}")
    Path(args.out).write_text(json.dumps({
        "date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(), "k": args.k, "positions": int(t_logits.shape[0]),
        "seconds": round(time.time() - start, 1), "teacher_buckets": buckets, "results": results}, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
