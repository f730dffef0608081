"""The one Jinja environment: sandboxed, strict, and hashed (DESIGN.md §6).

A template is a file under the project root with a `user` block and an optional `system` block; each
block renders to one chat message. Its header comment declares the variables it reads:

    {# Answer an instruction.
       vars: instruction, category #}

Seed text and teacher outputs only ever enter as variable values, so `{{ ... }}` inside them is printed
literally and never rendered a second time.

The sandbox also keeps a template to the project and to a bounded, reproducible output: it loads only `.jinja`
files whose real path lies inside the project directory (no `..`, absolute path or symlink out of it; that also
keeps `.env` and params.yaml out), it has no `lipsum` (random text), an expression that prints a function or an
object (whose text holds a memory address) is an error, and no rendered message, string operation or width may
exceed MAX_TEXT characters.
"""

from __future__ import annotations

import functools
import hashlib
import math
import operator
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import meta
from jinja2.compiler import CodeGenerator
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from kd.errors import KdError

BLOCKS = ("system", "user")
MAX_TEXT = 8_000_000  # characters in one rendered message: ≈2M tokens, past every context window, so a long row
# (1 MB for a long-context teacher) renders and is judged by the teacher (`too_long`), not by the sandbox
_HEADER = re.compile(r"\A\s*\{#-?(.*?)-?#\}", re.DOTALL)
_VARS_LINE = re.compile(r"^\s*vars:\s*(.*)$", re.MULTILINE)


def _stable(value: Any) -> Any:
    """`finalize` of every `{{ }}`: only plain data prints; a function or an object prints its memory address,
    which would change the request (and its cache key) on every run."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, list | tuple):
        for v in value:
            _stable(v)
        return value
    if isinstance(value, dict):
        for k, v in value.items():
            _stable(k), _stable(v)
        return value
    raise SecurityError(f"prints a {type(value).__name__}, whose text is not the same from run to run")


_WIDTH = re.compile(r"\d{7,}")  # a width or precision of a million or more in a %- or {}-format string
_WIDTH_ARGS = ("center", "ljust", "rjust", "zfill", "expandtabs", "indent", "wordwrap", "truncate", "safe_range")


def _sized(value: Any, what: str) -> Any:
    """`value` if it is within MAX_TEXT characters or items; a `range` stands for a text about to be built."""
    if isinstance(value, str | list | tuple | dict | range) and len(value) > MAX_TEXT:
        raise SecurityError(f"{what} makes {len(value)} characters or items; the limit is {MAX_TEXT}")
    return value


def _precheck(name: str, args: tuple, kwargs: dict) -> None:
    """Refuse a call that would build a text past MAX_TEXT before it is built (a check after would be too late)."""
    values = [*args, *kwargs.values()]
    strs = [a for a in values if isinstance(a, str)]
    if name in _WIDTH_ARGS:
        for a in values:
            if isinstance(a, int) and not isinstance(a, bool) and abs(a) > MAX_TEXT:
                raise SecurityError(f"{name}: {a} exceeds the limit of {MAX_TEXT} characters")
    if name in ("format", "%") and any(_WIDTH.search(a) for a in strs):
        raise SecurityError(f"{name}: a format width over {MAX_TEXT} characters")
    if name == "replace" and len(strs) >= 3:
        text, old, new = strs[:3]
        grows = (text.count(old) if old else len(text) + 1) * max(len(new) - len(old), 0)
        _sized(range(len(text) + grows), name)
    if name == "join":
        items = next((a for a in values if isinstance(a, list | tuple)), [])
        _sized(range(sum(len(i) for i in items if isinstance(i, str)) + len(items) * sum(map(len, strs))), name)


def _guarded_filter(name: str, f: Any) -> Any:
    @functools.wraps(f)  # keeps Jinja's pass_context / pass_environment marks
    def run(*args: Any, **kwargs: Any) -> Any:
        _precheck(name, args, kwargs)
        return _sized(f(*args, **kwargs), name)
    return run


class _BoundedConcat(CodeGenerator):
    """Compiles `a ~ b` so that its result is size-checked: a doubling `~` loop stops at MAX_TEXT."""

    def visit_Concat(self, node: Any, frame: Any) -> None:
        self.write("environment.sized(")
        super().visit_Concat(node, frame)
        self.write(", '~')")


class Sandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox with every way to build text bounded by MAX_TEXT (Jinja bounds only `range`, to
    MAX_RANGE items): `'a' * 10**8`, `2 ** 10**8`, a doubling `~` or `+` loop, `x.center(10**9)`, a huge
    format width or `replace`/`join` fail at once instead of filling memory."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})
    code_generator_class = _BoundedConcat

    @staticmethod
    def sized(value: Any, what: str) -> Any:
        return _sized(value, what)

    def call_binop(self, context: Any, op: str, left: Any, right: Any) -> Any:
        if op == "*":
            _sized(range(_product_len(left, right)), "*")
        elif op == "**" and _power_digits(left, right) > MAX_TEXT:
            raise SecurityError(f"`**` would build a number of over {MAX_TEXT} digits")
        elif op == "%":
            _precheck("%", (left,), {})
        result = {"*": operator.mul, "**": operator.pow, "+": operator.add, "%": operator.mod}[op](left, right)
        return _sized(result, op)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        name = getattr(__obj, "__name__", "a call")
        bound = getattr(getattr(__obj, "__wrapped__", __obj), "__self__", None)  # "{:9}".format is wrapped by Jinja
        _precheck(name, (bound, *args) if isinstance(bound, str) else args, kwargs)
        return _sized(super().call(__context, __obj, *args, **kwargs), name)


def _product_len(a: Any, b: Any) -> int:
    for seq, n in ((a, b), (b, a)):
        if isinstance(seq, str | list | tuple) and isinstance(n, int):
            return len(seq) * max(n, 0)
    return 0


def _power_digits(a: Any, b: Any) -> int:
    if isinstance(a, int) and isinstance(b, int) and abs(a) > 1 and b > 0:
        return int(b * math.log10(abs(a))) + 1
    return 0


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
        finalize=_stable,
    )
    # kept: range (bounded by the sandbox), dict, namespace, cycler, joiner: plain data, same text every run
    del env.globals["lipsum"]
    env.filters = {name: _guarded_filter(name, f) for name, f in env.filters.items()}
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
            KdError: one line naming the template (and `where`): a missing variable, a sandbox violation, a message
                over MAX_TEXT characters, endless recursion.
        """
        at = f"{self.path}{f' ({where})' if where else ''}"
        missing = sorted(set(self.variables) - set(variables))
        if missing:
            raise KdError(f"{at}: no value given for declared variable(s) {', '.join(missing)}")
        ctx = self._template.new_context({k: variables[k] for k in self.variables})
        messages = []
        for block in BLOCKS:
            fn = self._template.blocks.get(block)
            if fn is None:
                continue
            try:
                text = _bounded(fn(ctx), at, block).strip()
            except SecurityError as e:
                raise KdError(f"{at}: blocked by the template sandbox: {e}") from None
            except jinja2.UndefinedError as e:
                raise KdError(f"{at}: {e.message}") from None
            except jinja2.TemplateError as e:
                raise KdError(f"{at}: template error while rendering: {e}") from None
            except RecursionError:
                raise KdError(f"{at}: the {block} block calls itself without end (self.{block}(), a macro or an "
                              f"include of itself)") from None
            if text:
                messages.append({"role": block, "content": text})
        return messages


def _bounded(pieces: Iterable[str], at: str, block: str) -> str:
    """The rendered text, stopped as soon as it passes MAX_TEXT characters (a loop can print without end)."""
    out, size = [], 0
    for piece in pieces:
        size += len(piece)
        if size > MAX_TEXT:
            raise KdError(f"{at}: the {block} message passes {MAX_TEXT} characters; a template renders a prompt, "
                          f"not a corpus")
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
