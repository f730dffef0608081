"""`kd cache push` / `pull` / `verify`: share both caches through the project's DVC remote, and check them.

Everything travels beside DVC's own `files/md5/` (which `dvc gc -c` manages; this prefix it leaves alone):
- requests, as packs: `<remote>/kd-cache/packs/<sha256>.jsonl.gz` (the entries' bytes, one a line, sorted by key,
  gzip'd without a timestamp: the same entries give the same bytes and name) and `<sha256>.keys` (its keys, one a
  line, in the same order). The pack is uploaded first and its key list last: a key list marks a complete pack.
- requests pushed before packs existed: `<remote>/kd-cache/v1/<key[:2]>/<key>.json`, one file each (still pulled).
- features (`.kd/cache/features/<key[:2]>/<key>.safetensors`) -> `<remote>/kd-cache/v1/features/<key[:2]>/…`
so that:
- incremental: push sends only entries no pack (or old-layout file) on the remote holds; pull downloads only packs
  holding keys this cache lacks. The request cache remembers which packs it has read (and which of its entries each
  holds), so a second push or pull reads no key list again;
- safe with concurrent writers: nothing on the remote is ever overwritten (a pack's name is its content's hash;
  two teammates pushing the same entries make two packs, and pull takes each key once);
- verified: every entry is checked with its kind's one check (`check_entry`, `entry_problem`) before it is sent or
  installed; a bad one is reported and skipped, and the transfer goes on with the rest;
- bounded: a pack is decompressed as it is read, a line at a time, and installed in batches, so a pull holds at most
  one batch in memory; a pack that decompresses past PACK_MAX_BYTES, or past PACK_MAX_RATIO times its compressed
  size, is a gzip bomb, not kd's: it is refused in one line and the other packs install.
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
from kd.cache.packs import PACK_ENTRIES, PackRefused, pack, pack_lines
from kd.cache.store import RequestCache, check_entry, judge, probe_writable, unreadable
from kd.errors import KdError
from kd.paths import CACHE_DIR

TOP = "kd-cache"
INSTALL_BATCH = 32 << 20  # entries installed a transaction at a time while a pack is read: the memory a pull holds


@dataclass(frozen=True)
class Kind:
    """One kind of cache entry: where it lives here and on the remote, and how an entry is judged."""

    name: str  # as reports name it
    what: str  # as error messages name its directory
    local: Path
    remote_sub: str  # under kd-cache/v1 on the remote ("" for requests)
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
    key: str
    where: str  # the entry's file, or `<database>:<key>`
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
    requests, features = kinds(root)
    cache = RequestCache(requests.local)
    counts, damaged = {"requests": 0}, []
    for key, raw in cache.entries():
        counts["requests"] += 1
        if problem := check_entry(raw, key):
            damaged.append(Damage("requests", key, f"{cache.db}:{key}", problem))
    entries = local_entries(features)
    counts["features"] = len(entries)
    damaged += [Damage("features", key, str(path), problem) for key, path in sorted(entries.items())
                if (problem := local_problem(features, key, path))]
    return counts, damaged


def fix(root: Path, damaged: list[Damage]) -> list[tuple[Damage, str]]:
    """Remove damaged entries (the next build asks or computes them again); those that could not be, with why."""
    failed = []
    bad_requests = [d for d in damaged if d.kind == "requests"]
    if bad_requests:
        try:
            RequestCache(kinds(root)[0].local).delete(d.key for d in bad_requests)
        except KdError as e:
            failed += [(d, str(e)) for d in bad_requests]
    for d in damaged:
        if d.kind != "requests":
            try:
                Path(d.where).unlink(missing_ok=True)
            except OSError as e:
                failed.append((d, e.strerror or type(e).__name__))
    return failed


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
    return remote.fs, remote.fs.join(remote.path, TOP), label


def _find(fs: Any, base: str) -> list[str]:
    try:
        return list(fs.find(base))
    except FileNotFoundError:
        return []


def _remote_entries(fs: Any, base: str, ks: tuple[Kind, ...]) -> dict[str, dict[str, str]]:
    """kind name -> key -> remote path of the one-file-per-entry objects; one listing, told apart by file name."""
    out: dict[str, dict[str, str]] = {k.name: {} for k in ks}
    for p in _find(fs, fs.join(base, "v1")):
        name = os.path.basename(p)
        for k in ks:
            if k.pattern.match(name):
                out[k.name][name.split(".")[0]] = p
    return out


def _remote_packs(fs: Any, base: str) -> list[str]:
    """Names of the complete packs on the remote (those whose key list is there), sorted."""
    return sorted(os.path.basename(p)[:-5] for p in _find(fs, fs.join(base, "packs"))
                  if re.fullmatch(r"[0-9a-f]{64}\.keys", os.path.basename(p)))


def _pack_keys(fs: Any, base: str, name: str) -> list[str]:
    """A pack's keys, in its lines' order (a garbled key list gives keys no entry matches: each is refused)."""
    path = fs.join(base, "packs", f"{name}.keys")
    try:
        return fs.cat_file(path).decode("utf-8", "replace").split()
    except Exception as e:  # the remote cannot be read: one line, nothing installed from this pack
        raise KdError(f"{path}: cannot read the remote pack's key list ({type(e).__name__}: {_first_line(e)})") from None


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else ""


def push(root: Path, remote: str | None = None, jobs: int = 8) -> Transfer:
    """Upload every verified local entry the remote lacks; a damaged local entry is reported, not sent."""
    fs, base, label = _remote(root, remote)
    ks = kinds(root)
    there = _remote_entries(fs, base, ks)
    return Transfer(label, [_push_requests(RequestCache(ks[0].local), fs, base, set(there["requests"])),
                            _push_files(ks[1], fs, base, there["features"], jobs)])


def _push_requests(cache: RequestCache, fs: Any, base: str, loose: set[str]) -> Moved:
    moved = Moved("requests")
    names = _remote_packs(fs, base)
    seen = cache.packs()
    for name in names:
        if name not in seen:  # read once: which of our entries it holds is remembered
            keys = _pack_keys(fs, base, name)
            here = cache.present(keys)
            cache.note_pack(name, here, complete=len(here) == len(set(keys)))
    on_remote = set(names)
    ids = [i for name, (i, _) in cache.packs().items() if name in on_remote]
    todo = [key for key in cache.unpacked(ids) if key not in loose]
    moved.already = cache.count() - len(todo)
    for start in range(0, len(todo), PACK_ENTRIES):
        good = []
        for key, raw in sorted(cache.raws(todo[start:start + PACK_ENTRIES]).items()):
            if problem := check_entry(raw, key):
                moved.rejected.append((key, f"local entry damaged: {problem}; `kd cache verify --fix`"))
            else:
                good.append((key, raw))
        if not good:
            continue
        name, body, keys = pack(good)
        try:
            with tempfile.TemporaryDirectory(prefix="kd-pack-") as tmp:
                for suffix, data in ((".jsonl.gz", body), (".keys", keys)):  # the key list last: it marks a whole pack
                    (Path(tmp) / f"{name}{suffix}").write_bytes(data)
                    fs.put_file(str(Path(tmp) / f"{name}{suffix}"), fs.join(base, "packs", f"{name}{suffix}"))
        except Exception as e:  # reported for each entry of the pack; a later push sends them again
            moved.rejected += [(key, f"upload failed: {type(e).__name__}: {_first_line(e)}") for key, _ in good]
            continue
        cache.note_pack(name, [key for key, _ in good], complete=True)
        moved.moved += len(good)
    return moved


def _push_files(kind: Kind, fs: Any, base: str, there: dict[str, str], jobs: int) -> Moved:
    local = local_entries(kind)
    moved = Moved(kind.name, already=len(local.keys() & there.keys()))
    todo = []
    for key in sorted(local.keys() - there.keys()):
        if problem := local_problem(kind, key, local[key]):
            moved.rejected.append((key, f"local entry damaged: {problem}; `kd cache verify --fix`"))
        else:
            todo.append(key)

    def upload(key: str) -> str | None:
        path = local[key]
        try:
            fs.put_file(str(path), fs.join(base, "v1", kind.remote_sub, path.parent.name, path.name))
        except Exception as e:  # one failed upload is reported; the others still go
            return f"upload failed: {type(e).__name__}: {_first_line(e)}"
        return None

    with ThreadPoolExecutor(max(1, jobs)) as pool:
        for key, problem in zip(todo, pool.map(upload, todo), strict=True):
            if problem:
                moved.rejected.append((key, problem))
            else:
                moved.moved += 1
    return moved


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
    """Download every remote entry this cache lacks, verify it, and install it. A bad entry is refused and
    reported; the others are still installed."""
    fs, base, label = _remote(root, remote)
    ks = kinds(root)
    cache = RequestCache(ks[0].local)
    cache.ensure_writable()  # one line naming the directory, before anything is downloaded
    probe_writable(ks[1].local, ks[1].what)
    there = _remote_entries(fs, base, ks)
    return Transfer(label, [_pull_requests(cache, fs, base, there["requests"], jobs),
                            _pull_files(ks[1], fs, there["features"], jobs)])


def _pull_requests(cache: RequestCache, fs: Any, base: str, loose: dict[str, str], jobs: int) -> Moved:
    moved = Moved("requests")
    seen = cache.packs()
    names = _remote_packs(fs, base)
    for name in names:
        if name in seen and seen[name][1]:
            continue  # every key it holds is here: nothing to read
        keys = _pack_keys(fs, base, name)
        here = cache.present(keys)
        cache.note_pack(name, here, complete=False)
        lacking = {k for k in keys if k not in here}
        installed, new, refused = _install_pack(cache, fs, fs.join(base, "packs", f"{name}.jsonl.gz"), keys,
                                                lacking, name) if lacking else ([], 0, [])
        moved.moved += new
        moved.rejected += refused
        cache.note_pack(name, installed, complete=not refused)
    packs = cache.packs()
    unpacked = set(cache.unpacked([packs[n][0] for n in names if n in packs]))
    here = cache.present(loose)  # one file per entry, as pushed before packs existed
    moved.already = cache.count() - moved.moved - len(unpacked) + len(here.keys() & unpacked)
    todo = sorted(loose.keys() - here.keys())

    def download(key: str) -> tuple[bytes, Any, str | None]:
        try:
            raw = fs.cat_file(loose[key])
        except Exception as e:  # one unreadable object is reported; the others still come
            return b"", None, f"download failed: {type(e).__name__}"
        return raw, *judge(raw, key)

    good = []
    with ThreadPoolExecutor(max(1, jobs)) as pool:
        for key, (raw, entry, problem) in zip(todo, pool.map(download, todo), strict=True):
            if problem:
                moved.rejected.append((key, f"remote object {loose[key]} refused: {problem}"))
            else:
                good.append((key, raw, entry))
    moved.moved += cache.insert(good)
    return moved


def _install_pack(cache: RequestCache, fs: Any, path: str, keys: list[str], lacking: set[str],
                  name: str) -> tuple[list[str], int, list[tuple[str, str]]]:
    """Install the entries of one remote pack this cache lacks, a batch at a time as the pack is read: (keys
    installed, how many were new, (key, why) refused). A pack past the limits is one refusal, under its name."""
    installed, refused, batch, size, done, new = [], [], [], 0, 0, 0

    def flush() -> None:
        nonlocal size, new
        new += cache.insert(batch)
        installed.extend(key for key, _, _ in batch)
        batch.clear()
        size = 0

    try:
        for i, line in enumerate(pack_lines(fs, path)):
            done = i + 1
            if i >= len(keys) or keys[i] not in lacking:
                continue
            entry, problem = judge(line, keys[i])
            if problem:
                refused.append((keys[i], f"in remote pack {path}, refused: {problem}"))
                continue
            batch.append((keys[i], line, entry))
            size += len(line)
            if size >= INSTALL_BATCH:
                flush()
        why = f"remote pack {path} holds no entry for it"
    except PackRefused as e:  # a gzip bomb: one line for the whole pack (its lines read so far were not kd's either)
        flush()
        left = len(lacking) - len(installed)
        return installed, new, [(name, f"remote pack {path} refused: {e}; {left} of its entries not installed")]
    except Exception as e:  # unreadable or not gzip: its keys are refused, the other packs still come
        why = f"remote pack {path} unreadable ({type(e).__name__})"
    flush()
    refused += [(key, why) for key in keys[done:] if key in lacking]
    return installed, new, refused


def _pull_files(kind: Kind, fs: Any, there: dict[str, str], jobs: int) -> Moved:
    local = local_entries(kind)
    moved = Moved(kind.name, already=len(there.keys() & local.keys()))

    def download(key: str) -> str | None:
        try:
            raw = fs.cat_file(there[key])
        except Exception as e:  # one unreadable object is reported; the others still come
            return f"download failed: {type(e).__name__}"
        if problem := kind.check(raw, key):
            return problem
        _install(raw, kind.local / key[:2] / f"{key}{os.path.splitext(there[key])[1]}")
        return None

    todo = sorted(there.keys() - local.keys())
    with ThreadPoolExecutor(max(1, jobs)) as pool:
        for key, problem in zip(todo, pool.map(download, todo), strict=True):
            if problem:
                moved.rejected.append((key, f"remote object {there[key]} refused: {problem}"))
            else:
                moved.moved += 1
    return moved
