"""kd's offline top-k KD training against TRL's GKDTrainer in off-policy mode, side by side in one run.

Both sides train the same tiny student (2 layers, 64 wide, the teacher's tokenizer; identical initial weights)
for one epoch over the same `data/sft` records, with the same batch size, learning rate, max_length and
objective (generalised JSD, β = 0.5, ce weight 0):

  kd    kd.distill.loop.train on the teacher's stored top-k log-probabilities (`data/sft_logits`): the
        teacher is not in memory; the loss folds the vocabulary into k + 1 buckets.
  trl   trl.experimental.gkd.GKDTrainer with lmbda = 0 (no student generation): the embedded teacher
        (bf16, as params.yaml runs it) scores every batch online over the full vocabulary.

Plus, measured separately, what kd paid once to elicit those logits for the same records (the teacher's
forward passes), so the first-epoch cost including elicitation is shown too, and the stored bytes/token.
Each side runs in its own subprocess so peak memory is its own: RSS is sampled every 5 ms during training
(CPU), or torch.cuda.max_memory_allocated on a GPU. Timing covers the training loop only (no imports or
model loading).

    python bench/kd_training.py            # about 1.5 minutes on 2 idle CPU cores (GKD's online teacher dominates)
    python bench/kd_training.py --quick    # 8 records, under a minute

Needs `data/sft` and `data/sft_logits` (`dvc repro sft_logits`). Writes bench/results/kd_training.json
(kd_training-quick.json with --quick).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

BATCH, MAX_LENGTH, LR, BETA = 4, 256, 3e-4, 0.5


class PeakMemory:
    """Peak resident memory (or CUDA allocation) above the level when the block starts."""

    def __init__(self, cuda: bool) -> None:
        self.cuda, self.peak, self.base = cuda, 0, 0
        self._stop = threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.rss())

    def __enter__(self) -> PeakMemory:
        import torch

        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = self.peak = self.rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        import torch

        if self.cuda:
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self.rss())


def records(work: Path) -> list[dict[str, Any]]:
    return json.loads((work / "records.json").read_text())


def student(work: Path, device: str) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(work / "student", dtype=torch.float32).to(device)
    return model, AutoTokenizer.from_pretrained(work / "student")


def side_kd(work: Path, device: str) -> dict[str, Any]:
    import torch

    from kd.config.students import Divergence, Training
    from kd.distill import loop
    from kd.runtime.logits import check_compatible, load_logits

    model, tok = student(work, device)
    store = load_logits(ROOT / "data" / "sft_logits")
    check_compatible(store, tok)
    examples = []
    for r in records(work):
        row = store.get(r["id"])
        end = min(len(row.input_ids), MAX_LENGTH)
        examples.append(loop.Example(row.input_ids[:end].tolist(), row.completion_start,
                                     (row.topk_ids, row.topk_logprobs, row.tail_logprob)))
    t = Training(epochs=1, lr=LR, batch_size=BATCH, max_length=MAX_LENGTH, seed=0, checkpoint_every=10_000)
    kd = Divergence(divergence="jsd", beta=BETA, temperature=1.0, ce_weight=0.0)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    with PeakMemory(device.startswith("cuda")) as mem:
        start = time.perf_counter()
        result = loop.train(model, examples, t, kd, None, pad, work / "ckpt", lambda m: None)
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "steps": result.steps, "tokens": sum(len(e.ids) for e in examples),
            "loss_first": result.history[0]["loss"], "loss_last": result.history[-1]["loss"],
            "mem_base": mem.base, "mem_peak": mem.peak, "torch_threads": torch.get_num_threads()}


def side_trl(work: Path, device: str) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    model, tok = student(work, device)
    teacher = AutoModelForCausalLM.from_pretrained(ROOT / "models" / "teacher", dtype=torch.bfloat16).to(device).eval()
    rows = [{"messages": r["prompt"] + r["completion"]} for r in records(work)]
    times: dict[str, float] = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, *a: Any, **k: Any) -> None:
            times["start"] = time.perf_counter()

        def on_train_end(self, *a: Any, **k: Any) -> None:
            times["end"] = time.perf_counter()

    args = GKDConfig(output_dir=str(work / "trl"), per_device_train_batch_size=BATCH, learning_rate=LR,
                     num_train_epochs=1, lr_scheduler_type="linear", warmup_steps=0.1, seed=0, data_seed=0,
                     logging_steps=1, save_strategy="no", report_to="none", use_cpu=device == "cpu", bf16=False,
                     max_length=MAX_LENGTH, lmbda=0.0, beta=BETA, temperature=1.0, seq_kd=False,
                     disable_dropout=True, dataloader_num_workers=0, gradient_checkpointing=False,
                     max_grad_norm=1.0)
    trainer = GKDTrainer(model=model, teacher_model=teacher, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tok, callbacks=[Clock()])
    tokens = sum(int(b["attention_mask"].sum()) for b in trainer.get_train_dataloader())
    with PeakMemory(device.startswith("cuda")) as mem:
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"seconds": times["end"] - times["start"], "steps": trainer.state.global_step, "tokens": tokens,
            "loss_first": losses[0], "loss_last": losses[-1], "mem_base": mem.base, "mem_peak": mem.peak,
            "torch_threads": torch.get_num_threads()}


def side_elicit(work: Path, device: str) -> dict[str, Any]:
    """What the feature stage pays once for these records: teacher forward + top-k, as `stages/feature.py` runs it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kd.elicit.feature import Item, score_batch
    from kd.runtime.tokenize import encode

    tok = AutoTokenizer.from_pretrained(ROOT / "models" / "teacher")
    teacher = AutoModelForCausalLM.from_pretrained(ROOT / "models" / "teacher", dtype=torch.bfloat16).to(device).eval()
    items = sorted((Item(r, *encode(tok, r, MAX_LENGTH), "") for r in records(work)), key=lambda it: len(it.ids))
    start = time.perf_counter()
    for i in range(0, len(items), 8):  # params.yaml's sft_logits batch_size
        score_batch(teacher, items[i:i + 8], tok.pad_token_id, 20)
    return {"seconds": time.perf_counter() - start, "tokens": sum(len(it.ids) for it in items)}


def prepare(work: Path, n: int) -> None:
    """The shared student (saved once: both sides start from identical weights) and the records both train on."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from kd.records import read_dataset
    from kd.runtime.logits import load_logits

    store = load_logits(ROOT / "data" / "sft_logits")
    _, rows = read_dataset(ROOT / "data" / "sft")
    rows = [r for r in rows if r["id"] in store][:n]
    (work / "records.json").write_text(json.dumps(rows))
    tok = AutoTokenizer.from_pretrained(ROOT / "models" / "teacher")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(work / "student")
    tok.save_pretrained(work / "student")


def child(side: str, work: Path, device: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, "--side", side, "--work", str(work), "--device", device],
                         capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        sys.exit(f"bench: the {side} side failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 records instead of 24")
    parser.add_argument("--side", choices=["kd", "trl", "elicit"], help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    args = parser.parse_args()
    if args.side:
        fn = {"kd": side_kd, "trl": side_trl, "elicit": side_elicit}[args.side]
        print(json.dumps(fn(args.work, args.device)))
        return
    if not (ROOT / "data" / "sft_logits" / "manifest.json").exists():
        sys.exit("bench: data/sft_logits is missing; build it first (`python stages/feature.py sft_logits`)")
    n = 8 if args.quick else 24
    with tempfile.TemporaryDirectory(prefix="kd-bench-") as tmp:
        work = Path(tmp)
        prepare(work, n)
        kd, trl, elicit = child("kd", work, args.device), child("trl", work, args.device), child("elicit", work, args.device)
    manifest = json.loads((ROOT / "data" / "sft_logits" / "manifest.json").read_text())
    mb = 1 / 2**20
    for r in (kd, trl):
        r["tokens_per_s"] = r["tokens"] / r["seconds"]
        r["peak_mb"], r["delta_mb"] = r["mem_peak"] * mb, (r["mem_peak"] - r["mem_base"]) * mb
    kd["first_epoch_tokens_per_s"] = kd["tokens"] / (kd["seconds"] + elicit["seconds"])
    results = {
        "date": datetime.date.today().isoformat(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
        "device": args.device, "python": platform.python_version(), "versions": _versions(),
        "setup": {"records": n, "batch_size": BATCH, "max_length": MAX_LENGTH, "lr": LR, "epochs": 1,
                  "objective": f"jsd beta={BETA}, ce_weight 0", "student": "llama 2 layers x 64, vocab 49152",
                  "teacher": "models/teacher (SmolLM2-135M-Instruct, bf16)", "top_k": manifest["top_k"]},
        "kd": kd, "trl_gkd_offpolicy": trl, "kd_elicitation": elicit,
        "ratios": {"speed_kd_over_trl": kd["tokens_per_s"] / trl["tokens_per_s"],
                   "speed_first_epoch_incl_elicitation": kd["first_epoch_tokens_per_s"] / trl["tokens_per_s"],
                   "peak_memory_trl_over_kd": trl["mem_peak"] / kd["mem_peak"],
                   "training_memory_delta_trl_over_kd": (trl["mem_peak"] - trl["mem_base"])
                   / max(kd["mem_peak"] - kd["mem_base"], 1)},
        "stored_logits": {"bytes_per_completion_token": manifest["bytes_per_token"],
                          "full_vocab_fp16_bytes_per_token": 49152 * 2},
    }
    _print(results)
    out = ROOT / "bench" / "results" / f"kd_training{'-quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


def _print(r: dict[str, Any]) -> None:
    kd, trl, ra = r["kd"], r["trl_gkd_offpolicy"], r["ratios"]
    mem = "peak CUDA MB" if r["device"].startswith("cuda") else "peak RSS MB"
    rows = [
        ("training tokens/s", f"{kd['tokens_per_s']:.0f}", f"{trl['tokens_per_s']:.0f}",
         f"{ra['speed_kd_over_trl']:.2f}x faster"),
        ("  incl. kd's one-off elicitation", f"{kd['first_epoch_tokens_per_s']:.0f}", "",
         f"{ra['speed_first_epoch_incl_elicitation']:.2f}x"),
        ("training seconds (1 epoch)", f"{kd['seconds']:.1f}", f"{trl['seconds']:.1f}", ""),
        (mem, f"{kd['peak_mb']:.0f}", f"{trl['peak_mb']:.0f}", f"{ra['peak_memory_trl_over_kd']:.2f}x less"),
        ("  growth during training MB", f"{kd['delta_mb']:.0f}", f"{trl['delta_mb']:.0f}",
         f"{ra['training_memory_delta_trl_over_kd']:.2f}x less"),
        ("loss first -> last", f"{kd['loss_first']:.3f} -> {kd['loss_last']:.3f}",
         f"{trl['loss_first']:.3f} -> {trl['loss_last']:.3f}", ""),
        ("stored teacher logits B/token", f"{r['stored_logits']['bytes_per_completion_token']:.1f}",
         "(online teacher)", f"vs {r['stored_logits']['full_vocab_fp16_bytes_per_token']} full fp16"),
    ]
    s = r["setup"]
    print(f"KD training, {s['records']} records x 1 epoch, batch {s['batch_size']}, max_length {s['max_length']}, "
          f"{s['objective']}, {r['device']} ({r['cpu_count']} cores)")
    print(f"{'':34} {'kd (top-k, offline)':>20} {'TRL GKD (lmbda=0)':>20}  ratio")
    for name, a, b, c in rows:
        print(f"{name:34} {a:>20} {b:>20}  {c}")


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    return {p: md.version(p) for p in ("torch", "transformers", "trl")}


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    main()
