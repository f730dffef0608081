"""Reading params.yaml: PyYAML's safe loader, refusing duplicate keys and reading `3e-4` as the number it means.

PyYAML follows YAML 1.1, where a float needs a dot (`3e-4` is the string "3e-4"); DVC reads params.yaml as YAML 1.2,
where it is a float. With strict configs a string would be refused, and the two readers would disagree, so kd reads
floats as YAML 1.2 does. A duplicate key silently keeps the last value in PyYAML; here it is an error naming it.

Anchors and aliases stay (the shipped profiles share training blocks with `&train` / `<<: *gkd`), but the document is
bounded before any value is built: an alias bomb (each level a list of aliases to the one before: nine levels are
10^9 values from 1 kB of text) is refused by counting the values the aliases would expand to, memoised per node, in
time linear in the text; a recursive alias (`x: &r [1, *r]`) and nesting beyond MAX_DEPTH are refused too (they would
end in a RecursionError in whatever walks the values next), and so is an integer Python cannot even read (over 4300
digits is a ValueError) or no 64-bit field could take.
"""

from __future__ import annotations

import re
from collections.abc import Hashable
from typing import Any

import yaml

from kd.config.errors import key_path, one_line
from kd.errors import KdError

MAX_VALUES = 50_000  # values of a params file with its aliases expanded (the shipped files: 260 to 790)
MAX_DEPTH = 32  # nesting levels of a params file, aliases expanded (the shipped files: 6)
MAX_INT_DIGITS = 20  # digits of an integer (a 64-bit integer has at most 20)
INT_NOISE = re.compile(r"^[-+]?(?:0[xob])?|[_:]")  # what of a YAML 1.1 integer is not a digit (sign, base, separators)

# YAML 1.2 core schema floats (the `.inf`/`.nan` forms stay, so that strict configs can refuse them by name)
FLOAT_12 = re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?$|^[-+]?\.(?:inf|Inf|INF)$"
                      r"|^\.(?:nan|NaN|NAN)$")


class ParamsLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 floats, no duplicate keys and bounded nesting."""

    depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        # PyYAML composes recursively: `[[[[…` 200,000 deep would be a RecursionError traceback, not a line
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                line = self.peek_event().start_mark.line + 1
                raise KdError(f"{self.name}:{line}: nested deeper than {MAX_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor` merges are the YAML way to share a block, not a repeated key
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if not isinstance(key, Hashable):  # `? [1, 2]` is valid YAML, and a TypeError below
                raise KdError(f"{self.name}:{line}: a key must be a plain value, not a {type(key).__name__}")
            if key in seen:
                raise KdError(f"{self.name}:{line}: duplicate key '{one_line(str(key))}' (first at line {seen[key]}); "
                              f"PyYAML would keep the last one silently")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


ParamsLoader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
for _first in "-+.0123456789":
    ParamsLoader.yaml_implicit_resolvers[_first] = [
        (tag, rx) for tag, rx in ParamsLoader.yaml_implicit_resolvers.get(_first, []) if tag != "tag:yaml.org,2002:float"]
ParamsLoader.add_implicit_resolver("tag:yaml.org,2002:float", FLOAT_12, list("-+.0123456789"))


def read_params_yaml(text: str, file: str) -> Any:
    """The data of a params file.

    Raises:
        KdError: a YAML syntax error (file and line) or a duplicate key (file, line and key).
    """
    loader = ParamsLoader(text)
    loader.name = file
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_bounds(node, file)
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise KdError(f"{file}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    finally:
        loader.dispose()


def _check_bounds(root: yaml.Node, file: str) -> None:
    """Refuse a composed document whose values, aliases expanded, are too many or nested too deep, that contains
    itself (a recursive alias), or holds an integer too long to read. Each node is visited once (aliases share
    their node), depth first without recursion; its expanded size and height are memoised.

    Raises:
        KdError: one line naming the file, line and key path.
    """
    size: dict[int, int] = {}
    height: dict[int, int] = {}
    open_: set[int] = set()  # nodes being visited: the ancestors of the current one
    stack: list[tuple[yaml.Node, tuple, bool]] = [(root, (), False)]
    while stack:
        node, path, leaving = stack.pop()
        kids = _children(node, path)
        where = f"{file}:{node.start_mark.line + 1}: {key_path(path) or '(top level)'}"  # used only when refusing
        if leaving:
            open_.discard(id(node))
            size[id(node)] = 1 + sum(size[id(k)] for k, _ in kids)
            height[id(node)] = 1 + max((height[id(k)] for k, _ in kids), default=0)
            if size[id(node)] > MAX_VALUES:
                raise KdError(f"{where}: expands to over {MAX_VALUES} values (an alias bomb?); write it out, or "
                              f"share less through aliases")
            if height[id(node)] > MAX_DEPTH:
                raise KdError(f"{where}: nested deeper than {MAX_DEPTH} levels once its aliases are expanded")
            continue
        if id(node) in size:
            continue  # an alias to a node already counted
        if id(node) in open_:
            raise KdError(f"{where}: a recursive alias (the value contains itself)")
        if node.tag == "tag:yaml.org,2002:int" and (digits := len(INT_NOISE.sub("", node.value))) > MAX_INT_DIGITS:
            raise KdError(f"{where}: an integer of {digits} digits; params take at most {MAX_INT_DIGITS}")
        open_.add(id(node))
        stack.append((node, path, True))
        stack.extend((k, p, False) for k, p in reversed(kids))


def _children(node: yaml.Node, path: tuple) -> list[tuple[yaml.Node, tuple]]:
    """A node's child nodes, each with its key path (a mapping's keys, then its values, under the key)."""
    if isinstance(node, yaml.SequenceNode):
        return [(v, path + (i,)) for i, v in enumerate(node.value)]
    if isinstance(node, yaml.MappingNode):
        out = []
        for k, v in node.value:
            key = k.value if isinstance(k, yaml.ScalarNode) else "?"
            out += [(k, path + (key,)), (v, path + (key,))]
        return out
    return []
