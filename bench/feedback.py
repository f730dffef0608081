"""kd's feedback/preference stack against the code a user would write, side by side in one process.

Speed is measured, not asserted (STYLE.md): every kd figure is printed next to a baseline run in the same
process, on the same inputs, alternating sides so that drift on a shared machine hits both.

  a. judge  the likelihood judge as the feedback stage runs it: `kd.runtime.judges.score_groups` through an
            Asker with a fresh RequestCache and `LoglikScorer` (length-sorted batches of 8, logits only from
            the earliest completion token on, one cache file per score), vs a per-candidate loop:
            `model(full ids).logits` -> log_softmax over the whole sequence -> mean over the completion
            tokens, one sequence at a time, and the same in batches of 8 in input order (no sorting).
            Embedded teacher, float32 on every side; the scores must agree within 1e-3.
  b. dpo    `kd.distill.students.train_student` with objective dpo (the whole student stage: params, data
            fingerprints, preflight, MLflow run, reference rebuilt from disk, TRL DPOTrainer, model dir,
            metrics and plots) vs bare TRL `DPOTrainer` on the same rows, model, reference and
            TrainingArguments; the per-step losses must agree.

    python bench/feedback.py            # about 5 minutes on 2 idle CPU cores (7-14 with other jobs on them)
    python bench/feedback.py --quick    # about 1-1.5 minutes idle: 6 prompts x 4 candidates, 2 DPO steps

Inputs: the 40 seed instructions rendered with prompts/labeling/explain.jinja (as `datasets.prefs` renders
them) and their 4 candidates from data/prefs (the 4-layer student's samples); the DPO init and reference
are models/student_sft. Writes bench/results/feedback.json (feedback-quick.json with --quick).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # kd, also when not installed
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# kd logs to MLflow at the project root unless this says otherwise; the benchmark's runs stay in its temp project
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("KD_TEST_STOP_AFTER_STEP", None)

TEMPLATE = "prompts/labeling/explain.jinja"
VARIABLES = ("instruction", "category")  # what kd.elicit.feedback passes to its template
SEEDS = "seeds/instructions.jsonl"
TEACHER = ROOT / "models/teacher"
STUDENT = ROOT / "models/student_sft"
PREFS = ROOT / "data/prefs"
JUDGE_BATCH, JUDGE_MAX_LENGTH = 8, 512  # params.yaml's datasets.prefs.judge
JUDGE_PART = 8  # prompts per interleaved part: 32 candidates, 4 of kd's batches
SCORE_TOLERANCE, LOSS_TOLERANCE = 1e-3, 1e-4


LOAD: list[float] = []  # the 1-minute load average after every timed run: a burst mid-run shows here


def timed(fn: Any, *args: Any) -> tuple[float, float, Any]:
    """(wall seconds, CPU seconds of this process, result)."""
    gc.collect()
    t, c = time.perf_counter(), time.process_time()
    out = fn(*args)
    seconds, cpu = time.perf_counter() - t, time.process_time() - c
    LOAD.append(os.getloadavg()[0])
    return seconds, cpu, out


def interleaved(sides: dict[str, Any], parts: list[Any], repeats: int) -> tuple[dict[str, dict[str, float]], dict]:
    """Run every side on every part `repeats` times, rotating which side goes first from one part (and repeat)
    to the next, and keep each side's fastest run of each part. Short parts, all sides back to back, so a burst
    of other work on a shared machine hits every side rather than one whole pass.

    Returns:
        ({side: {seconds, cpu_s}} summed over the parts' fastest runs, {side: [result of each part]}).
    """
    names = list(sides)
    best = {side: [(float("inf"), 0.0)] * len(parts) for side in names}
    results: dict[str, list[Any]] = {side: [None] * len(parts) for side in names}
    for rep in range(repeats):
        for i, part in enumerate(parts):
            turn = (rep + i) % len(names)
            line = []
            for side in names[turn:] + names[:turn]:
                seconds, cpu, out = timed(sides[side], part, f"{rep}-{i}")
                line.append(f"{side} {seconds:.2f} s")
                if seconds < best[side][i][0]:
                    best[side][i], results[side][i] = (seconds, cpu), out
            print(f"  repeat {rep + 1}/{repeats}, part {i + 1}/{len(parts)}: {', '.join(line)}", flush=True)
    totals = {side: {"seconds": sum(x[0] for x in b), "cpu_s": sum(x[1] for x in b)} for side, b in best.items()}
    return totals, results


def padded(lengths: list[int], batch: int) -> int:
    """Token positions a batch-wise forward computes: each batch is as wide as its longest row."""
    return sum(len(lengths[i:i + batch]) * max(lengths[i:i + batch]) for i in range(0, len(lengths), batch))


# -------------------------------------------------------------------------------------------- a. judge


def judge_groups(n: int) -> tuple[list[Any], bool, list[float]]:
    """The first n seed instructions as the feedback stage groups them, with data/prefs' candidates.

    Returns:
        (groups, whether every rendered prompt equals the one stored in data/prefs, the stored scores).
    """
    from kd.prompts import load_prompt
    from kd.records import read_dataset
    from kd.runtime.judges import Group

    prompt = load_prompt(ROOT, TEMPLATE, VARIABLES)
    seeds = [json.loads(line) for line in (ROOT / SEEDS).read_text().splitlines() if line.strip()]
    _, records = read_dataset(PREFS)
    by_instruction = {r["prompt"][-1]["content"]: r for r in records}
    groups, same, stored = [], True, []
    for s in [s for s in seeds if s["instruction"] in by_instruction][:n]:  # a seed the stage rejected has none
        messages = prompt.render(instruction=s["instruction"], category=s["category"])  # keep_system: true
        record = by_instruction[s["instruction"]]
        same &= messages == record["prompt"]
        groups.append(Group(s["instruction"], messages, [c["completion"][0]["content"] for c in record["candidates"]],
                            {"id": s["id"]}))
        stored += [c["score"] for c in record["candidates"]]
    return groups, same, stored


def bare_encode(tok: Any, prompt: list[dict], text: str) -> tuple[list[int], int]:
    """What a user writes: the prompt with the generation prompt, the whole conversation; completion = the rest."""
    start = len(tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)["input_ids"])
    full = tok.apply_chat_template(prompt + [{"role": "assistant", "content": text}], tokenize=True)["input_ids"]
    return list(full), start


def bare_scores(model: Any, tok: Any, groups: list[Any], batch: int) -> list[float]:
    """The baseline: full logits, log_softmax over every position, mean over completion tokens; `batch` rows
    at a time in input order (1: one sequence at a time, no padding)."""
    import torch

    rows = [bare_encode(tok, g.prompt, t) for g in groups for t in g.texts]
    out = []
    for i in range(0, len(rows), batch):
        chunk = rows[i:i + batch]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, (row, _) in enumerate(chunk):
            ids[r, :len(row)], mask[r, :len(row)] = torch.tensor(row), 1
        with torch.inference_mode():
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
        for r, (row, start) in enumerate(chunk):
            target = torch.tensor(row[start:])
            out.append(logp[r, start - 1:len(row) - 1].gather(-1, target[:, None]).mean().item())
    return out


def bench_judge(n_prompts: int, repeats: int, work: Path) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kd.cache.store import RequestCache
    from kd.config import LocalTeacher as LocalConfig
    from kd.runtime.ask import Asker
    from kd.runtime.judges import score_groups
    from kd.runtime.local import LocalTeacher
    from kd.runtime.scoring import LoglikScorer

    groups, prompts_match, stored = judge_groups(n_prompts)
    n = sum(len(g.texts) for g in groups)
    cfg = LocalConfig(backend="local", path=str(TEACHER), dtype="float32", device="cpu", batch_size=16)
    scorer = LoglikScorer(LocalTeacher("smollm2", cfg, ROOT), JUDGE_BATCH)

    def kd(part: list[Any], tag: str) -> list[float]:
        asker = Asker(scorer, RequestCache(work / f"judge-cache-{tag}"), "bench-judge")
        judged = score_groups(asker, "loglik", part, JUDGE_MAX_LENGTH)
        assert asker.cached == 0, asker.cached  # a fresh cache: every candidate is scored
        return [s for j in judged for s in j.scores]

    # Load each side once, outside the timings (kd's identity hashes the model directory once), and warm up.
    load_kd, _, _ = timed(kd, groups[:1], "warm")
    tok = AutoTokenizer.from_pretrained(TEACHER)
    load_bare, _, model = timed(lambda: AutoModelForCausalLM.from_pretrained(TEACHER, dtype=torch.float32,
                                                                             use_safetensors=True).eval())
    bare_scores(model, tok, groups[:1], JUDGE_BATCH)
    parts = [groups[i:i + JUDGE_PART] for i in range(0, len(groups), JUDGE_PART)]
    sides = {"kd": kd, "bare_one": lambda part, tag: bare_scores(model, tok, part, 1),
             "bare_batched": lambda part, tag: bare_scores(model, tok, part, JUDGE_BATCH)}
    best, per_part = interleaved(sides, parts, repeats)
    scores = {side: [s for p in ps for s in p] for side, ps in per_part.items()}
    for b in best.values():
        b["per_s"] = n / b["seconds"]

    rows = [[len(bare_encode(tok, g.prompt, t)[0]) for g in part for t in g.texts] for part in parts]
    tokens = sum(map(sum, rows))
    positions = {"kd": sum(padded(sorted(r), JUDGE_BATCH) for r in rows), "bare_one": tokens,
                 "bare_batched": sum(padded(r, JUDGE_BATCH) for r in rows),
                 "kd_one_pass": padded(sorted(x for r in rows for x in r), JUDGE_BATCH)}
    diff = {side: max(abs(a - b) for a, b in zip(scores["kd"], scores[side], strict=True))
            for side in ("bare_one", "bare_batched")}
    return {"prompts": len(groups), "candidates": n, "tokens": tokens, "batch_size": JUDGE_BATCH,
            "parts": len(parts), "prompts_per_part": JUDGE_PART, "dtype": "float32", "repeats": repeats,
            "load_s": {"kd": load_kd, "bare": load_bare}, **best,
            # forward positions incl. padding: kd sorts within each part; `kd_one_pass` is the stage's one sort
            "positions_incl_padding": positions,
            "tokens_per_s": {side: tokens / b["seconds"] for side, b in best.items()},
            "ratio_kd_bare_one": best["kd"]["per_s"] / best["bare_one"]["per_s"],
            "ratio_kd_bare_batched": best["kd"]["per_s"] / best["bare_batched"]["per_s"],
            "ratio_cpu_kd_bare_one": best["bare_one"]["cpu_s"] / best["kd"]["cpu_s"],
            "max_abs_diff": diff, "scores_agree": max(diff.values()) < SCORE_TOLERANCE,
            "prompts_match_data_prefs": prompts_match,
            # data/prefs was scored by the stage in bfloat16 (teachers.smollm2.dtype auto): for scale only
            "max_abs_diff_vs_stored_bf16": max(abs(a - b) for a, b in zip(scores["kd"], stored, strict=True))}


# ---------------------------------------------------------------------------------------------- b. dpo


def dpo_project(root: Path, steps: int) -> None:
    """A project holding what `students.student_dpo` reads, as `bench_dpo` with its training cut to `steps`,
    no warm-up (every step updates the weights, so the losses compared are not all ln 2) and no checkpoint
    inside the run. Models are symlinks; data/prefs, prompts and seeds are copies."""
    import yaml

    real = yaml.safe_load((ROOT / "params.yaml").read_text())
    (root / "models").mkdir(parents=True)
    for d in ("teacher", "student_sft"):
        (root / "models" / d).symlink_to(ROOT / "models" / d)
    for d in ("prompts", "seeds", "data/prefs"):
        shutil.copytree(ROOT / d, root / d)
    student = real["students"]["student_dpo"]
    training = {**student["training"], "max_steps": steps, "warmup_ratio": 0.0, "checkpoint_every": 10_000, "seed": 0}
    # every dataset and reward model, so that the cross-references params.yaml makes still resolve; only
    # data/prefs is read
    params = {"project": "kd-bench", "teachers": real["teachers"], "datasets": real["datasets"],
              "reward_models": real.get("reward_models") or {}, "students": {"bench_dpo": {**student, "training": training}}}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _clock(into: dict[str, Any]) -> Any:
    """A TrainerCallback that times trainer.train()'s loop and each step, and keeps the logged losses and
    token counts."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_train_begin(self, *a: Any, **k: Any) -> None:
            into["start"] = time.perf_counter()
            into["step_s"] = []

        def on_step_begin(self, *a: Any, **k: Any) -> None:
            into["step_start"] = time.perf_counter()

        def on_step_end(self, *a: Any, **k: Any) -> None:
            into["step_s"].append(time.perf_counter() - into["step_start"])

        def on_train_end(self, args: Any, state: Any, control: Any, **k: Any) -> None:
            into["train_s"] = time.perf_counter() - into["start"]
            logs = [h for h in state.log_history if "loss" in h]
            into.update(steps=state.global_step, losses=[h["loss"] for h in logs],
                        tokens=int(logs[-1].get("num_tokens", 0)) if logs else 0)

    return Clock()


def bench_dpo(steps: int, repeats: int, work: Path) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from kd import tracking
    from kd.config import load_params
    from kd.distill import rank, trl_runs
    from kd.distill.rank import preflight
    from kd.distill.students import train_student
    from kd.records import read_dataset

    project = work / "project"
    dpo_project(project, steps)
    params = load_params(project)
    cfg = params.students["bench_dpo"]
    t = cfg.training
    _, records = read_dataset(PREFS)
    rows = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in records]

    # kd's DPOTrainer is built inside kd.distill.rank; the benchmark adds the same clock to it at `run_trainer`. The
    # only code kd adds inside the loop is its callback, whose cost is MLflow's log_metrics: timed separately.
    clock: dict[str, Any] = {}
    run, log_metrics = rank.run_trainer, tracking.Run.log_metrics

    def clocked_run(trainer: Any, ckpt_dir: Path) -> Any:
        trainer.add_callback(_clock(clock))
        return run(trainer, ckpt_dir)

    def clocked_log(self: Any, metrics: dict[str, float], step: int) -> None:
        t = time.perf_counter()
        log_metrics(self, metrics, step)
        clock["mlflow_log_s"] = clock.get("mlflow_log_s", 0.0) + time.perf_counter() - t
        clock["mlflow_log_calls"] = clock.get("mlflow_log_calls", 0) + 1

    def kd(_: None, tag: str) -> dict[str, Any]:
        clock.clear()
        line = train_student("bench_dpo", project)
        return {**clock, "line": line}

    def bare_args() -> Any:
        """The TrainingArguments a user writes for this run, spelled out (checked equal to kd's below). TRL's
        DPOConfig defaults to bf16 autocast and gradient checkpointing; kd turns both off, so does this."""
        return DPOConfig(output_dir=str(work / "bare-out"), per_device_train_batch_size=t.batch_size,
                         learning_rate=t.lr, num_train_epochs=t.epochs, max_steps=steps, lr_scheduler_type="linear",
                         warmup_steps=t.warmup_ratio, weight_decay=t.weight_decay, seed=t.seed, data_seed=t.seed,
                         logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, bf16=False,
                         gradient_checkpointing=False, max_length=t.max_length, dataloader_num_workers=0,
                         beta=cfg.rank.beta, loss_type=[cfg.rank.loss_type])

    def bare_trainer(out: dict[str, Any]) -> tuple[Any, Any, Any]:
        tok = AutoTokenizer.from_pretrained(STUDENT)
        model = AutoModelForCausalLM.from_pretrained(STUDENT, dtype=torch.float32, use_safetensors=True)
        ref = AutoModelForCausalLM.from_pretrained(STUDENT, dtype=torch.float32, use_safetensors=True)
        return DPOTrainer(model=model, ref_model=ref, args=bare_args(), train_dataset=Dataset.from_list(rows),
                          processing_class=tok, callbacks=[_clock(out)]), model, tok

    def bare(_: None, tag: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        trainer, model, tok = bare_trainer(out)
        trainer.train()
        model.save_pretrained(work / "bare-model")
        tok.save_pretrained(work / "bare-model")
        return out

    kept = len(preflight("bench_dpo", cfg, AutoTokenizer.from_pretrained(STUDENT), records))
    kd_args = DPOConfig(**trl_runs.trainer_args(t, work / "kd-args", "cpu"), beta=cfg.rank.beta,
                        loss_type=[cfg.rank.loss_type]).to_dict()
    own = bare_args().to_dict()
    expected = {"output_dir", "save_strategy", "save_steps", "save_total_limit", "logging_dir"}
    args_differ = sorted(k for k in kd_args if k not in expected and kd_args[k] != own.get(k))

    def warm_up() -> None:
        """Untimed one-off costs a project pays once, not per run: importing mlflow and creating its database,
        the digest memo of the init directory, and building a DPOTrainer once (lazy imports, first allocations)."""
        from kd.runtime.models import directory_digest

        tracking.start_run(project, params.project, "warm-up", {"warm_up": True}, []).end()
        directory_digest(project / "models/student_sft")
        bare_trainer({})

    warm_s, _, _ = timed(warm_up)
    rank.run_trainer, tracking.Run.log_metrics = clocked_run, clocked_log
    try:
        best, per_part = interleaved({"kd": kd, "bare": bare}, [None], repeats)
    finally:
        rank.run_trainer, tracking.Run.log_metrics = run, log_metrics
    results = {side: r[0] for side, r in per_part.items()}
    k, b = results["kd"], results["bare"]
    n = min(len(k["losses"]), len(b["losses"]))
    loss_diff = max(abs(x - y) for x, y in zip(k["losses"][:n], b["losses"][:n], strict=True))
    side = {name: {"total_s": best[name]["seconds"], "total_cpu_s": best[name]["cpu_s"],
                   "train_s": r["train_s"], "steps": r["steps"], "tokens": r["tokens"], "losses": r["losses"],
                   "steps_per_s": r["steps"] / r["train_s"], "tokens_per_s": r["tokens"] / r["train_s"],
                   "step_s": r["step_s"], "median_step_s": statistics.median(r["step_s"])}
            for name, r in results.items()}
    return {"steps": steps, "records": len(rows), "kd_kept_pairs": kept, "batch_size": t.batch_size,
            "max_length": t.max_length, "lr": t.lr, "beta": cfg.rank.beta, "loss_type": cfg.rank.loss_type,
            "dtype": "float32", "repeats": repeats, "warm_up_s": warm_s, **side,
            "ratio_train_steps_per_s": side["kd"]["steps_per_s"] / side["bare"]["steps_per_s"],
            # per-step times, so one slow step on a shared machine does not decide the ratio
            "ratio_median_step": side["bare"]["median_step_s"] / side["kd"]["median_step_s"],
            "ratio_end_to_end": side["bare"]["total_s"] / side["kd"]["total_s"],
            # kd's own costs: outside trainer.train() (params, fingerprints, preflight, MLflow run start and end,
            # model card and metrics files) beyond what the baseline pays there, and MLflow logging (every step
            # inside the loop, plus train_seconds after it)
            "kd_overhead_outside_loop_s": (side["kd"]["total_s"] - side["kd"]["train_s"])
            - (side["bare"]["total_s"] - side["bare"]["train_s"]),
            "kd_mlflow_log_s": k.get("mlflow_log_s", 0.0), "kd_mlflow_log_calls": k.get("mlflow_log_calls", 0),
            "args_differ": args_differ, "same_step_count": k["steps"] == b["steps"] == steps,
            "max_abs_loss_diff": loss_diff,
            "losses_agree": n == steps and loss_diff < LOSS_TOLERANCE and kept == len(rows) and not args_differ,
            "kd_line": k["line"]}


# ---------------------------------------------------------------------------------------------- report


def inputs() -> dict[str, str]:
    """What the figures were measured on: the stages rebuild data/prefs and models/student_sft."""
    from kd.records import read_dataset
    from kd.runtime.models import directory_digest

    return {"data/prefs": read_dataset(PREFS)[0]["fingerprint"], "models/student_sft": directory_digest(STUDENT),
            "models/teacher": directory_digest(TEACHER)}


def versions() -> dict[str, str]:
    import importlib.metadata

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "trl", "datasets", "accelerate", "mlflow", "kd"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[pkg] = importlib.metadata.version(pkg)
    return out


def table(res: dict[str, Any]) -> str:
    j, d = res["judge"], res["dpo"]
    lines = [f"{'benchmark':<44} {'baseline':>10} {'kd':>10} {'kd/baseline':>12}"]
    name = f"judge {j['candidates']} cand., candidates/s"
    lines.append(f"{name:<44} {j['bare_one']['per_s']:>10.2f} {j['kd']['per_s']:>10.2f} "
                 f"{j['ratio_kd_bare_one']:>12.3f}")
    lines.append(f"{'  vs naive batches of 8 (input order)':<44} {j['bare_batched']['per_s']:>10.2f} "
                 f"{j['kd']['per_s']:>10.2f} {j['ratio_kd_bare_batched']:>12.3f}")
    lines.append(f"{'  CPU seconds (vs one at a time)':<44} {j['bare_one']['cpu_s']:>10.1f} {j['kd']['cpu_s']:>10.1f} "
                 f"{j['ratio_cpu_kd_bare_one']:>12.3f}")
    lines.append(f"{'dpo ' + str(d['steps']) + ' steps, train loop steps/s':<44} {d['bare']['steps_per_s']:>10.3f} "
                 f"{d['kd']['steps_per_s']:>10.3f} {d['ratio_train_steps_per_s']:>12.3f}")
    lines.append(f"{'  median step (s)':<44} {d['bare']['median_step_s']:>10.2f} {d['kd']['median_step_s']:>10.2f} "
                 f"{d['ratio_median_step']:>12.3f}")
    lines.append(f"{'  train loop tokens/s':<44} {d['bare']['tokens_per_s']:>10.0f} {d['kd']['tokens_per_s']:>10.0f} "
                 f"{d['kd']['tokens_per_s'] / d['bare']['tokens_per_s']:>12.3f}")
    lines.append(f"{'  kd: MLflow log_metrics in the loop (s/step)':<44} {'':>10} "
                 f"{d['kd_mlflow_log_s'] / max(d['kd_mlflow_log_calls'], 1):>10.3f}")
    lines.append(f"{'  kd: its own work outside the loop (s)':<44} {'':>10} {d['kd_overhead_outside_loop_s']:>10.2f}")
    lines.append(f"{'  end to end (s; kd: the whole student stage)':<44} {d['bare']['total_s']:>10.1f} "
                 f"{d['kd']['total_s']:>10.1f} {d['ratio_end_to_end']:>12.3f}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="about 1-1.5 min idle: 6 prompts x 4 candidates, 2 DPO steps")
    parser.add_argument("--repeats", type=int, help="judge: timed runs per side, best kept (default 2; 1 with --quick)")
    parser.add_argument("--dpo-repeats", type=int, default=1, help="dpo: timed runs per side, best kept (default 1: "
                        "one run is 6 steps of 10-20 s each on 2 cores)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for every side (default 2)")
    parser.add_argument("--out", type=Path, help="JSON results file (default bench/results/feedback[-quick].json)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    repeats = args.repeats or (1 if args.quick else 2)
    prompts, steps = (6, 2) if args.quick else (40, 6)
    start = time.perf_counter()
    res: dict[str, Any] = {"date": datetime.date.today().isoformat(), "cpu_count": os.cpu_count(),
                           "load_avg_start": os.getloadavg()[0], "quick": args.quick,
                           "torch_threads": torch.get_num_threads(), "versions": versions()}
    with tempfile.TemporaryDirectory(prefix="kd-bench-") as tmp:
        work = Path(tmp)
        cwd = os.getcwd()
        os.chdir(work)  # kd writes its digest memo under ./.kd: keep that out of the project
        try:
            print(f"a. likelihood judge: {prompts} prompts x 4 candidates, float32, {repeats} repeat(s)", flush=True)
            res["judge"] = bench_judge(prompts, repeats, work)
            print(f"b. dpo: {steps} steps of batch 8, {args.dpo_repeats} repeat(s)", flush=True)
            res["dpo"] = bench_dpo(steps, args.dpo_repeats, work)
            res["inputs"] = inputs()
        finally:
            os.chdir(cwd)
    res["run_s"] = time.perf_counter() - start
    res["load_avg_end"] = os.getloadavg()[0]
    res["load_avg_max"] = max([res["load_avg_start"], res["load_avg_end"], *LOAD])  # sampled after each timed run
    res["noisy"] = res["load_avg_max"] > (os.cpu_count() or 1)
    out = args.out or ROOT / "bench/results" / ("feedback-quick.json" if args.quick else "feedback.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2, sort_keys=True) + "\n")

    j, d = res["judge"], res["dpo"]
    print()
    print(table(res))
    print(f"\njudge scores agree (float32, < {SCORE_TOLERANCE}): {j['scores_agree']} (max |diff| "
          f"{max(j['max_abs_diff'].values()):.2e}); rendered prompts equal data/prefs': {j['prompts_match_data_prefs']}")
    print(f"dpo losses agree (< {LOSS_TOLERANCE}): {d['losses_agree']} (max |diff| {d['max_abs_loss_diff']:.2e}, "
          f"{d['kd_kept_pairs']}/{d['records']} pairs kept by kd, args differ: {d['args_differ'] or 'none'})")
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out} in {res['run_s']:.0f} s "
          f"(load average {res['load_avg_start']:.1f} -> {res['load_avg_end']:.1f}, at most {res['load_avg_max']:.1f}, "
          f"on {os.cpu_count()} CPUs)")
    if res["noisy"]:
        print("warning: other work shared the cores during the run; the timings above are not reliable (the "
              "correctness checks are). Rerun on a quiet machine.")
    return 0 if j["scores_agree"] and j["prompts_match_data_prefs"] and d["losses_agree"] else 1


if __name__ == "__main__":
    sys.exit(main())
