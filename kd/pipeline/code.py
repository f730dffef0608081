"""Which of kd's own source files a stage runs: its script and every kd module it imports, transitively.

Read statically with `ast` (nothing is imported), so the answer is the same on every machine and a stage's
code deps in dvc.yaml follow the code: a module a stage stops importing stops rerunning it, a new one starts.
The layering test reads the same imports to keep the package's floors in order.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "kd"


@dataclass(frozen=True)
class Import:
    """One import of a kd module: which module, the names taken from it, and whether it sits at the top of the
    file (not inside a function or class, where kd's own imports do not belong)."""

    module: str
    names: tuple[str, ...]
    top_level: bool
    line: int


def kd_imports(path: Path) -> list[Import]:
    """Every import of a `kd` module in a Python file, in file order."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    top = set(map(id, tree.body))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    out.append(Import(alias.name, (), id(node) in top, node.lineno))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == PACKAGE:
            out.append(Import(node.module, tuple(a.name for a in node.names), id(node) in top, node.lineno))
    return sorted(out, key=lambda i: i.line)


def module_file(src: Path, module: str) -> Path | None:
    """The file of `module` under the directory holding the `kd` package (a module or a package's __init__)."""
    base = src.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_files(src: Path, imp: Import) -> list[Path]:
    """The files an import executes: the module, its parent packages' __init__s, and any submodule it names
    (`from kd.distill import loop`)."""
    parts = imp.module.split(".")
    files = [module_file(src, ".".join(parts[:i])) for i in range(1, len(parts) + 1)]
    files += [module_file(src, f"{imp.module}.{name}") for name in imp.names
              if (src.joinpath(*imp.module.split("."), name)).with_suffix(".py").is_file()
              or (src.joinpath(*imp.module.split("."), name) / "__init__.py").is_file()]
    return [f for f in files if f is not None]


def closure(root: Path, script: str) -> list[str]:
    """The stage script and every kd source file it runs, as sorted paths relative to `root`.

    kd's files count only when the project holds the `kd` package itself (a clone of kd); a project that
    installs kd as a library tracks its stage scripts alone.
    """
    root = Path(root)
    seen = {root / script}
    todo = [root / script]
    while todo:
        path = todo.pop()
        if not path.is_file():
            continue
        for imp in kd_imports(path):
            for f in imported_files(root, imp):
                if f not in seen:
                    seen.add(f)
                    todo.append(f)
    return sorted(str(p.relative_to(root)) for p in seen)
