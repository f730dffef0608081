"""The environment a local model's numbers depend on, collected in one place and recorded once per output.

The same request to the same local teacher, or the same training run, gives other numbers under another
transformers version, another precision or another CPU kind (DESIGN.md §7: transformers 5.24 -> 5.25 made 43 -> 40
instructions on one machine; bf16 kernels differ between CPUs). None of that is in a record: records hold content,
so a dataset rebuilt from the request cache stays byte-identical anywhere. It is written once per dataset
manifest and per model (`kd_model.json`, card, MLflow tags), so `kd diff` and `kd status` can say why fresh numbers
differ. It is deliberately not part of a request key (docs/provenance.md, "The environment").

Cheap by design: versions come from package metadata (no import of torch), the CPU kind from /proc/cpuinfo,
and torch is imported only to name a GPU the run actually used.
"""

from __future__ import annotations

import functools
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from kd.runtime.device import cpu_flags

LIBRARIES = ("torch", "transformers", "tokenizers", "trl", "accelerate", "numpy")  # what shapes a local model's numbers
# the compute features that decide which kernels run, strongest first: the first one present names the CPU kind
_CPU_FEATURES = (("amx_bf16", "AMX"), ("avx512_bf16", "AVX-512-BF16"), ("avx512f", "AVX-512"), ("avx2", "AVX2"),
                 ("asimd", "NEON"))
# the facts of the machine and its libraries, comparable without knowing what a run will resolve (kd status)
MACHINE_KEYS = ("cpu", "gpu")


def libraries() -> dict[str, str | None]:
    """Installed version of each of LIBRARIES (None when not installed), read from package metadata."""
    out: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def cpu_kind() -> str:
    """The architecture and the strongest compute feature, e.g. "x86_64 AMX", "x86_64 AVX2"."""
    flags = cpu_flags()
    feature = next((label for flag, label in _CPU_FEATURES if flag in flags), None)
    return f"{platform.machine()} {feature}" if feature else platform.machine()


@functools.lru_cache(maxsize=1)
def cpu_model() -> str | None:
    """The CPU's model name as the kernel reports it (informative: the kind is what is compared)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return None


def collect(device: str | None = None, dtype: str | None = None) -> dict[str, Any]:
    """The environment of this process; `device` and `dtype` are what the run resolved (absent when it ran no
    local model). The GPU is named only when the device is one."""
    env: dict[str, Any] = {"libraries": libraries(), "cpu": cpu_kind(), "cpu_model": cpu_model()}
    if device is not None:
        env["device"] = device
    if dtype is not None:
        env["dtype"] = dtype
    if device is not None and device.startswith("cuda"):
        import torch

        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return env


def changes(old: dict[str, Any] | None, new: dict[str, Any] | None, machine_only: bool = False) -> list[str]:
    """What differs between two recorded environments, one phrase each ("transformers 5.24.0 -> 5.25.0",
    "dtype float32 -> bfloat16", "CPU x86_64 AVX2 -> x86_64 AMX"). Nothing when either was not recorded (outputs
    of older kd versions). `machine_only` leaves out device and dtype: what `kd status` can compare before a run
    resolves them."""
    if not old or not new:
        return []
    out = []
    lo, ln = old.get("libraries") or {}, new.get("libraries") or {}
    for name in [*LIBRARIES, *sorted((set(lo) | set(ln)) - set(LIBRARIES))]:
        if lo.get(name) != ln.get(name):
            out.append(f"{name} {lo.get(name) or '(none)'} -> {ln.get(name) or '(none)'}")
    for key, label in (("device", "device"), ("dtype", "dtype"), ("cpu", "CPU"), ("gpu", "GPU")):
        if machine_only and key not in MACHINE_KEYS:
            continue
        if old.get(key) != new.get(key) and not (machine_only and key == "gpu" and None in (old.get(key), new.get(key))):
            out.append(f"{label} {old.get(key) or '(none)'} -> {new.get(key) or '(none)'}")
    return out


def environment_lines(env: dict[str, Any] | None) -> list[str]:
    """Markdown bullets naming an environment, for model and dataset cards (none when it was not recorded)."""
    if not env:
        return []
    libs = ", ".join(f"{k} {v}" for k, v in (env.get("libraries") or {}).items() if v)
    where = ", ".join(f"{k} {env[k]}" for k in ("device", "dtype", "gpu") if env.get(k))
    cpu = f"CPU {env.get('cpu')}" + (f" ({env['cpu_model']})" if env.get("cpu_model") else "")
    return [f"- environment: {', '.join(x for x in (where, cpu) if x)}", f"- libraries: {libs}"]


def resolved(backends: list[Any]) -> tuple[str | None, str | None]:
    """(device, dtype) of the local models among a run's backends (LocalTeacher and the like: whatever has
    `device` and `dtype_name`), joined when several differ; (None, None) when none runs locally."""
    devices = sorted({str(b.device) for b in backends if hasattr(b, "device") and hasattr(b, "dtype_name")})
    dtypes = sorted({b.dtype_name for b in backends if hasattr(b, "device") and hasattr(b, "dtype_name")})
    return (", ".join(devices) or None, ", ".join(dtypes) or None)
