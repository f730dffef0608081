"""Where models run and in what precision: `device: auto` and `dtype: auto`, resolved in one place.

bf16 is only fast where the hardware computes it: CUDA GPUs, and CPUs with AMX or AVX-512 BF16. On a CPU
without them (an AMD EPYC with AVX2 only, say) PyTorch emulates bf16 and a teacher's forward pass is about 6x
slower than in float32 (DESIGN.md §7), so `auto` means bf16 only where it is native and float32 elsewhere.
The resolved dtype is part of a local teacher's identity: answers computed in another precision differ.

Training is mixed precision: `training.dtype` names the precision of the forward and backward passes, never
that of the weights being optimised (`training_dtypes`). AdamW on bf16 weights does not train: at lr 1e-5 an
update is below half a bf16 ulp of most weights and rounds away (2% of the weights moved in 20 steps).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

_CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags the kernel reports (empty where /proc/cpuinfo does not exist)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):  # x86 / Arm
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_bf16_native() -> bool:
    return any(f in cpu_flags() for f in _CPU_BF16_FLAGS)


def resolve_device(spec: str) -> str:
    """`auto` -> `cuda` when a GPU is visible, else `cpu`; any other value as given."""
    if spec != "auto":
        return spec
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype_name(spec: str, device: str) -> str:
    """`auto` -> `bfloat16` where the device computes it natively, else `float32`; other values as given."""
    if spec != "auto":
        return spec
    if device.startswith("cuda"):
        import torch

        return "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"
    if device == "cpu":
        return "bfloat16" if cpu_bf16_native() else "float32"
    return "float32"  # mps and others: float32 is supported everywhere


def training_dtypes(name: str) -> tuple[Any, Any]:
    """`training.dtype` -> (the dtype a trained model's parameters and optimizer state are kept in, the dtype
    its forward and backward run in under `torch.autocast`, or None for plain float32).

    The master weights are float32 whatever the declared precision; the model is saved in the declared one."""
    import torch

    return torch.float32, (None if name == "float32" else getattr(torch, name))


def resolve_dtype(spec: str, device: str) -> Any:
    """The torch dtype of `resolve_dtype_name`."""
    import torch

    return getattr(torch, resolve_dtype_name(spec, device))
