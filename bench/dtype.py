"""What `dtype: auto` buys on this machine: the embedded teacher in float32 and in bfloat16, side by side.

bf16 is native on CUDA and on CPUs with AMX or AVX-512 BF16; elsewhere PyTorch emulates it and it is several
times slower than float32 (DESIGN.md §7). This times a teacher forward pass (16 sequences of 128 tokens, full
logits) and a greedy generation (16 prompts, 32 new tokens) in both precisions, prints the ratio and what
`auto` resolves to here, and writes bench/results/dtype.json.

    python bench/dtype.py        # needs models/teacher (`dvc repro teacher`); ~2 minutes on an AVX2-only CPU
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kd.runtime.device import cpu_flags, resolve_dtype_name
from kd.runtime.local import generate_ids

ROOT = Path(__file__).resolve().parents[1]


def timed(fn) -> float:
    fn()  # warm-up: allocations, kernel selection
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    path = ROOT / "models/teacher"
    tok = AutoTokenizer.from_pretrained(path)
    prompts = [list(tok.apply_chat_template([{"role": "user", "content": f"Explain idea number {i} briefly."}],
                                            add_generation_prompt=True, tokenize=True)["input_ids"]) for i in range(16)]
    ids = torch.randint(0, 40000, (16, 128), generator=torch.Generator().manual_seed(0))
    rows = {}
    for dtype in ("float32", "bfloat16"):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
        with torch.inference_mode():
            forward = timed(lambda m=model: m(input_ids=ids))
        generate = timed(lambda m=model: generate_ids(m, tok, prompts, 32, "cpu"))
        rows[dtype] = {"forward_16x128_s": round(forward, 2), "generate_16x32_s": round(generate, 2)}
        print(f"{dtype:9} forward 16x128: {forward:6.2f} s   generate 16x32: {generate:6.2f} s", flush=True)
    ratio = {k: round(rows["bfloat16"][k] / rows["float32"][k], 2) for k in rows["float32"]}
    auto = resolve_dtype_name("auto", "cpu")
    bf16_flags = sorted(f for f in cpu_flags() if "bf16" in f)
    print(f"bfloat16 / float32 time: forward {ratio['forward_16x128_s']}x, generate {ratio['generate_16x32_s']}x; "
          f"`dtype: auto` resolves to {auto} here (CPU bf16 flags: {', '.join(bf16_flags) or 'none'})")
    out = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
           "torch_threads": torch.get_num_threads(), "cpu_bf16_flags": bf16_flags, "auto": auto, "times": rows,
           "bfloat16_over_float32": ratio}
    (ROOT / "bench/results/dtype.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
