"""Resumable training: checkpoints outside the stage outs, keyed by what the run would produce.

DVC deletes a stage's outs before running it, so checkpoints live in `.kd/checkpoints/<student>/<hash>/`,
where the hash covers the student's params, the dataset and logits fingerprints and the init weights: a
checkpoint is resumed only by a run that would have produced it. Each checkpoint is a directory written to a
temporary sibling and renamed into place, so a kill mid-save leaves the previous one intact
(nanoGPT's habit of writing straight to the final path is what this avoids, STYLE.md §14).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from kd.paths import CHECKPOINTS_DIR
from kd.records import atomic_write_text, canonical_json, sha256_text

RUN_FILE = "run.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def run_hash(student: dict[str, Any], datasets: dict[str, str], logits: str | None, init: str | None) -> str:
    """First 16 hex digits of sha256 over (student params, dataset fingerprints, logits fingerprint, init)."""
    return sha256_text(canonical_json({"student": student, "datasets": datasets, "logits": logits,
                                       "init": init}))[:16]


def checkpoint_dir(root: Path, student: str, digest: str) -> Path:
    return root / CHECKPOINTS_DIR / student / digest


def prune_others(ckpt_dir: Path) -> None:
    """Drop the student's checkpoints of other params or data: they can never be resumed by this run, and a
    real student's checkpoint (weights + optimizer state) is hundreds of megabytes."""
    if ckpt_dir.parent.is_dir():
        for other in ckpt_dir.parent.iterdir():
            if other.is_dir() and other != ckpt_dir:
                shutil.rmtree(other, ignore_errors=True)


def latest(ckpt_dir: Path) -> Path | None:
    """The newest complete checkpoint (`step-N/` holding `state.pt`) of a run, or None."""
    if not ckpt_dir.is_dir():
        return None
    steps = [(int(m[1]), p) for p in ckpt_dir.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / "state.pt").is_file()]
    return max(steps)[1] if steps else None


def _rng_state() -> dict[str, Any]:
    import random

    import torch

    version, mt, gauss_next = random.getstate()
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": [version, list(mt), gauss_next]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import random

    import torch

    torch.set_rng_state(state["torch"])
    # Python's Mersenne state is (version, tuple of 625 ints, gauss_next): plain values load with weights_only.
    version, mt, gauss_next = state["python"]
    random.setstate((version, tuple(mt), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(ckpt_dir: Path, step: int, modules: dict[str, Any], optimizer: Any, scheduler: Any,
         history: list[dict[str, float]], extra: dict[str, Any] | None = None) -> Path:
    """Write `step-<step>/` atomically: each module as safetensors, optimizer/scheduler/RNG/history in state.pt.

    Older checkpoints of the run are removed once the new one is in place.
    """
    import torch
    from safetensors.torch import save_model

    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=ckpt_dir))
    try:
        for name, module in modules.items():
            save_model(module, str(tmp / f"{name}.safetensors"))  # handles tied weights (lm_head = embeddings)
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng": _rng_state(), "history": history, "extra": extra or {}}, tmp / "state.pt")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for p in ckpt_dir.iterdir():
        if p != final and (_STEP_DIR.match(p.name) or p.name.endswith(".tmp")):
            shutil.rmtree(p, ignore_errors=True)
    return final


def load(path: Path, modules: dict[str, Any], optimizer: Any, scheduler: Any) -> dict[str, Any]:
    """Restore a checkpoint written by `save` into live objects; return {"step", "history", "extra"}."""
    import torch
    from safetensors.torch import load_model

    for name, module in modules.items():
        load_model(module, str(path / f"{name}.safetensors"))
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    return {"step": state["step"], "history": state["history"], "extra": state["extra"]}


def remembered_run(ckpt_dir: Path) -> str | None:
    """The MLflow run id a killed run of the same hash was logging to (its params are identical)."""
    try:
        return json.loads((ckpt_dir / RUN_FILE).read_text())["run_id"]
    except (OSError, ValueError, KeyError):
        return None


def remember_run(ckpt_dir: Path, run_id: str) -> None:
    atomic_write_text(ckpt_dir / RUN_FILE, json.dumps({"run_id": run_id}) + "\n")


def clear(ckpt_dir: Path) -> None:
    """Drop a run's checkpoints once its model is written, and the student's folder when it is empty."""
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    with contextlib.suppress(OSError):  # other runs' checkpoints still there
        ckpt_dir.parent.rmdir()
