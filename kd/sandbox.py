"""The template sandbox: Jinja's immutable sandbox bounded in time, memory and size, printing plain data only.

Jinja's sandbox keeps a template from reaching Python's internals; it does not keep it from running for hours or
filling memory (`{% set ns.x = ns.x * ns.x %}` forty times, a `recursive` loop, `['x' * 7000000] * 1000`), and
it prints whatever it is given, memory addresses included (`'' ~ joiner()`). Three bounds close that, none of them
a count of steps that a new trick could walk around:

- a real deadline and a real memory budget (kd.watchdog): past RENDER_SECONDS or RENDER_MEMORY more bytes, a
  watchdog thread stops the render at its next bytecode, whatever Python code runs (Jinja's or a filter's);
- a budget of text built: every string the sandbox sees built (an operator's, a call's, a filter's or `~`'s
  result) counts against MAX_BUILT characters per render. The watchdog alone is only as quick as the scheduler
  lets its thread run (on a loaded machine a loop appending 7 MB strings passed its 192 MB budget by 40 MB
  before it looked); this bound holds whatever the load;
- sizes checked before anything is built: one C-level operation cannot be interrupted, so each one that can
  build much more than its inputs (`*`, `**`, a format width, `replace`, `join`, `indent`, `str()` of a container
  …) is refused when what it would build passes MAX_TEXT characters, MAX_ITEMS elements or MAX_INT_BITS bits.
  Containers are counted as trees (a list holding itself twice counts twice), so no comparison, hash or `str()`
  walks an exponential structure;
- plain data only: every route from a value to text (`{{ }}`, `~`, `%`, `.format`, and every filter but those
  that only pass values along) refuses anything but None, str, numbers, bools and lists, tuples or dicts of them,
  since a function, a method or an object prints its memory address (a new request key every run).
"""

from __future__ import annotations

import functools
import math
import operator
import re
import threading
import types
from collections.abc import Mapping
from typing import Any

from jinja2 import nodes
from jinja2.compiler import CodeGenerator
from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedFormatter, SecurityError

MAX_TEXT = 8_000_000  # characters in one rendered message: ≈2M tokens, past every context window, so a long row
# (1 MB for a long-context teacher) renders and is judged by the teacher (`too_long`), not by the sandbox
MAX_ITEMS = 1_000_000  # elements of one container, counted as a tree: sorting or comparing it stays under 0.5 s
MAX_BUILT = 8 * MAX_TEXT  # characters built in one render, all strings together: ≤ 64 MB of ASCII, 256 MB at most
MAX_INT_BITS = 1 << 17  # ≈39k digits, far past the 4300 Python prints; multiplying two takes microseconds

PLAIN = (str, int, float, bool, type(None))
# filters that pass values along without printing them: any other filter gets plain data only
PASSING = frozenset({"attr", "batch", "count", "d", "default", "dictsort", "first", "groupby", "items", "last",
                     "length", "list", "map", "max", "min", "reject", "rejectattr", "reverse", "select", "selectattr",
                     "slice", "sort", "sum", "unique"})
_NUMBER = re.compile(r"\d+")
_PERCENT = re.compile(r"%(?:\((?P<key>[^)]*)\))?[#0\- +]*(?P<width>\*|\d+)?(?:\.(?P<prec>\*|\d+))?[hlL]?(?P<conv>.)",
                      re.DOTALL)


# --- sizes, checked before building -----------------------------------------------------------------------------

def refuse(what: str, why: str) -> SecurityError:
    return SecurityError(f"{what}: {why}")


def printed(value: Any, what: str, quoted: bool = False, budget: int = MAX_TEXT) -> int:
    """An upper bound of the characters `str(value)` (or json/repr: `quoted`) makes, refusing anything that is not
    plain data and stopping as soon as the bound passes `budget`, so a shared structure is never walked long."""
    total, todo = 0, [(value, quoted)]
    while todo:
        v, q = todo.pop()
        if isinstance(v, str):  # inside a container (or json) a character may print as up to 12 (`\ud83d\ude00`)
            total += (2 * len(v) + 2 if v.isascii() else 12 * len(v) + 2) if q else len(v)
        elif isinstance(v, bool) or v is None:
            total += 5
        elif isinstance(v, int):
            total += v.bit_length() * 3 // 10 + 2
        elif isinstance(v, float):
            total += 24
        elif isinstance(v, list | tuple):  # tuples include |groupby's named tuples
            total += 2 + 2 * len(v)
            todo.extend((x, True) for x in v)
        elif isinstance(v, dict):
            total += 2 + 4 * len(v)
            todo.extend((x, True) for kv in v.items() for x in kv)
        else:
            raise refuse(what, f"prints a {type(v).__name__}, whose text is not the same from run to run (only "
                               f"text, numbers and lists or dicts of them print)")
        if total > budget:
            raise refuse(what, f"would print over {MAX_TEXT} characters")
    return total


def _items(value: Any, what: str, budget: int = MAX_ITEMS) -> None:
    """Refuse a container of more than `budget` elements counted as a tree; each distinct container is counted once
    (by identity, memoised), so a list that holds itself twice forty times over costs forty steps, not 2**40."""
    counts: dict[int, int] = {}
    todo = [(value, False)]
    while todo:
        v, ready = todo.pop()
        if id(v) in counts:
            continue
        kids = [x for x in (v if isinstance(v, list | tuple) else (y for kv in v.items() for y in kv))
                if isinstance(x, list | tuple | dict)]
        if not ready and any(id(k) not in counts for k in kids):
            todo.append((v, True))
            todo.extend((k, False) for k in kids if id(k) not in counts)
            continue
        counts[id(v)] = n = len(v) + sum(counts[id(k)] for k in kids)
        if n > budget:
            raise refuse(what, f"builds over {MAX_ITEMS} elements (counting shared ones each time they occur)")


_built = threading.local()  # characters built by the render running in this thread (renders are per thread)


def start_render() -> None:
    """A render begins in this thread: its budget of text built (MAX_BUILT) starts full."""
    _built.chars = 0


def _count(n: int, what: str) -> None:
    _built.chars = getattr(_built, "chars", 0) + n
    if _built.chars > MAX_BUILT:
        raise refuse(what, f"the render has built over {MAX_BUILT} characters of text in all; a template renders a "
                           f"prompt, not a corpus")


def sized(value: Any, what: str) -> Any:
    """`value` if it is within the bounds (MAX_TEXT characters, MAX_ITEMS elements, MAX_INT_BITS bits, and the
    render's MAX_BUILT characters built in all)."""
    if isinstance(value, str | bytes):
        if len(value) > MAX_TEXT:
            raise refuse(what, f"makes {len(value)} characters; the limit is {MAX_TEXT}")
        _count(len(value), what)
    elif isinstance(value, int):
        if value.bit_length() > MAX_INT_BITS:
            raise refuse(what, f"makes a number of over {MAX_INT_BITS} bits")
    elif isinstance(value, list | tuple | dict):
        _items(value, what)
    elif isinstance(value, range) and len(value) > MAX_ITEMS:
        raise refuse(what, f"makes a range of {len(value)} items; the limit is {MAX_ITEMS}")
    return value


def _width(n: Any, what: str) -> None:
    if isinstance(n, int) and not isinstance(n, bool) and abs(n) > MAX_TEXT:
        raise refuse(what, f"a width or count of {n}; the limit is {MAX_TEXT}")


def percent(fmt: str, args: Any, what: str = "%") -> None:
    """Refuse `fmt % args` if it would print anything but plain data or pass MAX_TEXT characters."""
    values = list(args) if isinstance(args, tuple) else [args]
    total = len(fmt) + printed(args, what)
    i = 0
    for m in _PERCENT.finditer(fmt):
        if m["conv"] == "%":
            continue
        for part in (m["width"], m["prec"]):
            if part == "*":
                n = values[i] if i < len(values) else 0
                i += 1
            else:
                n = int(part) if part and len(part) < 12 else (MAX_TEXT + 1 if part else 0)
            _width(n, what)
            total += n if isinstance(n, int) else 0
        i += m["key"] is None or not isinstance(args, Mapping)
    if total > MAX_TEXT:
        raise refuse(what, f"would print over {MAX_TEXT} characters")


def _arg(args: tuple, kwargs: dict, i: int, name: str, default: Any) -> Any:
    return args[i] if len(args) > i else kwargs.get(name, default)


def _filter_check(name: str, args: tuple, kwargs: dict) -> tuple:
    """What a filter would build, checked before it runs; returns its arguments (a lazy `join` or `sum` input as a
    list, read once here). `args[0]` is the piped value (Jinja's context argument is not among them)."""
    if name not in PASSING and name != "join":
        quoted, budget = name in ("tojson", "pprint"), MAX_TEXT
        for v in (*args, *kwargs.values()):
            budget -= printed(v, f"|{name}", quoted, budget)
    if name in ("center", "indent", "wordwrap", "truncate", "batch", "slice"):
        for v in (*args[1:], *kwargs.values()):
            _width(v, f"|{name}")
    text = args[0] if args and isinstance(args[0], str) else ""
    grows = 0
    if name == "indent":  # every line gets the indent (a number of spaces or a string)
        w = _arg(args, kwargs, 1, "width", 4)
        grows = (text.count("\n") + 1) * (len(w) if isinstance(w, str) else max(w, 0) if isinstance(w, int) else 0)
    elif name == "wordwrap":  # every line break may become the wrap string
        width, wrap = _arg(args, kwargs, 1, "width", 79), _arg(args, kwargs, 3, "wrapstring", None)
        lines = len(text) // max(width, 1) + text.count("\n") + 1 if isinstance(width, int) else 0
        grows = lines * (len(wrap) if isinstance(wrap, str) else 1)
    elif name == "replace":
        _replace(text, _arg(args, kwargs, 1, "old", None), _arg(args, kwargs, 2, "new", None))
    elif name == "format":
        percent(text, tuple(args[1:]) or kwargs, "|format")
    elif name == "join":
        items = list(args[0]) if args else []  # a generator (`|map(...)`) is read once, here
        sep, attribute = _arg(args, kwargs, 1, "d", ""), _arg(args, kwargs, 2, "attribute", None)
        if attribute is None:
            budget = MAX_TEXT - len(items) * (len(sep) if isinstance(sep, str) else 0)
            for v in items:
                budget -= printed(v, "|join", budget=max(budget, 0))
        args = (items, *args[1:])
    elif name == "sum":  # `sum` adds lists too, each addition a copy: numbers only
        items = list(args[0]) if args else []
        if not all(isinstance(v, int | float) for v in items) or _arg(args, kwargs, 1, "attribute", None) is not None:
            raise refuse("|sum", "adds numbers only (for an attribute: |map(attribute='x')|sum)")
        args = (items, *args[1:])
    if len(text) + grows > MAX_TEXT:
        raise refuse(f"|{name}", f"would build over {MAX_TEXT} characters")
    return args


def _replace(text: Any, old: Any, new: Any) -> None:
    if isinstance(text, str) and isinstance(old, str) and isinstance(new, str):
        grows = (text.count(old) if old else len(text) + 1) * max(len(new) - len(old), 0)
        if len(text) + grows > MAX_TEXT:
            raise refuse("replace", f"would build over {MAX_TEXT} characters")


def guarded_filter(name: str, f: Any) -> Any:
    """A filter with its output bounded before it runs (see `_filter_check`) and checked after."""
    skip = 1 if getattr(f, "jinja_pass_arg", None) is not None else 0  # the context, eval context or environment

    @functools.wraps(f)  # keeps Jinja's pass_context / pass_environment marks
    def run(*args: Any, **kwargs: Any) -> Any:
        args = (*args[:skip], *_filter_check(name, args[skip:], kwargs))
        return sized(f(*args, **kwargs), f"|{name}")
    return run


def _method_check(obj: Any, name: str, args: tuple, kwargs: dict) -> None:
    """A method of a built-in value (str, bytes, int, list …): no size argument past MAX_TEXT, no growth past it."""
    for v in (*args, *kwargs.values()):
        _width(v, f".{name}()")
    if not isinstance(obj, str):
        return
    if name == "replace" and len(args) >= 2:
        _replace(obj, args[0], args[1])
    elif name == "join" and args and isinstance(args[0], list | tuple):
        if sum(len(i) for i in args[0] if isinstance(i, str)) + len(args[0]) * len(obj) > MAX_TEXT:
            raise refuse(".join()", f"would build over {MAX_TEXT} characters")
    elif name == "expandtabs":
        tab = next(iter((*args, *kwargs.values())), 8)
        if len(obj) + obj.count("\t") * max(tab if isinstance(tab, int) else 8, 0) > MAX_TEXT:
            raise refuse(".expandtabs()", f"would build over {MAX_TEXT} characters")
    elif name == "translate" and args and isinstance(args[0], dict):
        longest = max((len(v) for v in args[0].values() if isinstance(v, str)), default=1)
        if len(obj) * longest > MAX_TEXT:
            raise refuse(".translate()", f"may build over {MAX_TEXT} characters")


class _Formatter(SandboxedFormatter):
    """`str.format`: each field printed only if plain, with its width, and the whole kept within MAX_TEXT."""

    def __init__(self, env: Any) -> None:
        super().__init__(env)
        self.total = 0

    def convert_field(self, value: Any, conversion: str | None) -> Any:
        printed(value, ".format()", quoted=conversion in ("r", "a"))
        return super().convert_field(value, conversion)

    def format_field(self, value: Any, format_spec: str) -> Any:
        size = printed(value, ".format()")
        for n in _NUMBER.findall(format_spec):
            width = int(n) if len(n) < 12 else MAX_TEXT + 1
            _width(width, ".format()")
            size += width
        self.total += size
        if self.total > MAX_TEXT:
            raise refuse(".format()", f"would print over {MAX_TEXT} characters")
        return super().format_field(value, format_spec)


class BoundedCode(CodeGenerator):
    """Compiles `a ~ b` and list, tuple and dict literals through the sandbox's checks, and folds nothing but
    literal text at compile time (Jinja's folding of `'' ~ 'abc'.upper` would skip every check; the environment's
    optimizer, which folds the same way, is off)."""

    def _output_child_to_const(self, node: Any, frame: Any, finalize: Any) -> str:
        if not isinstance(node, nodes.TemplateData | nodes.Const):
            raise nodes.Impossible()
        return super()._output_child_to_const(node, frame, finalize)

    def visit_Concat(self, node: Any, frame: Any) -> None:
        self.write("environment.joined((")
        for child in node.nodes:
            self.visit(child, frame)
            self.write(", ")
        self.write("))")

    def _checked(self, node: Any, frame: Any, visit: Any) -> None:
        if getattr(node, "ctx", "load") != "load":  # `{% for a, b in … %}`: a target, not a value
            return visit(node, frame)
        self.write("environment.literal(")
        visit(node, frame)
        self.write(")")

    def visit_List(self, node: Any, frame: Any) -> None:
        self._checked(node, frame, super().visit_List)

    def visit_Tuple(self, node: Any, frame: Any) -> None:
        self._checked(node, frame, super().visit_Tuple)

    def visit_Dict(self, node: Any, frame: Any) -> None:
        self._checked(node, frame, super().visit_Dict)


class Sandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox with every way to build text or numbers bounded before it is built (see the
    module doc); Jinja itself bounds only `range`, to 100,000 items."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})
    code_generator_class = BoundedCode

    @staticmethod
    def joined(values: tuple) -> str:
        """`a ~ b ~ …`: each part plain, the whole within MAX_TEXT."""
        budget = MAX_TEXT
        for v in values:
            budget -= printed(v, "~", budget=budget)
        _count(MAX_TEXT - budget, "~")
        return "".join(map(str, values))

    @staticmethod
    def literal(value: Any) -> Any:
        return sized(value, "a literal")

    def call_binop(self, context: Any, op: str, left: Any, right: Any) -> Any:
        ints = isinstance(left, int) and isinstance(right, int)
        if op == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, str | bytes | list | tuple) and isinstance(n, int) and n > 0:
                    _width(len(seq) * n, "*")
                    if isinstance(seq, list | tuple):
                        _items(seq, "*", MAX_ITEMS // n)
            if ints and left.bit_length() + right.bit_length() > MAX_INT_BITS:
                raise refuse("*", f"would build a number of over {MAX_INT_BITS} bits")
        elif op == "**" and ints and abs(left) > 1 and right > 0:
            if right * math.log2(abs(left)) > MAX_INT_BITS:
                raise refuse("**", f"would build a number of over {MAX_INT_BITS} bits")
        elif op == "%" and isinstance(left, str | bytes):  # b'%r' % x, decoded, would print an address too
            percent(left.decode("latin-1") if isinstance(left, bytes) else left, right)
        return sized(_BINOPS[op](left, right), op)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        name = getattr(__obj, "__name__", "a call")
        owner = getattr(__obj, "__self__", None)
        if isinstance(__obj, types.BuiltinMethodType) and isinstance(owner, str | bytes | int | float | list | tuple |
                                                                          dict):
            _method_check(owner, name, args, kwargs)
        return sized(super().call(__context, __obj, *args, **kwargs), f"{name}()")

    def wrap_str_format(self, value: Any) -> Any:
        """`str.format` / `format_map` through `_Formatter` (Jinja's own, plus the checks)."""
        if not isinstance(value, types.MethodType | types.BuiltinMethodType) or \
                value.__name__ not in ("format", "format_map") or not isinstance(value.__self__, str):
            return None
        text, mapping = value.__self__, value.__name__ == "format_map"

        def wrapper(*args: Any, **kwargs: Any) -> str:
            if mapping:
                if kwargs or len(args) != 1:
                    raise TypeError("format_map() takes exactly one argument")
                args, kwargs = (), args[0]
            return type(text)(_Formatter(self).vformat(text, args, kwargs))
        return functools.update_wrapper(wrapper, value)


_BINOPS = {"*": operator.mul, "**": operator.pow, "+": operator.add, "%": operator.mod, "//": operator.floordiv,
           "-": operator.sub, "/": operator.truediv}


def stable(value: Any) -> Any:
    """`finalize` of every `{{ }}`: only plain data prints, within MAX_TEXT characters."""
    if type(value) is not str or len(value) > MAX_TEXT:  # text, the common case, costs one check
        printed(value, "{{ }}")
    return value
