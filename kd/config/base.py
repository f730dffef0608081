"""What every params.yaml model shares: strictness, and file checks relative to the project root."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationInfo


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


def root_of(info: ValidationInfo) -> Path | None:
    return (info.context or {}).get("root")


def existing_file(value: str, info: ValidationInfo) -> str:
    root = root_of(info)
    if root is not None and not (root / value).is_file():
        raise ValueError(f"file not found: {value}")
    return value
