"""The house plan holds: kd's imports run downward only, with no circles, no private names across modules and no
function-local imports of kd's own modules (DESIGN.md §2).

Floors, bottom to top; a module may import its own floor and those below. The three method families share a
floor but never import each other.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kd.pipeline.code import imported_files, kd_imports

REPO = Path(__file__).resolve().parents[1]
FLOORS = (
    ("ground", ("kd/__init__.py", "kd/errors.py", "kd/secrets.py", "kd/paths.py", "kd/records.py", "kd/prompts.py",
                "kd/sandbox.py", "kd/watchdog.py",
                "kd/tracking.py", "kd/stage.py", "kd/config/")),
    ("cache", ("kd/cache/",)),
    ("runtime", ("kd/runtime/",)),
    ("provenance", ("kd/provenance/",)),
    ("families", ("kd/elicit/", "kd/distill/", "kd/evaluation/")),
    ("pipeline", ("kd/pipeline/",)),
    ("tools", ("kd/cli/", "kd/view/", "stages/")),
)
FAMILIES = ("kd/elicit/", "kd/distill/", "kd/evaluation/")


def floor(rel: str) -> int:
    for i, (_, prefixes) in enumerate(FLOORS):
        if any(rel == p or rel.startswith(p) for p in prefixes):
            return i
    raise AssertionError(f"{rel} is on no floor of the house plan; add it to FLOORS")


def family(rel: str) -> str | None:
    return next((f for f in FAMILIES if rel.startswith(f)), None)


def sources() -> list[Path]:
    return sorted([*(REPO / "kd").rglob("*.py"), *(REPO / "stages").glob("*.py")])


def graph() -> dict[str, set[str]]:
    """file -> the kd files its imports name (not their parent packages' __init__s: importing a package's module
    is not a dependency on its siblings)."""
    out: dict[str, set[str]] = {}
    for path in sources():
        rel = str(path.relative_to(REPO))
        out[rel] = set()
        for imp in kd_imports(path):
            files = imported_files(REPO, imp)
            named = [f for f in files if f.stem != "__init__"] or files[-1:]
            out[rel] |= {str(f.relative_to(REPO)) for f in named} - {rel}
    return out


def test_every_file_is_on_a_floor():
    for path in sources():
        floor(str(path.relative_to(REPO)))


def test_imports_run_downward_and_families_stay_apart():
    wrong = []
    for src, targets in graph().items():
        for dst in sorted(targets):
            if floor(dst) > floor(src):
                wrong.append(f"{src} -> {dst}: {FLOORS[floor(dst)][0]} is above {FLOORS[floor(src)][0]}")
            elif family(src) and family(dst) and family(src) != family(dst):
                wrong.append(f"{src} -> {dst}: the method families never import each other")
    assert not wrong, "forbidden imports:\n" + "\n".join(wrong)


def test_no_import_circles():
    g = graph()
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(g.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(g):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import circles:\n" + "\n".join(cycles)


def test_kd_imports_at_the_top_of_files_and_no_private_names_across_modules():
    wrong = []
    for path in sources():
        rel = str(path.relative_to(REPO))
        for imp in kd_imports(path):
            if not imp.top_level:
                wrong.append(f"{rel}:{imp.line}: imports {imp.module} inside a function (kd's own modules go at the top)")
            wrong += [f"{rel}:{imp.line}: imports private {imp.module}.{n}" for n in imp.names
                      if n.startswith("_") and not n.startswith("__")]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("bad", ["kd/elicit/x.py -> kd/distill/loop.py", "kd/runtime/x.py -> kd/elicit/build.py"])
def test_the_rules_catch_what_they_forbid(bad):
    # the checks above would pass vacuously if floor() or family() mapped everything alike
    src, dst = bad.split(" -> ")
    assert floor(dst) > floor(src) or (family(src) != family(dst) and family(src) and family(dst))
