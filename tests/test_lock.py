"""The lock files that `make setup` installs agree with pyproject.toml (issue 21: nothing pinned the libraries, and
transformers 5.24 → 5.25 changed the default build's data).

requirements.lock is pip-compile's output: each entry `name==version`, its hashes and a `# via` record of what needs
it. Every pyproject requirement (dependencies, the dev extra, the build system) must be met by a locked version, and
every locked package must be needed by one, directly or through the packages that need it.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from kd.config.teachers import EmbeddedTeacher

tomllib = pytest.importorskip("tomllib")  # Python ≥ 3.11, as the lock (cp311 wheels) is

REPO = Path(__file__).resolve().parents[1]
LOCK, LOCK_NODEPS = "requirements.lock", "requirements-nodeps.lock"
ENTRY = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")
VIA = re.compile(r"^\s*#\s+(?:via\s+)?([A-Za-z0-9][A-Za-z0-9._-]*)(\s*\(.*\))?\s*$")


def parse_lock(text: str) -> dict[str, dict]:
    """name -> {version, hashes, via}: the packages that need it (`kd (pyproject.toml)` entries left out)."""
    out: dict[str, dict] = {}
    entry = None
    for line in text.splitlines():
        if m := ENTRY.match(line):
            entry = out.setdefault(canonicalize_name(m[1]), {"version": m[2], "hashes": [], "via": set()})
        elif entry is not None and line.strip().startswith("--hash="):
            entry["hashes"].append(line.strip().split("=", 1)[1].rstrip(" \\"))
        elif entry is not None and (m := VIA.match(line)) and m[2] is None and m[1] != "via":
            entry["via"].add(canonicalize_name(m[1]))
    return out


def requirements(pyproject: dict) -> list[Requirement]:
    project = pyproject["project"]
    reqs = [*project["dependencies"], *project["optional-dependencies"]["dev"], *pyproject["build-system"]["requires"]]
    return [r for r in map(Requirement, reqs) if r.marker is None or r.marker.evaluate()]


def disagreements(pyproject: dict, lock_text: str) -> list[str]:
    """What `make lock` would change: a requirement the lock does not meet, or a locked package nothing needs."""
    lock, out = parse_lock(lock_text), []
    direct = set()
    for req in requirements(pyproject):
        name = canonicalize_name(req.name)
        direct.add(name)
        if name not in lock:
            out.append(f"pyproject.toml requires {req}; {LOCK} has no {name}")
        elif not req.specifier.contains(lock[name]["version"], prereleases=True):
            out.append(f"pyproject.toml requires {req}; {LOCK} pins {name}=={lock[name]['version']}")
    needed, grown = direct & set(lock), True
    while grown:
        more = {n for n, e in lock.items() if n not in needed and e["via"] & needed}
        needed |= more
        grown = bool(more)
    out += [f"{LOCK} pins {n}=={lock[n]['version']}, which no requirement of pyproject.toml needs"
            for n in sorted(set(lock) - needed)]
    out += [f"{LOCK}: {n} has no --hash" for n, e in lock.items() if not e["hashes"]]
    return out


def committed() -> tuple[dict, str]:
    return (tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8")),
            (REPO / LOCK).read_text(encoding="utf-8"))


def test_lock_agrees_with_pyproject():
    pyproject, lock = committed()
    found = disagreements(pyproject, lock)
    assert not found, "run `make lock`:\n" + "\n".join(found)


@pytest.mark.parametrize(("edit", "named"), [
    # a pin outside pyproject's range (jinja2>=3.1.6: the sandbox fix)
    (lambda t: t.replace("\njinja2==3.1.6 \\", "\njinja2==3.1.5 \\"), "requires jinja2>=3.1.6; requirements.lock pins "
                                                                      "jinja2==3.1.5"),
    # a requirement the lock lacks
    (lambda t: re.sub(r"\nselenium==.*?(?=\n\S)", "", t, flags=re.S), "has no selenium"),
    # a package nothing needs (hand-added, or left over after a requirement was dropped)
    (lambda t: t + "leftover==1.0 \\\n    --hash=sha256:" + "0" * 64 + "\n", "pins leftover==1.0, which no"),
])
def test_a_disagreement_is_named(edit, named):
    pyproject, lock = committed()
    assert any(named in d for d in disagreements(pyproject, edit(lock))), named


def test_a_dropped_requirement_leaves_its_dependencies_unneeded():
    # dropping mlflow from pyproject must flag mlflow and what only it needed, not just the direct entry
    pyproject, lock = committed()
    pyproject["project"]["dependencies"] = [d for d in pyproject["project"]["dependencies"] if d != "mlflow>=3.0"]
    found = " ".join(disagreements(pyproject, lock))
    assert "pins mlflow==" in found and "pins mlflow-skinny==" in found and "pins gunicorn==" in found


def test_torch_is_the_cpu_build():
    # any other torch spec pulls a multi-GB CUDA build and its nvidia-* packages
    lock = parse_lock(committed()[1])
    assert lock["torch"]["version"].endswith("+cpu"), lock["torch"]["version"]
    assert not [n for n in lock if n.startswith(("nvidia-", "triton"))]


def test_nodeps_lock_pins_the_embedded_teacher_with_hashes():
    nodeps = parse_lock((REPO / LOCK_NODEPS).read_text(encoding="utf-8"))
    assert set(nodeps) == {"pip", canonicalize_name(EmbeddedTeacher.model_fields["package"].default)}
    assert all(len(e["hashes"]) == 1 and e["hashes"][0].startswith("sha256:") for e in nodeps.values()), nodeps
