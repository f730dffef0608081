"""The one Jinja environment: sandboxed, strict, and hashed (DESIGN.md §6).

A template is a file under the project root with a `user` block and an optional `system` block; each
block renders to one chat message. Its header comment declares the variables it reads:

    {# Answer an instruction.
       vars: instruction, category #}

Seed text and teacher outputs only ever enter as variable values, so `{{ ... }}` inside them is printed
literally and never rendered a second time.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import meta
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from kd.errors import KdError

BLOCKS = ("system", "user")
_HEADER = re.compile(r"\A\s*\{#-?(.*?)-?#\}", re.DOTALL)
_VARS_LINE = re.compile(r"^\s*vars:\s*(.*)$", re.MULTILINE)


@lru_cache(maxsize=8)
def environment(root: str) -> ImmutableSandboxedEnvironment:
    """The sandboxed environment for templates under `root` (the project directory)."""
    return ImmutableSandboxedEnvironment(
        loader=jinja2.FileSystemLoader(root),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,  # an include ends its line like inline text would
    )


def declared_variables(source: str) -> tuple[str, ...] | None:
    """Variables listed on the `vars:` line of the template's header comment (None: no header)."""
    header = _HEADER.match(source)
    if not header:
        return None
    line = _VARS_LINE.search(header.group(1))
    if not line:
        return None
    return tuple(sorted(v.strip() for v in line.group(1).split(",") if v.strip()))


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass(frozen=True)
class Prompt:
    """A loaded template: its path, hashes, declared variables and compiled blocks."""

    path: str
    sha256: str  # sha256sum of the file itself, so `sha256sum` on disk can check it
    includes: dict[str, str]  # every template it includes or imports, transitively -> sha256
    variables: tuple[str, ...]
    _template: jinja2.Template = field(repr=False, compare=False)

    @property
    def digest(self) -> str:
        """One hash over the file and everything it includes: changes when any of them changes."""
        parts = [f"{self.path}:{self.sha256}"] + [f"{p}:{h}" for p, h in sorted(self.includes.items())]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()

    def provenance(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "includes": dict(sorted(self.includes.items()))}

    def render(self, **variables: Any) -> list[dict[str, str]]:
        """Render to chat messages: [system?, user]."""
        missing = sorted(set(self.variables) - set(variables))
        if missing:
            raise KdError(f"{self.path}: no value given for declared variable(s) {', '.join(missing)}")
        ctx = self._template.new_context({k: variables[k] for k in self.variables})
        messages = []
        for block in BLOCKS:
            fn = self._template.blocks.get(block)
            if fn is None:
                continue
            try:
                text = "".join(fn(ctx)).strip()
            except SecurityError as e:
                raise KdError(f"{self.path}: blocked by the template sandbox: {e}") from None
            except jinja2.UndefinedError as e:
                raise KdError(f"{self.path}: {e.message}") from None
            except jinja2.TemplateError as e:
                raise KdError(f"{self.path}: template error while rendering: {e}") from None
            if text:
                messages.append({"role": block, "content": text})
        return messages


def _referenced(env: jinja2.Environment, name: str) -> list[str]:
    source = env.loader.get_source(env, name)[0]
    refs = list(meta.find_referenced_templates(env.parse(source)))
    if any(r is None for r in refs):
        raise KdError(f"{name}: includes a template chosen at render time; name included templates literally")
    return refs


def load_prompt(root: Path | str, path: str, provides: Iterable[str]) -> Prompt:
    """Load, check and hash a template.

    Args:
        root: the project directory; `path` and any include are relative to it.
        path: the template, e.g. `prompts/labeling/answer.jinja`.
        provides: the variables the calling method passes; the template may declare a subset.

    Raises:
        KdError: missing file, syntax error, unknown blocks, or variables that are undeclared or not
            provided by the method, each naming the template.
    """
    root = str(Path(root).resolve())
    env = environment(root)
    file = Path(root) / path
    if not file.is_file():
        raise KdError(f"template not found: {path}")
    source = file.read_text(encoding="utf-8")
    try:
        ast = env.parse(source, name=path)
        includes: dict[str, str] = {}
        todo = _referenced(env, path)
        while todo:
            name = todo.pop()
            if name in includes or name == path:
                continue
            if not (Path(root) / name).is_file():
                raise KdError(f"{path}: includes {name}, which does not exist")
            includes[name] = _sha256_file(Path(root) / name)
            todo.extend(_referenced(env, name))
        template = env.get_template(path)
    except jinja2.TemplateSyntaxError as e:
        raise KdError(f"{e.filename or path}:{e.lineno}: template syntax error: {e.message}") from None

    declared = declared_variables(source)
    if declared is None:
        raise KdError(f"{path}: the header comment must declare its variables, e.g. {{# vars: instruction #}}")
    used = meta.find_undeclared_variables(ast)
    for name in includes:
        used |= meta.find_undeclared_variables(env.parse(env.loader.get_source(env, name)[0]))
    if undeclared := sorted(used - set(declared)):
        raise KdError(f"{path}: uses {', '.join(undeclared)} but its header declares only: {', '.join(declared)}")
    provides = set(provides)
    if unknown := sorted(set(declared) - provides):
        raise KdError(f"{path}: declares {', '.join(unknown)}, which this method does not provide "
                      f"(it provides: {', '.join(sorted(provides))})")
    if "user" not in template.blocks:
        raise KdError(f"{path}: needs a {{% block user %}} (and optionally a {{% block system %}})")
    if extra := sorted(set(template.blocks) - set(BLOCKS)):
        raise KdError(f"{path}: unknown block(s) {', '.join(extra)}; allowed: {', '.join(BLOCKS)}")
    return Prompt(path=path, sha256=_sha256_file(file), includes=includes, variables=declared, _template=template)
