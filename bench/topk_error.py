"""How far is the stored top-k loss from the full-vocabulary loss, on the real teacher's logits?

kd's `kd` objective sees only the teacher's top-k log-probabilities and one tail bucket (kd.distill.losses). This
compares, at every completion position of the sft dataset's first records, the top-k divergence with the exact
full-vocabulary one computed from the teacher's complete logits, for students near the teacher and far from it:

- `near`: the teacher's own logits plus Gaussian noise (σ = 1): what a well-trained student looks like;
- `trained`: models/student_fkl, if it is built;
- `far`: the untrained 20-layer slice of the default recipe (the students' initialisation).

For each divergence and temperature it prints the mean full-vocabulary value, the top-k value, their relative
difference, and the cosine between the two losses' gradients with respect to the student's logits (1 = the
top-k loss pushes the student exactly where the full one would). Results go to bench/results/topk_error.json.

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
from kd.distill.losses import full_divergence, topk_divergence
from kd.records import read_dataset
from kd.runtime.init import init_student
from kd.runtime.models import load_teacher
from kd.runtime.tokenize import encode

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl")
TEMPERATURES = (1.0, 2.0)


def positions(model, seqs: list[tuple[list[int], int]]) -> torch.Tensor:
    """Logits [N, V] at every position that predicts a completion token."""
    out = []
    with torch.no_grad():
        for ids, start in seqs:
            logits = model(input_ids=torch.tensor([ids])).logits[0].float()
            out.append(logits[start - 1:len(ids) - 1])
    return torch.cat(out)


def compare(student: torch.Tensor, teacher: torch.Tensor, k: int) -> dict:
    logq = torch.log_softmax(teacher, -1)
    values, ids = logq.topk(k, -1)
    tail = torch.logsumexp(logq.scatter(-1, ids, float("-inf")), -1).clamp_min(-80.0)
    stored = (ids, values.half().float(), tail.half().float())  # as the feature stage stores them
    rows = {}
    for kind in KINDS:
        for t in TEMPERATURES:
            s_full = student.clone().requires_grad_(True)
            full = full_divergence(s_full, teacher, kind, beta=0.5, temperature=t)
            full.sum().backward()
            s_top = student.clone().requires_grad_(True)
            top = topk_divergence(s_top, *stored, kind, beta=0.5, temperature=t)
            top.sum().backward()
            cos = torch.nn.functional.cosine_similarity(s_full.grad.flatten(), s_top.grad.flatten(), dim=0).item()
            f, g = full.mean().item(), top.mean().item()
            rows[f"{kind}@T={t:g}"] = {"full": round(f, 4), "topk": round(g, 4),
                                       "relative_difference": round((g - f) / f, 4) if f else None,
                                       "gradient_cosine": round(cos, 4)}
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
    print(f"top-{args.k} vs full vocabulary ({t_logits.shape[1]} tokens) on {t_logits.shape[0]} completion positions "
          f"of {len(seqs)} sft records")
    print(f"{'student':8} {'divergence':22} {'full':>8} {'top-k':>8} {'rel.diff':>9} {'grad cos':>9}")
    for name, rows in results.items():
        for key, r in rows.items():
            rel = "n/a" if r["relative_difference"] is None else f"{r['relative_difference']:+.2%}"
            print(f"{name:8} {key:22} {r['full']:8.4f} {r['topk']:8.4f} {rel:>9} {r['gradient_cosine']:9.4f}")
    Path(args.out).write_text(json.dumps({
        "date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(), "k": args.k, "positions": int(t_logits.shape[0]),
        "seconds": round(time.time() - start, 1), "results": results}, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
