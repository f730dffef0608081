"""`kd cache push` / `kd cache pull`: share the request cache through the project's DVC remote.

Entries travel as immutable objects under `<remote>/kd-cache/v1/<key[:2]>/<key>.json` (beside DVC's own
`files/md5/`, which `dvc gc -c` manages; this prefix it leaves alone). The layout is the local one, so:
- incremental: each side lists the other's keys and moves only what it lacks;
- safe with concurrent writers: an object is never overwritten (push skips keys the remote has), and each
  is written whole or not at all (DVC's local and SSH filesystems write a temporary file and rename it;
  object stores make a PUT visible only when complete). Two teammates pushing the same key both push a
  valid answer to it; either is fine;
- verified: a pulled object is checked with kd.cache's own verification (checksum, key = file name, the
  request hashes to the key) before it is installed with a rename; a bad one is reported and skipped.
"""

from __future__ import annotations

import os
import re
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kd.cache.store import RequestCache, check_entry
from kd.errors import KdError
from kd.paths import CACHE_DIR

PREFIX = "kd-cache/v1"
_ENTRY = re.compile(r"^[0-9a-f]{64}\.json$")


@dataclass
class Transfer:
    remote: str
    moved: int = 0
    already: int = 0  # keys the other side had
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (key, why)


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


def _remote_keys(fs: Any, base: str) -> dict[str, str]:
    try:
        paths = list(fs.find(base))
    except FileNotFoundError:
        return {}
    return {os.path.basename(p)[:-5]: p for p in paths if _ENTRY.match(os.path.basename(p))}


def _local_keys(cache: RequestCache) -> dict[str, Path]:
    if not cache.dir.is_dir():
        return {}
    return {p.stem: p for p in cache.dir.glob("*/*.json") if _ENTRY.match(p.name)}


def push(root: Path, remote: str | None = None, jobs: int = 8) -> Transfer:
    """Upload every verified local entry the remote lacks; a damaged local entry is reported, not sent."""
    fs, base, label = _remote(root, remote)
    cache = RequestCache(root / CACHE_DIR)
    there = _remote_keys(fs, base)
    local = _local_keys(cache)
    result = Transfer(label, already=len(local.keys() & there.keys()))
    todo = []
    for key in sorted(local.keys() - there.keys()):
        if problem := check_entry(local[key].read_bytes(), key):
            result.rejected.append((key, f"local entry damaged: {problem}; `kd cache verify --fix`"))
        else:
            todo.append(key)

    def upload(key: str) -> None:
        fs.put_file(str(local[key]), fs.join(base, key[:2], f"{key}.json"))

    with ThreadPoolExecutor(max(1, jobs)) as pool:
        list(pool.map(upload, todo))
    result.moved = len(todo)
    return result


def pull(root: Path, remote: str | None = None, jobs: int = 8) -> Transfer:
    """Download every remote entry this cache lacks, verify it, and install it atomically; never
    overwrite a local entry (the local answer is the one local datasets were built from)."""
    fs, base, label = _remote(root, remote)
    cache = RequestCache(root / CACHE_DIR)
    there = _remote_keys(fs, base)
    local = _local_keys(cache)
    result = Transfer(label, already=len(there.keys() & local.keys()))

    def download(key: str) -> str | None:
        raw = fs.cat_file(there[key])
        if problem := check_entry(raw, key):
            return problem
        path = cache.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{key[:16]}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
        if path.exists():  # written meanwhile by a build or another pull: keep it
            os.unlink(tmp)
        else:
            os.replace(tmp, path)
        return None

    todo = sorted(there.keys() - local.keys())
    with ThreadPoolExecutor(max(1, jobs)) as pool:
        for key, problem in zip(todo, pool.map(download, todo), strict=True):
            if problem:
                result.rejected.append((key, f"remote object {there[key]} rejected: {problem}"))
            else:
                result.moved += 1
    return result
