"""docs/params.md, generated from the pydantic models: every key, its type, default, range and description.

The models are the one home of each key's documentation (STYLE.md §4, §16); `kd docs --write` regenerates the
page and a test fails when the committed page is stale.
"""

from __future__ import annotations

import json
import textwrap
import types
import typing
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from kd.config import STAGE_NAMES, Params
from kd.config.base import NAME, NAME_RULE
from kd.config.yamlfile import MAX_DEPTH, MAX_INT_DIGITS, MAX_VALUES

PARAMS_DOC = "docs/params.md"
HEADER = """\
# params.yaml reference

Generated from the pydantic models in `kd/config/` by `kd docs --write`; do not edit by hand (a test fails when
this page and the models disagree). Unknown keys are errors, and so are values out of range, values of another
type (nothing is coerced: `"1"` is not a number, `true` is not 1; an int is a float), `.inf` and `.nan`, and a key
written twice; every mistake is reported with its key path (`datasets.sft.sampling.temperature: ...`). Numbers
are read as YAML 1.2 reads them (and DVC): `3e-4` is a float.

A key's type links to the table of its section. `a | b` is a closed choice.
"""
LIMITS = textwrap.fill(
    f"Names (the keys of `teachers`, `datasets`, `students` and `reward_models`) are identifiers: {NAME_RULE} "
    f"(`{NAME.pattern}`), because a name becomes a directory, a DVC stage name, a word of a stage's command and a "
    f"params key. {', '.join(f'`{n}`' for n in STAGE_NAMES)} are stages of their own; a dataset, a student and a "
    f"reward model may not share a name. Anchors and aliases may share blocks (`<<: *train`), but a file whose values, "
    f"aliases expanded, number over {MAX_VALUES} or nest deeper than {MAX_DEPTH} levels is refused (an alias bomb), "
    f"and so is an integer of more than {MAX_INT_DIGITS} digits.", width=116) + "\n"


def _title(model: type[BaseModel]) -> str:
    return model.__name__


def _anchor(model: type[BaseModel]) -> str:
    return _title(model).lower()


def _members(tp: Any) -> list[Any]:
    origin = typing.get_origin(tp)
    if origin is Annotated:
        return _members(typing.get_args(tp)[0])
    if origin in (Union, types.UnionType):
        return [m for a in typing.get_args(tp) for m in _members(a)]
    return [tp]


def _type(tp: Any, found: list[type[BaseModel]]) -> str:
    """A type as a reader wants it: `float`, `forward_kl | jsd`, `list of str`, `[Sampling](#sampling)`."""
    origin = typing.get_origin(tp)
    if origin is Annotated:
        return _type(typing.get_args(tp)[0], found)
    if origin in (Union, types.UnionType):
        parts = [_type(a, found) for a in typing.get_args(tp) if a is not type(None)]
        nullable = type(None) in typing.get_args(tp)
        return " or ".join(parts) + (" or null" if nullable else "")
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type(typing.get_args(tp)[0], found)}"
    if origin is tuple:
        return f"[{', '.join(_type(a, found) for a in typing.get_args(tp))}]"
    if origin is dict:
        return f"map of name → {_type(typing.get_args(tp)[1], found)}"
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        if tp not in found:
            found.append(tp)
        return f"[{_title(tp)}](#{_anchor(tp)})"
    return getattr(tp, "__name__", str(tp))


def _range(metadata: list[Any], sized: str) -> str:
    words = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<", "min_length": "at least", "max_length": "at most"}
    out = []
    for m in metadata:
        for attr, word in words.items():
            if getattr(m, attr, None) is not None:
                out.append(f"{word} {getattr(m, attr)}" + (f" {sized}" if attr.endswith("length") else ""))
        if getattr(m, "pattern", None):
            out.append(f"matches `{m.pattern}`".replace("|", "\\|"))
    return ", ".join(out)


def _default(field: Any) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    return f"`{json.dumps(value, ensure_ascii=False)}`"


def _table(model: type[BaseModel], found: list[type[BaseModel]]) -> list[str]:
    doc = (model.__doc__ or "").strip()
    lines = [f"## {_title(model)}", ""]
    if doc and not doc.startswith(("Usage docs", "!!! abstract")):
        lines += [" ".join(doc.split()), ""]
    lines += ["| key | type | default | allowed | description |", "|---|---|---|---|---|"]
    for name, field in model.model_fields.items():
        desc = (field.description or "").replace("|", "\\|").replace("\n", " ")
        lines.append(f"| `{name}` | {_type(field.annotation, found)} | {_default(field)} | "
                     f"{_range(field.metadata, 'characters' if field.annotation is str else 'items')} | {desc} |")
    return lines + [""]


def params_reference() -> str:
    """The whole page: Params first, then every model it reaches, breadth first (a stable order)."""
    found: list[type[BaseModel]] = [Params]
    parts, done = [HEADER, LIMITS], 0
    while done < len(found):
        parts.append("\n".join(_table(found[done], found)))
        done += 1
    return "\n".join(parts).rstrip() + "\n"
