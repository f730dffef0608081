"""Which process of a multi-process training run this is (`accelerate launch --num_processes N`), and the two
collectives kd's own loop needs.

`accelerate launch` (like torchrun) sets WORLD_SIZE, RANK and LOCAL_RANK. Without them the run is one process
and nothing here touches torch.distributed or accelerate, so a one-process build is exactly the loop it was.

Under N processes kd's loop does not wrap the model in DDP: its objectives call the base model and the LM head
separately (logits only where a completion token is predicted), which bypasses a DDP wrapper's forward. Each
process instead sums its own micro-batches' gradients and the step ends with one all-reduce (sum) of all
gradients (what DDP under `no_sync` does) before clipping and the identical optimiser step on every process.
"""

from __future__ import annotations

import os
from functools import cache
from typing import Any


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """Only the main process writes: checkpoints, the model directory, metrics, plots, MLflow."""
    return rank() == 0


def device(resolved: str) -> str:
    """This process's device: under N processes on CUDA, the GPU of its local rank."""
    if world_size() > 1 and resolved.startswith("cuda"):
        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return resolved


def start(cpu: bool) -> None:
    """Join the process group: gloo for a model on CPU, nccl on CUDA (accelerate picks CPU only when told)."""
    accelerator(cpu)


@cache
def accelerator(cpu: bool = False) -> Any:
    """The process group, set up by accelerate from the launcher's environment (the first call decides)."""
    from accelerate import Accelerator

    return Accelerator(cpu=cpu)


def sum_grads(params: list[Any]) -> None:
    """Replace every process's gradients by their sum over the processes (one flat all-reduce)."""
    import torch

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = accelerator().reduce(torch.cat([g.reshape(-1) for g in grads]), reduction="sum")
    offset = 0
    for p, g in zip(params, grads, strict=True):
        p.grad = flat[offset:offset + g.numel()].view_as(g).clone()
        offset += g.numel()


def sum_floats(values: list[float]) -> list[float]:
    """The sum over the processes of each value (every process gets the sums)."""
    import torch

    t = torch.tensor(values, dtype=torch.float64, device=accelerator().device)
    return accelerator().reduce(t, reduction="sum").tolist()


def barrier() -> None:
    if world_size() > 1:
        accelerator().wait_for_everyone()
