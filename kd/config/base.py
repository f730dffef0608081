"""What every params.yaml model shares: strictness, the rule for names, and file checks relative to the project root."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationInfo

# The one rule for every name params.yaml declares (teachers, datasets, students, reward models): a name becomes a
# directory (data/<name>, models/<name>), a DVC stage name, a word of a stage's command and a DVC params key
# (`datasets.<name>`), so it may hold nothing a shell, a path or a dotted key reads specially (`;`, `$`, `/`, `..`,
# `.`, spaces), nothing that differs only in case (two directories on Linux, one on macOS), and nothing outside ASCII.
NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")
NAME_RULE = "lower-case ASCII letters, digits and _, starting with a letter, at most 64 characters"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


def is_name(value: str) -> bool:
    """Whether `value` follows the rule for names (fullmatch: `$` would let a trailing newline through)."""
    return NAME.fullmatch(value) is not None


def _name(value: str) -> str:
    if not is_name(value):
        raise ValueError(f"not a name: use {NAME_RULE} (a name becomes a directory, a DVC stage and a command word)")
    return value


Name = Annotated[str, AfterValidator(_name)]  # a key of a named map in params.yaml


def root_of(info: ValidationInfo) -> Path | None:
    return (info.context or {}).get("root")


def existing_file(value: str, info: ValidationInfo) -> str:
    root = root_of(info)
    if root is not None and not (root / value).is_file():
        raise ValueError(f"file not found: {value}")
    return value
