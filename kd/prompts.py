"""The one Jinja environment: sandboxed, strict, and hashed (DESIGN.md §6).

A template is a file under the project root with a `user` block and an optional `system` block; each
block renders to one chat message. Its header comment declares the variables it reads:

    {# Answer an instruction.
       vars: instruction, category #}

Seed text and teacher outputs only ever enter as variable values, so `{{ ... }}` inside them is printed
literally and never rendered a second time.

Templates stay in the project: only `.jinja` files whose real path lies inside the project directory load (no
`..`, absolute path or symlink out of it; that also keeps `.env` and params.yaml out). The sandbox itself
(kd.sandbox) bounds a render in time, memory and size and prints plain data only, so a prompt is reproducible.
Every failure is one line naming the template (and the row): the template's fault stops the stage; a row too
long for any prompt (TooLong) is rejected as that row's fault.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import meta
from jinja2.sandbox import SecurityError

from kd.errors import KdError
from kd.sandbox import MAX_TEXT, Sandbox, guarded_filter, stable, start_render
from kd.watchdog import Runaway, unwatch, watch

__all__ = ["MAX_TEXT", "BLOCKS", "Prompt", "TooLong", "declared_variables", "environment", "load_prompt",
           "read_template"]
BLOCKS = ("system", "user")
_HEADER = re.compile(r"\A\s*\{#-?(.*?)-?#\}", re.DOTALL)
_VARS_LINE = re.compile(r"^\s*vars:\s*(.*)$", re.MULTILINE)


def _within(root: Path, name: str) -> Path:
    """The file a template name means, refused unless it is a `.jinja` file inside the project (symlinks resolved)."""
    file = (root / name).resolve()
    if Path(name).is_absolute() or ".." in Path(name).parts or not file.is_relative_to(root):
        raise KdError(f"{name}: outside the project directory; templates and their includes must lie inside it")
    if file.suffix != ".jinja":
        raise KdError(f"{name}: not a .jinja file; only .jinja files are templates")
    if not file.is_file():
        raise KdError(f"{name}: template not found")
    return file


def read_template(root: Path, name: str) -> str:
    """A template's text, checked by `_within`, as UTF-8."""
    try:
        return _within(root, name).read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise KdError(f"{name}: not UTF-8 text (byte {e.start}); save the template as UTF-8") from None


def _load(root: Path, name: str) -> tuple[str, str, Any]:
    file = _within(root, name)
    mtime = file.stat().st_mtime_ns
    return read_template(root, name), str(file), lambda: file.is_file() and file.stat().st_mtime_ns == mtime


@functools.lru_cache(maxsize=8)
def environment(root: str) -> Sandbox:
    """The sandboxed environment for templates under `root` (the project directory)."""
    base = Path(root).resolve()
    env = Sandbox(
        loader=jinja2.FunctionLoader(functools.partial(_load, base)),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,  # an include ends its line like inline text would
        finalize=stable,
        optimized=False,  # constant folding would run `~` and attribute lookups past the sandbox's checks
    )
    # kept: range (bounded by the sandbox), dict, namespace, cycler, joiner; they print nothing themselves (a
    # cycler's or joiner's text is refused as not plain). Gone: `lipsum` and `|random`, a new text every run.
    del env.globals["lipsum"]
    env.filters = {name: guarded_filter(name, f) for name, f in env.filters.items() if name != "random"}
    return env


def declared_variables(source: str) -> tuple[str, ...] | None:
    """Variables listed on the `vars:` line of the template's header comment (None: no header)."""
    header = _HEADER.match(source)
    if not header:
        return None
    line = _VARS_LINE.search(header.group(1))
    if not line:
        return None
    return tuple(sorted(v.strip() for v in line.group(1).split(",") if v.strip()))


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

    def render(self, where: str = "", /, **variables: Any) -> list[dict[str, str]]:
        """Render to chat messages: [system?, user].

        Args:
            where: what is being rendered (e.g. `seeds/q.jsonl row 3`), named in any error after the template.

        Raises:
            TooLong: the row is at fault: its values make over a quarter of MAX_TEXT characters and the message
                passes MAX_TEXT, a size bound or the render budget (the stage rejects that record as `too_long`).
            KdError: one line naming the template (and `where`): a missing variable, a sandbox violation, a message
                over MAX_TEXT characters, a render past its time or memory budget (kd.watchdog), any other error.
        """
        at = f"{self.path}{f' ({where})' if where else ''}"
        missing = sorted(set(self.variables) - set(variables))
        if missing:
            raise KdError(f"{at}: no value given for declared variable(s) {', '.join(missing)}")
        ctx = self._template.new_context({k: variables[k] for k in self.variables})
        messages, w, block = [], None, ""
        try:
            start_render()
            w = watch()
            try:
                for block in BLOCKS:
                    fn = self._template.blocks.get(block)
                    if fn is not None and (text := _bounded(fn(ctx), block).strip()):
                        messages.append({"role": block, "content": text})
            finally:
                unwatch(w)
        except Runaway:
            spent = w[2] if w else "its budget"
            if _size(variables) > MAX_TEXT // 4:  # work on a row of millions of characters: the row's fault
                raise _too_long(at, self.path, variables, f"rendering the {block} message took over {spent}") from None
            raise KdError(f"{at}: stopped after {spent}: the template runs away (a loop, recursion or a value "
                          f"growing without end)") from None
        except (SecurityError, _Overflow) as e:
            if _size(variables) > MAX_TEXT // 4:  # a long row printed once or a few times: the row's fault
                raise _too_long(at, self.path, variables, f"the {block} message passes {MAX_TEXT} characters") \
                    from None
            why = _line(e) if isinstance(e, _Overflow) else f"blocked by the template sandbox: {_line(e)}"
            raise KdError(f"{at}: {why}") from None
        except jinja2.UndefinedError as e:
            raise KdError(f"{at}: {_line(e.message)}") from None
        except jinja2.TemplateError as e:
            raise KdError(f"{at}: template error while rendering: {_line(e)}") from None
        except RecursionError:
            raise KdError(f"{at}: the {block} block calls itself without end (self.{block}(), a macro or an include "
                          f"of itself)") from None
        except Exception as e:  # noqa: BLE001 - `{{ 1/0 }}`, `{{ 9**5000 }}` (too many digits to print) …
            raise KdError(f"{at}: template error while rendering: {type(e).__name__}: {_line(e)}") from None
        return messages


class _Overflow(Exception):  # noqa: N818
    """A message past MAX_TEXT characters (see `_bounded`)."""


class TooLong(KdError):
    """A row too long for any message: the row's fault, so the record is rejected (`too_long`), not the stage
    failed. `digest` stands for the request it could not become (sha256 of the template and the values)."""

    def __init__(self, message: str, digest: str) -> None:
        super().__init__(message)
        self.digest = digest


def _size(variables: dict[str, Any]) -> int:
    """Characters of the text a row passes (strings, and lists of them such as demos)."""
    return sum(len(v) if isinstance(v, str) else sum(len(x) for x in v if isinstance(x, str))
               if isinstance(v, list | tuple) else 0 for v in variables.values())


def _too_long(at: str, path: str, variables: dict[str, Any], why: str) -> TooLong:
    h = hashlib.sha256(f"kd too long\n{path}".encode())
    for k in sorted(variables):
        h.update(f"\n{k}={variables[k]!s}".encode("utf-8", "surrogatepass"))
    return TooLong(f"{at}: {why} with this row's {_size(variables)} characters; the row is rejected as too long",
                   h.hexdigest())


def _line(e: Any) -> str:
    """An error's text on one short line (it may quote the template's values)."""
    text = " ".join(str(e).split())
    return text if len(text) <= 300 else text[:300] + "…"


def _bounded(pieces: Iterable[str], block: str) -> str:
    """The rendered text, stopped as soon as it passes MAX_TEXT characters (a loop can print without end)."""
    out, size = [], 0
    for piece in pieces:
        size += len(piece)
        if size > MAX_TEXT:
            raise _Overflow(f"the {block} message passes {MAX_TEXT} characters; a template renders a prompt, not a "
                            f"corpus")
        out.append(piece)
    return "".join(out)


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
    source = read_template(Path(root), path)
    try:
        ast = env.parse(source, name=path)
        includes: dict[str, str] = {}
        todo = _referenced(env, path)
        while todo:
            name = todo.pop()
            if name in includes or name == path:
                continue
            try:
                includes[name] = hashlib.sha256(read_template(Path(root), name).encode("utf-8")).hexdigest()
            except KdError as e:
                raise KdError(f"{path}: includes {e}") from None
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
    return Prompt(path=path, sha256=hashlib.sha256(source.encode("utf-8")).hexdigest(), includes=includes,
                  variables=declared, _template=template)
