"""Train one student declared in params.yaml: init, objective, MLflow run, model dir, metrics, plots.

`train_student` is the whole student stage: it resolves the student's datasets (and logits) to their
fingerprints, resumes from a checkpoint of the same params and data if a run was killed, trains with the
declared objective, writes `models/<name>/` atomically and only then drops its checkpoints.
"""

from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kd.config import Params, Student, load_params
from kd.config.students import FromConfig, FromTeacher
from kd.distill import checkpoint, loop
from kd.errors import KdError
from kd.records import atomic_write_text, read_dataset

PLOT_FIELDS = ("step", "loss", "kd", "ce", "hidden", "reward", "kl", "margin", "rank_acc", "lr", "tokens")


@dataclass
class Data:
    """A student's training data, resolved: records, and what they are (names, paths, fingerprints)."""

    records: list[dict[str, Any]]
    datasets: list[dict[str, str]]  # [{name, path, fingerprint}]
    logits: dict[str, str] | None  # {name, path, fingerprint}


def student_config(params: Params, name: str) -> Student:
    if name not in params.students:
        raise KdError(f"params.yaml: students.{name}: not declared (declared: {', '.join(params.students) or 'none'})")
    return params.students[name]


def load_data(cfg: Student, root: Path) -> Data:
    """Records of every dataset in order (a record listed twice is trained on once), and the logits dataset."""
    records, seen, refs = [], set(), []
    for name in cfg.datasets:
        manifest, rows = read_dataset(root / "data" / name)
        refs.append({"name": name, "path": str(root / "data" / name), "fingerprint": manifest["fingerprint"]})
        for r in rows:
            if r["id"] not in seen:
                seen.add(r["id"])
                records.append(r)
    logits = None
    if cfg.logits:
        manifest, _ = read_dataset(root / "data" / cfg.logits)
        logits = {"name": cfg.logits, "path": str(root / "data" / cfg.logits), "fingerprint": manifest["fingerprint"]}
    return Data(records, refs, logits)


def dvc_stage(name: str, params: Params, root: Path = Path(".")) -> dict[str, Any]:
    """The dvc.yaml stage that builds `students.<name>`: exactly the code, data, models and keys it reads."""
    cfg = student_config(params, name)
    code = ["stages/student.py", "kd/distill/train.py", "kd/distill/student.py", "kd/distill/tokenize.py"]
    if cfg.objective == "kd" or cfg.hidden is not None:
        code += ["kd/distill/loop.py", "kd/distill/losses.py"]
    if cfg.objective == "on_policy" or (cfg.objective == "sft" and cfg.hidden is None):
        code += ["kd/distill/trl_runs.py"]
    if cfg.objective in ("dpo", "rrhf", "pro"):
        code += ["kd/distill/rank.py", "kd/distill/trl_runs.py", "kd/distill/preference.py"]
    if cfg.objective in ("grpo", "rloo"):
        code += ["kd/distill/rl.py", "kd/distill/trl_runs.py"]
    teachers = {x.teacher for x in (cfg.init, cfg.on_policy, cfg.hidden, cfg.rl)
                if x is not None and getattr(x, "teacher", None)}
    if cfg.logits:  # the stored logits are checked against this teacher's identity
        teachers.add(params.datasets[cfg.logits].teacher)
    teachers = sorted(teachers)
    models = [params.teachers[t].path for t in teachers]
    online = sorted({f"teachers.{x.teacher}.dtype" for x in (cfg.on_policy, cfg.hidden, cfg.rl)
                     if x is not None and getattr(x, "teacher", None)})
    if not teachers:  # from_pretrained: a local directory is a dep, a hub id is not
        models = [cfg.init.path] if (root / cfg.init.path).is_dir() else []
    data = [f"data/{d}" for d in [*cfg.datasets, *([cfg.logits] if cfg.logits else [])]]
    if cfg.rl is not None and cfg.rl.reward_model:
        data.append(f"models/{cfg.rl.reward_model}")
    return {
        "cmd": f"python stages/student.py {name}",
        "deps": code + data + sorted(set(models)),
        # Finer than `teachers.<t>`: a teacher's batch_size or device does not change this student.
        "params": [f"students.{name}", *(f"teachers.{t}.path" for t in teachers), *online],
        "outs": [f"models/{name}"],
        "metrics": [{f"metrics/{name}.json": {"cache": False}}],
        "plots": [{f"plots/{name}.csv": {"cache": False, "x": "step", "y": "loss"}}],
    }


def _init_digest(cfg: Student, params: Params, root: Path) -> str | None:
    """What the init weights come from, for the checkpoint hash (a rebuilt teacher must not resume)."""
    from kd.distill.student import teacher_path
    from kd.teachers.local import directory_digest

    if isinstance(cfg.init, FromTeacher | FromConfig):
        return directory_digest(teacher_path(params, cfg.init.teacher, root))
    path = Path(cfg.init.path) if Path(cfg.init.path).is_absolute() else root / cfg.init.path
    return directory_digest(path) if path.is_dir() else None


def reference_model(cfg: Student, params: Params, root: Path, name: str, dtype: Any = None) -> Any:
    """A frozen copy of the student's initialisation, built again from disk (never a copy of the model being
    trained, which would move with it): DPO's reference and the KL anchor of GRPO/RLOO."""
    from kd.distill.student import init_student

    model, _ = init_student(cfg.init, params, root, dtype=dtype, seed=cfg.training.seed,
                            key=f"students.{name}.init")
    model.eval().requires_grad_(False)
    return model


def _device(t: Any) -> str:
    from kd.device import resolve_device

    return resolve_device(t.device)


def _kd_examples(name: str, cfg: Student, data: Data, tok: Any, params: Params, root: Path) -> list[loop.Example]:
    """Examples carrying the stored teacher top-k, after checking the logits fit this student."""
    from kd.elicit.feature import check_compatible, load_logits
    from kd.teachers.local import LocalTeacher

    key = f"students.{name}.logits"
    store = load_logits(Path(data.logits["path"]))
    teacher = params.datasets[cfg.logits].teacher
    try:
        check_compatible(store, tok, LocalTeacher(teacher, params.teachers[teacher], root).identity)
    except KdError as e:
        raise KdError(f"{key}: {e}") from None
    from kd.records import read_jsonl

    # Records the feature stage could not score (no completion token within its max_length) are skipped
    # here too: the student would truncate them the same way. Any other missing record means the logits
    # were built from other data.
    unscored = {row.get("source_id") for row in read_jsonl(Path(data.logits["path"]) / "rejected.jsonl")}
    examples = []
    for r in data.records:
        if r["id"] in unscored:
            continue
        if r["id"] not in store:
            raise KdError(f"{key}: '{cfg.logits}' has no logits for record {r['id'][:12]} of this student's datasets; "
                          f"point the feature dataset at the same data (datasets.{cfg.logits}.dataset) and rebuild it")
        row = store.get(r["id"])
        end = min(len(row.input_ids), cfg.training.max_length)
        if row.completion_start >= end:
            continue  # no completion token within max_length
        examples.append(loop.Example(row.input_ids[:end].tolist(), row.completion_start,
                                     (row.topk_ids, row.topk_logprobs, row.tail_logprob)))
    return examples


def _sft_examples(data: Data, tok: Any, max_length: int) -> list[loop.Example]:
    from kd.distill.tokenize import encode

    out = []
    for r in data.records:
        ids, start = encode(tok, r, max_length)
        if start < len(ids):
            out.append(loop.Example(ids, start))
    return out


def _own_loop(name: str, cfg: Student, params: Params, root: Path, model: Any, examples: list[loop.Example],
              pad_id: int, ckpt_dir: Path, device: str, on_step: Any) -> loop.Result:
    from kd.distill.student import load_teacher

    hidden = None
    if cfg.hidden is not None:
        teacher, _ = load_teacher(params, cfg.hidden.teacher, root)
        hidden = loop.HiddenTerm(cfg.hidden, teacher.to(device), model, f"students.{name}.hidden")
    return loop.train(model, examples, cfg.training, cfg.kd if cfg.objective == "kd" else None, hidden, pad_id,
                      ckpt_dir, on_step)


def train_student(name: str, root: Path = Path(".")) -> str:
    """Build `models/<name>/`, `metrics/<name>.json`, `plots/<name>.csv`; return the summary line."""
    import torch

    from kd import tracking
    from kd.distill.student import init_student, load_teacher, save_model

    start = time.monotonic()
    params = load_params(root)
    cfg = student_config(params, name)
    t = cfg.training
    data = load_data(cfg, root)
    if not data.records:
        raise KdError(f"students.{name}.datasets: {', '.join(cfg.datasets)} hold no records")
    student_params = cfg.model_dump(mode="json")
    digest = checkpoint.run_hash(student_params, {d["name"]: d["fingerprint"] for d in data.datasets},
                                 data.logits["fingerprint"] if data.logits else None, _init_digest(cfg, params, root))
    ckpt_dir = checkpoint.checkpoint_dir(root, name, digest)
    checkpoint.prune_others(ckpt_dir)
    device = _device(t)
    dtype = getattr(torch, t.dtype)
    torch.manual_seed(t.seed)
    model, tok = init_student(cfg.init, params, root, dtype=dtype, seed=t.seed, key=f"students.{name}.init")
    model.to(device)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    # Everything a user can get wrong is checked before an MLflow run exists (no FAILED runs for typos).
    examples = None
    if cfg.objective == "kd":
        examples = _kd_examples(name, cfg, data, tok, params, root)
    elif cfg.objective == "sft" and cfg.hidden is not None:
        examples = _sft_examples(data, tok, t.max_length)
    elif cfg.objective in ("dpo", "rrhf", "pro"):
        from kd.distill import rank

        rank.preflight(name, cfg, tok, data.records)
    elif cfg.objective in ("grpo", "rloo"):
        from kd.distill.rl import preflight

        preflight(name, cfg, root, tok, data.records)
    if examples is not None and not examples:
        raise KdError(f"students.{name}: no record has a completion token within training.max_length ({t.max_length})")

    run = tracking.start_run(root, params.project, name, {"student": {"name": name, **student_params}},
                             data.datasets + ([data.logits] if data.logits else []),
                             run_id=checkpoint.remembered_run(ckpt_dir))
    checkpoint.remember_run(ckpt_dir, run.run_id)

    def on_step(metrics: dict[str, float]) -> None:
        run.log_metrics({k: v for k, v in metrics.items() if k != "step"}, step=int(metrics["step"]))

    with run.failing():
        match cfg.objective:
            case "kd":
                result = _own_loop(name, cfg, params, root, model, examples, pad_id, ckpt_dir, device, on_step)
            case "sft" if cfg.hidden is not None:
                # kd's loop runs the same completion-only cross-entropy: SFTTrainer has no hook for an extra loss.
                result = _own_loop(name, cfg, params, root, model, examples, pad_id, ckpt_dir, device, on_step)
            case "sft":
                from kd.distill.trl_runs import train_sft

                result = train_sft(model, tok, data.records, t, ckpt_dir, device, on_step)
            case "dpo" | "rrhf" | "pro":
                from kd.distill.rank import train_rank

                result = train_rank(name, cfg, params, root, model, tok, data.records, ckpt_dir, device, on_step)
            case "grpo" | "rloo":
                from kd.distill.rl import train_rl

                result = train_rl(name, cfg, params, root, model, tok, data.records, ckpt_dir, device, on_step)
            case "on_policy":
                from kd.distill.trl_runs import train_on_policy

                teacher, _ = load_teacher(params, cfg.on_policy.teacher, root, dtype=dtype)
                result = train_on_policy(model, tok, teacher.to(device), data.records, t, cfg.on_policy, ckpt_dir,
                                         device, on_step)
            case _:
                raise AssertionError(cfg.objective)
    seconds = time.monotonic() - start
    metrics = final_metrics(result)
    run.log_metrics({"train_seconds": seconds}, step=result.steps)
    info = {
        "name": name, "objective": cfg.objective, "init": cfg.init.model_dump(mode="json"),
        "datasets": [{"name": d["name"], "fingerprint": d["fingerprint"]} for d in data.datasets],
        "logits": {"name": data.logits["name"], "fingerprint": data.logits["fingerprint"]} if data.logits else None,
        "params": student_params, "git_commit": tracking.git_commit(root),
        "mlflow": {"run_id": run.run_id, "tracking_uri": tracking.configured_uri(), "experiment": params.project},
        # the same two facts flat, as `kd audit` reads them
        "mlflow_run_id": run.run_id, "mlflow_tracking_uri": tracking.configured_uri(),
        "metrics": metrics,
    }
    save_model(model.to("cpu"), tok, root / "models" / name, info)
    write_outputs(root, name, metrics, result.history)
    run.end()
    checkpoint.clear(ckpt_dir)
    first, last = (result.history[0]["loss"], result.history[-1]["loss"]) if result.history else (float("nan"),) * 2
    resumed = f", resumed at step {result.resumed_from}" if result.resumed_from else ""
    return (f"{name}: {result.steps} steps, loss {first:.2f} -> {last:.2f}, {_k(result.tokens)} tokens in "
            f"{seconds:.0f} s{resumed} (mlflow run {run.run_id[:6]})")


def _k(n: int) -> str:
    return f"{n / 1000:.0f}k" if n >= 10_000 else str(n)


def final_metrics(result: loop.Result) -> dict[str, Any]:
    """Deterministic numbers only (DVC locks metrics files): no times."""
    h = result.history
    tail = h[-min(5, len(h)):] if h else []
    return {
        "steps": result.steps,
        "tokens": result.tokens,
        "loss_first": round(h[0]["loss"], 6) if h else None,
        "loss_final": round(h[-1]["loss"], 6) if h else None,
        "loss_final_mean5": round(sum(x["loss"] for x in tail) / len(tail), 6) if tail else None,
    }


def write_outputs(root: Path, name: str, metrics: dict[str, Any], history: list[dict[str, float]]) -> None:
    """`metrics/<name>.json` (DVC metrics) and `plots/<name>.csv` (per-step loss, DVC plots)."""
    atomic_write_text(root / "metrics" / f"{name}.json", json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    buf = io.StringIO()
    fields = [f for f in PLOT_FIELDS if any(f in h for h in history)]
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for h in history:
        writer.writerow({k: (int(h[k]) if k in ("step", "tokens") else repr(float(h[k]))) for k in fields if k in h})
    atomic_write_text(root / "plots" / f"{name}.csv", buf.getvalue())
