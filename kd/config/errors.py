"""Turn pydantic's validation errors into one line each that names the params.yaml key and what is allowed."""

from __future__ import annotations

import re
import types
import typing
from typing import Annotated, Any, Union

from pydantic import BaseModel, ValidationError

from kd.secrets import redact

TAGS = ("method", "backend", "kind")  # discriminator fields of the tagged unions in params.yaml
PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]+")  # a key part shown as it is; any other is quoted (ascii: one line, no escapes)


def key_path(parts: tuple | list) -> str:
    """`datasets.sft.sampling`, with a part that is not a plain word quoted: a hostile key (`sft;touch x`, a newline,
    a terminal escape) is shown as `datasets.'sft;touch x'`, on one line and without sending control characters."""
    return ".".join(str(p) if isinstance(p, int) or isinstance(p, str) and PLAIN_KEY.fullmatch(p) else ascii(p)
                    for p in parts)


def one_line(text: str) -> str:
    """`text` with every control character escaped (a message may quote a value the user typed)."""
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str] | None:
    """Field names of the model that an error location points into (for 'unknown key' messages)."""
    tp: Any = model
    for part in loc[:-1]:
        tp = _unwrap(tp, part)
        if tp is None:
            return None
    tp = _unwrap(tp, None)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return list(tp.model_fields)
    return None


def _unwrap(tp: Any, part: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin is Annotated:
        return _unwrap(typing.get_args(tp)[0], part)
    if origin in (Union, types.UnionType):
        members = [m for m in typing.get_args(tp) if m is not type(None)]
        for m in members:  # a tagged-union location names the tag, e.g. 'labeling'
            fields = getattr(m, "model_fields", {})
            for tag in TAGS:
                if tag in fields and part in typing.get_args(fields[tag].annotation):
                    return m
        return _unwrap(members[0], part) if len(members) == 1 else None
    if part is None:
        return tp
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        field = tp.model_fields.get(part)
        return field.annotation if field else None
    if origin is dict:
        return typing.get_args(tp)[1]
    if origin is list:
        return typing.get_args(tp)[0]
    return None


def _user_path(loc: tuple, data: Any) -> tuple[tuple, tuple]:
    """Drop the parts of a pydantic location that are union tags rather than keys of the user's file."""
    kept, node = [], data
    for part in loc:
        if isinstance(node, dict) and part in node or isinstance(node, list) and isinstance(part, int) and part < len(node):
            kept.append(part)
            node = node[part]
    return tuple(kept), loc


def format_errors(err: ValidationError, data: Any, model: type[BaseModel], source: str = "params.yaml") -> str:
    """One line per error: the file, the key path as the user wrote it, and what is allowed.

    Only pydantic's `msg` is shown, never its `input_value`, and each line is redacted (kd.secrets): a rejected
    value may be a key typed in the wrong place, and a message may quote it (a union tag, a custom validator).
    """
    lines = []
    for e in err.errors():
        path, loc = _user_path(tuple(e["loc"]), data)
        where = key_path(path) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(model, loc)
            msg = "unknown key" + (f"; allowed: {', '.join(allowed)}" if allowed else "")
        elif e["type"] == "missing":
            msg = "required key is missing"
        elif e["type"] in ("literal_error", "union_tag_invalid"):
            msg = msg.replace("Input should be", "must be")
        elif e["type"] == "finite_number":
            msg = "must be a finite number, not .inf or .nan"
        elif e["type"].endswith("_type") and isinstance(e.get("input"), str | bool):  # strict: nothing is coerced
            got = "a string (quoted in YAML?)" if isinstance(e["input"], str) else str(e["input"]).lower()
            msg = f"{msg.replace('Input should be', 'must be')}, not {got}"
        if "." in msg.split(":")[0] and msg.startswith(tuple(f"{key}." for key in model.model_fields)):
            lines.append(f"{source}: {msg}")  # cross-reference errors already carry their key path
        else:
            lines.append(f"{source}: {where}: {msg}")
    return "\n".join(dict.fromkeys(one_line(redact(line)) for line in lines))
