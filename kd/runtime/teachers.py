"""Teachers: one small interface over two backends.

A teacher has an `identity` (what the cache key and provenance record about it) and
`generate(items, on_result)`: it answers `(key, request)` pairs (an iterable: a streamed stage hands them
over as they are read back, so a server backend takes only as many as it has in flight) and calls `on_result(key, response)` as
each answer arrives, so the caller can persist it at once. A response is
`{"text": str, "finish_reason": "stop" | "length", "usage": {"prompt_tokens": int, "completion_tokens": int}}`,
plus, from a server, `served_by: {"endpoint", "model"}` (who answered; provenance, not part of any key).
A request that cannot be answered after the allowed attempts raises `TeacherError`.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

from kd.config import LocalTeacher as LocalConfig
from kd.config import OpenAITeacher as OpenAIConfig
from kd.runtime.batch import BatchTeacher
from kd.runtime.local import LocalTeacher
from kd.runtime.openai import OpenAITeacher
from kd.runtime.openai import identity as openai_identity

Response = dict[str, Any]
Item = tuple[str, dict[str, Any]]


class Teacher(Protocol):
    name: str

    @property
    def identity(self) -> dict[str, Any]: ...

    def generate(self, items: Iterable[Item], on_result: Any) -> None: ...


def make_teacher(name: str, cfg: LocalConfig | OpenAIConfig, root: Path) -> Teacher:
    """The backend named by `cfg.backend` (a closed choice)."""
    match cfg.backend:
        case "local":
            return LocalTeacher(name, cfg, root)
        case "openai" if cfg.mode == "batch":
            return BatchTeacher(name, cfg, root)
        case "openai":
            return OpenAITeacher(name, cfg)
    raise AssertionError(cfg.backend)


def teacher_identity(name: str, cfg: LocalConfig | OpenAIConfig, root: Path) -> dict[str, Any]:
    """A teacher's identity without loading its weights or reading its API key (for forecasts)."""
    match cfg.backend:
        case "local":
            return LocalTeacher(name, cfg, root).identity
        case "openai":
            return openai_identity(cfg)
    raise AssertionError(cfg.backend)
