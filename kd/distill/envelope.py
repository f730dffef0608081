"""The training envelope: what a student's or a reward model's stage does around its objective.

    job = prepare(name, "students", cfg, params, root, datasets, logits)   # checkpoint dir, device, dtype, seed
    ...build the model, check everything a user can get wrong...
    run = job.start_run()                                                  # MLflow (continued after a kill)
    with run.failing():
        result = <the objective>(...)
    return job.finish(run, model, tok, result, ...)                        # model dir, metrics, plots, summary

Checkpoints live in `.kd/checkpoints/<name>/<hash>/`, the hash covering the params, the dataset (and logits)
fingerprints and the init weights, so a killed run is resumed only by a run that would have produced it.
Nothing is written to the stage's outs before the model is complete; checkpoints go once it is.
"""

from __future__ import annotations

import csv
import io
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from kd import tracking
from kd.config import Params, RewardModel, Student
from kd.distill import checkpoint, ranks
from kd.distill.loop import Result
from kd.errors import KdError
from kd.paths import DATA_DIR, METRICS_DIR, MODELS_DIR, PLOTS_DIR
from kd.records import atomic_write_text, ensure_writable, read_dataset, sha256_text, write_json
from kd.runtime.device import resolve_device, training_dtypes
from kd.runtime.environment import collect
from kd.runtime.init import init_digest
from kd.runtime.models import DatasetRef, MlflowRef, ModelInfo, save_model

PLOT_FIELDS = ("step", "loss", "kd", "ce", "hidden", "reward", "kl", "margin", "rank_acc", "lr", "tokens")
Section = Literal["students", "reward_models"]


def read_training_data(root: Path, names: list[str]) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Records of every dataset in order (a record listed twice is trained on once), and the datasets'
    {name, path, fingerprint} as MLflow and the model card name them."""
    records, seen, refs = [], set(), []
    for name in names:
        manifest, rows = read_dataset(root / DATA_DIR / name)
        refs.append({"name": name, "path": str(root / DATA_DIR / name), "fingerprint": manifest["fingerprint"]})
        for r in rows:
            if r["id"] not in seen:
                seen.add(r["id"])
                records.append(r)
    return records, refs


def subsample(records: list[dict[str, Any]], t: Any) -> list[dict[str, Any]]:
    """`training.subsample` of the records, drawn by `training.seed` (all when it is None or not smaller), in
    their order. A record is kept by the rank of sha256(seed, its id): the draw of one record does not depend on
    the others, so adding records to a dataset moves few of the drawn ones."""
    if t.subsample is None or t.subsample >= len(records):
        return records
    kept = set(sorted(range(len(records)), key=lambda i: sha256_text(f"{t.seed}:{records[i]['id']}"))[:t.subsample])
    return [r for i, r in enumerate(records) if i in kept]


def final_metrics(result: Result) -> dict[str, Any]:
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
    write_json(root / METRICS_DIR / f"{name}.json", metrics)
    buf = io.StringIO()
    fields = [f for f in PLOT_FIELDS if any(f in h for h in history)]
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for h in history:
        writer.writerow({k: (int(h[k]) if k in ("step", "tokens") else repr(float(h[k]))) for k in fields if k in h})
    atomic_write_text(root / PLOTS_DIR / f"{name}.csv", buf.getvalue())


@dataclass
class Job:
    """One training stage's run: where it checkpoints, where it runs, what it trains on."""

    name: str
    section: Section
    cfg: Student | RewardModel
    params: Params
    root: Path
    datasets: list[dict[str, str]]
    logits: dict[str, str] | None
    ckpt_dir: Path
    device: str
    dtype: Any  # of the trained parameters and optimizer state: float32 (kd.runtime.device.training_dtypes)
    autocast: Any  # the declared half precision the passes run in, or None
    start: float = field(default_factory=time.monotonic)

    @property
    def environment(self) -> dict[str, Any]:
        """What shapes the trained numbers besides params and data: libraries, device, precision, CPU/GPU kind."""
        return collect(str(self.device), str(self.declared).removeprefix("torch."))

    @property
    def declared(self) -> Any:
        """`training.dtype` as a torch dtype: the saved model's, and a frozen teacher's (nothing to optimise)."""
        return self.autocast or self.dtype

    def start_run(self) -> tracking.Run:
        """The MLflow run, continuing a killed run of the same checkpoint hash (its params are identical)."""
        kind = "student" if self.section == "students" else "reward_model"
        run = tracking.start_run(self.root, self.params.project, self.name,
                                 {kind: {"name": self.name, **self.cfg.model_dump(mode="json")}},
                                 self.datasets + ([self.logits] if self.logits else []),
                                 run_id=checkpoint.remembered_run(self.ckpt_dir),
                                 tags=tracking.environment_tags(self.environment))
        checkpoint.remember_run(self.ckpt_dir, run.run_id)
        return run

    def finish(self, run: tracking.Run, model: Any, tok: Any, result: Result, objective: str, detail: str,
               on: str = "", extra: dict[str, Any] | None = None, logged: dict[str, float] | None = None,
               held_out: list[str] | None = None) -> str:
        """Write the model directory, metrics and plots; end the run; drop the checkpoints; return the summary.

        Args:
            detail: the summary's last figure, e.g. "9380 tokens" or "held-out accuracy 0.69 on 162 pairs".
            on: what the steps ran on, e.g. " on 342 pairs".
            extra: more deterministic metrics for metrics/<name>.json and kd_model.json.
            logged: more figures for MLflow only.
        """
        seconds = time.monotonic() - self.start
        metrics = {**final_metrics(result), **(extra or {})}
        run.log_metrics({"train_seconds": seconds, **(logged or {})}, step=result.steps)
        info = ModelInfo(
            name=self.name, kind="student" if self.section == "students" else "reward_model",
            section=self.section, objective=objective, init=self.cfg.init.model_dump(mode="json"),
            datasets=[DatasetRef(name=d["name"], fingerprint=d["fingerprint"]) for d in self.datasets],
            logits=DatasetRef(name=self.logits["name"], fingerprint=self.logits["fingerprint"]) if self.logits else None,
            params=self.cfg.model_dump(mode="json"), git_commit=tracking.git_commit(self.root),
            mlflow=MlflowRef(run_id=run.run_id, tracking_uri=tracking.configured_uri(), experiment=self.params.project),
            metrics=metrics, held_out=held_out, world_size=ranks.world_size(), environment=self.environment)
        # Saved in the declared precision, rounded once from the float32 master weights.
        save_model(model.to("cpu", self.declared), tok, self.root / MODELS_DIR / self.name, info)
        write_outputs(self.root, self.name, metrics, result.history)
        with run.failing():  # an artifact store that refuses the model fails the stage, and the run with it
            version = self.log_model(run, info.git_commit)
        run.end()
        checkpoint.clear(self.ckpt_dir)
        h = result.history
        first, last = (h[0]["loss"], h[-1]["loss"]) if h else (float("nan"),) * 2
        resumed = f", resumed at step {result.resumed_from}" if result.resumed_from else ""
        return (f"{self.name}: {result.steps} steps{on}, loss {first:.2f} -> {last:.2f}, {detail} in {seconds:.0f} s"
                f"{resumed} (mlflow run {run.run_id[:6]}{version})")

    def log_model(self, run: tracking.Run, git: str) -> str:
        """The model directory as the run's artifacts and, if asked, a registered version; ", model v<n>" then."""
        t = self.params.tracking
        if not t.log_models:
            return ""
        source = run.log_model_dir(self.root / MODELS_DIR / self.name)
        if not t.register_models:
            return ""
        tags = tracking.model_version_tags(git, self.datasets + ([self.logits] if self.logits else []))
        return f", model v{run.register(self.name, source, tags)}"


def prepare(name: str, section: Section, cfg: Student | RewardModel, params: Params, root: Path,
            datasets: list[dict[str, str]], logits: dict[str, str] | None = None) -> Job:
    """The run's checkpoint directory (other runs' checkpoints of this model pruned), device, dtypes and seed.

    Raises:
        KdError: naming `<section>.<name>.datasets` when they hold no records to train on.
    """
    import torch

    ensure_writable(root / MODELS_DIR, root / METRICS_DIR, root / PLOTS_DIR)  # before training, not after it
    t = cfg.training
    digest = checkpoint.run_hash(cfg.model_dump(mode="json"), {d["name"]: d["fingerprint"] for d in datasets},
                                 logits["fingerprint"] if logits else None, init_digest(cfg.init, params, root))
    ckpt_dir = checkpoint.checkpoint_dir(root, name, digest)
    if ranks.is_main():  # under N processes only the main one writes
        checkpoint.prune_others(ckpt_dir)
    torch.manual_seed(t.seed)
    return Job(name, section, cfg, params, root, datasets, logits, ckpt_dir, ranks.device(resolve_device(t.device)),
               *training_dtypes(t.dtype))


def world_warning(section: Section, name: str, t: Any, world: int) -> str | None:
    """A line when the processes running differ from `training.processes` and so change the global batch
    (the optimiser then sees other steps than the params describe: not the run they reproduce)."""
    if world == t.processes:
        return None
    return (f"kd: warning: {section}.{name}.training.processes is {t.processes} but {world} processes run: global "
            f"batch {t.batch_size * t.grad_accum * world} examples, not the {t.batch_size * t.grad_accum * t.processes}"
            f" the params describe")


def no_records(section: Section, name: str, names: list[str]) -> KdError:
    return KdError(f"{section}.{name}.datasets: {', '.join(names)} hold no records")
