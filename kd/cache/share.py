"""`kd cache push` / `pull` / `verify`: share both caches through the project's DVC remote, and check them.

Two kinds of entry travel, each as immutable objects beside DVC's own `files/md5/` (which `dvc gc -c` manages;
this prefix it leaves alone), in the local layout:
- requests (`.kd/cache/<key[:2]>/<key>.json`)              -> `<remote>/kd-cache/v1/<key[:2]>/<key>.json`
- features (`.kd/cache/features/<key[:2]>/<key>.safetensors`) -> `<remote>/kd-cache/v1/features/<key[:2]>/…`
so that:
- incremental: each side lists the other's keys and moves only what it lacks;
- safe with concurrent writers: an object is never overwritten (push skips keys the remote has), and each
  is written whole or not at all (DVC's local and SSH filesystems write a temporary file and rename it;
  object stores make a PUT visible only when complete). Two teammates pushing the same key both push a
  valid answer to it; either is fine;
- verified: every object is checked with its kind's one check (`check_entry`, `entry_problem`) before it is
  sent or installed; a bad one is reported and skipped, and the transfer goes on with the rest.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kd.cache.features import FeatureCache, entry_problem
from kd.cache.store import check_entry, probe_writable, unreadable
from kd.errors import KdError
from kd.paths import CACHE_DIR

PREFIX = "kd-cache/v1"


@dataclass(frozen=True)
class Kind:
    """One kind of cache entry: where it lives here and on the remote, and how an entry is judged."""

    name: str  # as reports name it
    what: str  # as error messages name its directory
    local: Path
    remote_sub: str  # under PREFIX on the remote ("" for requests)
    pattern: re.Pattern[str]  # an entry's file name; the key is its stem
    check: Callable[[bytes, str], str | None]


def kinds(root: Path) -> tuple[Kind, Kind]:
    cache_dir = root / CACHE_DIR
    return (Kind("requests", "request cache", cache_dir, "", re.compile(r"^[0-9a-f]{64}\.json$"), check_entry),
            Kind("features", "feature cache", FeatureCache.within(cache_dir).dir, "features",
                 re.compile(r"^[0-9a-f]{64}\.safetensors$"), lambda raw, key: entry_problem(raw, key)))


@dataclass
class Moved:
    """What one transfer did with one kind of entry."""

    kind: str
    moved: int = 0
    already: int = 0  # keys the other side had
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (key, why)


@dataclass
class Transfer:
    remote: str
    kinds: list[Moved]

    @property
    def rejected(self) -> list[tuple[str, str, str]]:
        return [(m.kind, key, why) for m in self.kinds for key, why in m.rejected]


@dataclass(frozen=True)
class Damage:
    kind: str
    path: Path
    problem: str


def local_entries(kind: Kind) -> dict[str, Path]:
    """key -> file of every entry of `kind` in this cache (files in <key[:2]>/ named like an entry)."""
    if not kind.local.is_dir():
        return {}
    return {p.stem: p for p in kind.local.glob("*/*") if kind.pattern.match(p.name)
            and p.parent.name == p.name[:2]}


def local_problem(kind: Kind, key: str, path: Path) -> str | None:
    try:
        return kind.check(path.read_bytes(), key)
    except OSError as e:
        return unreadable(e)


def verify(root: Path) -> tuple[dict[str, int], list[Damage]]:
    """Every entry of both caches checked: (entries by kind, the damaged ones with why)."""
    counts, damaged = {}, []
    for kind in kinds(root):
        entries = local_entries(kind)
        counts[kind.name] = len(entries)
        damaged += [Damage(kind.name, path, problem) for key, path in sorted(entries.items())
                    if (problem := local_problem(kind, key, path))]
    return counts, damaged


def _remote(root: Path, name: str | None) -> tuple[Any, str, str]:
    """(filesystem, base path of the kd cache on it, remote name) from the project's DVC config."""
    from dvc.config import NoRemoteError, RemoteNotFoundError
    from dvc.repo import Repo

    try:
        repo = Repo(str(root))
    except Exception as e:  # not a DVC project
        raise KdError(f"{root.resolve()}: not a DVC project ({e}); run `dvc init` and `dvc remote add -d`") from None
    with repo:
        try:
            remote = repo.cloud.get_remote(name)
        except (NoRemoteError, RemoteNotFoundError) as e:
            raise KdError(f"no DVC remote to use ({str(e).splitlines()[0]}); add one with "
                          f"`dvc remote add -d NAME URL`, or pass -r NAME") from None
        label = name or repo.config["core"].get("remote", "default")
    return remote.fs, remote.fs.join(remote.path, *PREFIX.split("/")), label


def _remote_entries(fs: Any, base: str, ks: tuple[Kind, ...]) -> dict[str, dict[str, str]]:
    """kind name -> key -> remote path; one listing, told apart by file name (the kinds' suffixes differ)."""
    out: dict[str, dict[str, str]] = {k.name: {} for k in ks}
    try:
        paths = list(fs.find(base))
    except FileNotFoundError:
        return out
    for p in paths:
        name = os.path.basename(p)
        for k in ks:
            if k.pattern.match(name):
                out[k.name][name.split(".")[0]] = p
    return out


def _remote_path(fs: Any, base: str, kind: Kind, path: Path) -> str:
    parts = [kind.remote_sub] if kind.remote_sub else []
    return fs.join(base, *parts, path.parent.name, path.name)


def push(root: Path, remote: str | None = None, jobs: int = 8) -> Transfer:
    """Upload every verified local entry the remote lacks; a damaged local entry is reported, not sent."""
    fs, base, label = _remote(root, remote)
    ks = kinds(root)
    there = _remote_entries(fs, base, ks)
    result = Transfer(label, [])
    for kind in ks:
        local = local_entries(kind)
        moved = Moved(kind.name, already=len(local.keys() & there[kind.name].keys()))
        result.kinds.append(moved)
        todo = []
        for key in sorted(local.keys() - there[kind.name].keys()):
            if problem := local_problem(kind, key, local[key]):
                moved.rejected.append((key, f"local entry damaged: {problem}; `kd cache verify --fix`"))
            else:
                todo.append(key)

        def upload(key: str, kind: Kind = kind, local: dict[str, Path] = local) -> str | None:
            try:
                fs.put_file(str(local[key]), _remote_path(fs, base, kind, local[key]))
            except Exception as e:  # one failed upload is reported; the others still go
                return f"upload failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            return None

        with ThreadPoolExecutor(max(1, jobs)) as pool:
            for key, problem in zip(todo, pool.map(upload, todo), strict=True):
                if problem:
                    moved.rejected.append((key, problem))
                else:
                    moved.moved += 1
    return result


def _install(raw: bytes, path: Path) -> None:
    """Write `raw` at `path` through a temporary file and a rename; never replace an entry already there (the
    local answer is the one local datasets were built from, or a build or another pull wrote it meanwhile)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:16]}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
        if path.exists():
            os.unlink(tmp)
        else:
            os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def pull(root: Path, remote: str | None = None, jobs: int = 8) -> Transfer:
    """Download every remote entry this cache lacks, verify it, and install it atomically. A bad object is
    refused and reported; the others are still installed."""
    fs, base, label = _remote(root, remote)
    ks = kinds(root)
    for kind in ks:  # one line naming the directory, before anything is downloaded
        probe_writable(kind.local, kind.what)
    there = _remote_entries(fs, base, ks)
    result = Transfer(label, [])
    for kind in ks:
        local = local_entries(kind)
        remote_keys = there[kind.name]
        moved = Moved(kind.name, already=len(remote_keys.keys() & local.keys()))
        result.kinds.append(moved)

        def download(key: str, kind: Kind = kind, remote_keys: dict[str, str] = remote_keys) -> str | None:
            try:
                raw = fs.cat_file(remote_keys[key])
            except Exception as e:  # one unreadable object is reported; the others still come
                return f"download failed: {type(e).__name__}"
            if problem := kind.check(raw, key):
                return problem
            suffix = os.path.splitext(remote_keys[key])[1]
            _install(raw, kind.local / key[:2] / f"{key}{suffix}")
            return None

        todo = sorted(remote_keys.keys() - local.keys())
        with ThreadPoolExecutor(max(1, jobs)) as pool:
            for key, problem in zip(todo, pool.map(download, todo), strict=True):
                if problem:
                    moved.rejected.append((key, f"remote object {remote_keys[key]} refused: {problem}"))
                else:
                    moved.moved += 1
    return result
