"""Reading params.yaml: PyYAML's safe loader, refusing duplicate keys and reading `3e-4` as the number it means.

PyYAML follows YAML 1.1, where a float needs a dot (`3e-4` is the string "3e-4"); DVC reads params.yaml as YAML 1.2,
where it is a float. With strict configs a string would be refused, and the two readers would disagree, so kd reads
floats as YAML 1.2 does. A duplicate key silently keeps the last value in PyYAML; here it is an error naming it.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from kd.errors import KdError

# YAML 1.2 core schema floats (the `.inf`/`.nan` forms stay, so that strict configs can refuse them by name)
FLOAT_12 = re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?$|^[-+]?\.(?:inf|Inf|INF)$"
                      r"|^\.(?:nan|NaN|NAN)$")


class ParamsLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 floats and no duplicate keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor` merges are the YAML way to share a block, not a repeated key
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise KdError(f"{self.name}:{line}: duplicate key '{key}' (first at line {seen[key]}); PyYAML would "
                              f"keep the last one silently")
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
        return loader.get_single_data()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise KdError(f"{file}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    finally:
        loader.dispose()
