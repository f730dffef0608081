"""The packed request cache (one SQLite database, kd/cache/store.py) against one file per entry, side by side.

The baseline is the layout kd used before: `<key[:2]>/<key>.json`, each written through mkstemp + rename, read
back and checked with the same `check_entry`; shared by uploading and downloading one object per entry through
the same DVC filesystem with 8 threads (what `kd cache push/pull` did). Both sides store the same entries (about
1.3 KB each, shaped like real ones), in one process:

- put: CPU per 1k answers persisted (each committed / renamed on its own, as a build does);
- get: CPU per 1k entries read and verified;
- present: CPU to learn the token counts of every key (the forecast's question: columns vs reading every file);
- disk: bytes on disk (st_blocks, like `du`) per byte of the entries themselves;
- push / pull: wall seconds to move every entry to / from a local directory DVC remote.

    python bench/cache.py            # 1k, 10k, 100k entries: about 6 minutes on 2 busy cores
    python bench/cache.py --quick    # 1k, 10k

Writes bench/results/cache.json (cache-quick.json for --quick).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kd.cache import share  # noqa: E402
from kd.cache.store import RequestCache, check_entry, make_entry, parse_json, request_key  # noqa: E402
from kd.paths import CACHE_DIR  # noqa: E402

WORDS = ["the", "of", "and", "to", "in", "is", "that", "it", "for", "as", "with", "was", "on", "be", "by", "this",
         "are", "or", "from", "at", "an", "which", "not", "have", "but", "can", "step", "answer", "because", "total",
         "each", "number", "first", "then", "so", "we", "find", "per", "cent", "half", "twice", "remaining"]


def answers(n: int) -> list[tuple[str, dict, dict]]:
    rnd = random.Random(0)
    out = []
    for i in range(n):
        question = " ".join(rnd.choices(WORDS, k=40)) + f" ({i})?"
        req = {"backend": "openai", "teacher": {"backend": "openai", "base_url": "https://api.example.com/v1",
                                                "model": "teacher-large"},
               "messages": [{"role": "system", "content": "You are a careful teacher. Explain, then answer."},
                            {"role": "user", "content": question}],
               "sampling": {"temperature": 0.7, "top_p": 1.0, "max_tokens": 512, "stop": []},
               "sample_index": 0, "response_format": None}
        resp = {"text": " ".join(rnd.choices(WORDS, k=125)), "finish_reason": "stop",
                "usage": {"prompt_tokens": 60, "completion_tokens": 150}}
        out.append((request_key(req), req, resp))
    return out


class Files:
    """The baseline: one JSON file per entry, written through a temporary file and a rename."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory

    def put(self, key: str, request: dict, response: dict) -> None:
        path = self.dir / key[:2] / f"{key}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{key[:16]}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(make_entry(key, request, response))
        os.replace(tmp, path)

    def get(self, key: str) -> dict | None:
        try:
            raw = (self.dir / key[:2] / f"{key}.json").read_bytes()
        except FileNotFoundError:
            return None
        return None if check_entry(raw, key) else parse_json(raw)["response"]

    def present(self, keys: list[str]) -> dict[str, tuple[int, int, int]]:
        out = {}
        for key in keys:
            try:
                entry = json.loads((self.dir / key[:2] / f"{key}.json").read_bytes())
            except FileNotFoundError:
                continue
            usage = entry["response"]["usage"]
            chars = sum(len(m.get("content") or "") for m in entry["request"]["messages"])
            out[key] = (chars, usage["prompt_tokens"], usage["completion_tokens"])
        return out

    def files(self) -> list[Path]:
        return sorted(self.dir.glob("*/*.json"))


def disk(paths: list[Path]) -> int:
    return sum(p.stat().st_blocks * 512 for p in paths)


def project(root: Path, remote: Path) -> Path:
    root.mkdir(parents=True)
    for cmd in (("git", "init", "-q"), ("dvc", "init", "-q"), ("dvc", "remote", "add", "-d", "store", str(remote))):
        subprocess.run(cmd, cwd=root, check=True, capture_output=True, env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
    return root


def remote_fs(root: Path):
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        remote = repo.cloud.get_remote()
    return remote.fs, remote.fs.join(remote.path, "baseline")


def files_push(store: Files, root: Path) -> int:
    fs, base = remote_fs(root)
    try:
        there = {os.path.basename(p) for p in fs.find(base)}
    except FileNotFoundError:
        there = set()
    todo = [p for p in store.files() if p.name not in there and not check_entry(p.read_bytes(), p.stem)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda p: fs.put_file(str(p), fs.join(base, p.parent.name, p.name)), todo))
    return len(todo)


def files_pull(store: Files, root: Path) -> int:
    fs, base = remote_fs(root)
    objects = list(fs.find(base))

    def one(path: str) -> None:
        key = os.path.basename(path)[:-5]
        raw = fs.cat_file(path)
        if not check_entry(raw, key):
            target = store.dir / key[:2] / f"{key}.json"
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent)
            with os.fdopen(fd, "wb") as f:
                f.write(raw)
            os.replace(tmp, target)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, objects))
    return len(objects)


def cpu(fn) -> tuple[float, object]:
    t = time.process_time()
    result = fn()
    return time.process_time() - t, result


def wall(fn) -> tuple[float, object]:
    t = time.perf_counter()
    result = fn()
    return time.perf_counter() - t, result


def run(n: int, work: Path) -> dict:
    data = answers(n)
    keys = [k for k, _, _ in data]
    entry_bytes = sum(len(make_entry(*a)) for a in data)
    remote = work / "remote"
    a, b = project(work / "a", remote), project(work / "b", remote)
    packed, files = RequestCache(a / CACHE_DIR), Files(work / "files-a")
    row: dict = {"entries": n, "entry_bytes": round(entry_bytes / n)}
    for name, store in (("files", files), ("packed", packed)):  # alternate order across phases
        row[f"put_{name}_ms_per_1k"] = cpu(lambda s=store: [s.put(*x) for x in data])[0] / n * 1e6
    for name, store in (("packed", packed), ("files", files)):
        s, got = cpu(lambda s=store: [s.get(k) for k in keys])
        assert all(g is not None for g in got), name
        row[f"get_{name}_ms_per_1k"] = s / n * 1e6
    for name, store in (("files", files), ("packed", packed)):
        s, got = cpu(lambda s=store: s.present(keys))
        assert len(got) == n, name
        row[f"present_{name}_s"] = s
    packed.close()
    with sqlite3.connect(packed.db) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    row["disk_packed_per_byte"] = disk([p for p in packed.dir.iterdir() if p.is_file()]) / entry_bytes
    row["disk_files_per_byte"] = (disk(files.files()) + disk(list(files.dir.iterdir()))) / entry_bytes
    row["push_files_s"], moved = wall(lambda: files_push(files, a))
    assert moved == n
    row["push_packed_s"], t = wall(lambda: share.push(a))
    assert t.kinds[0].moved == n and not t.rejected
    row["pull_packed_s"], t = wall(lambda: share.pull(b))
    assert t.kinds[0].moved == n and not t.rejected, t
    row["pull_files_s"], moved = wall(lambda: files_pull(Files(work / "files-b"), b))
    assert moved == n
    row["push_packed_again_s"], t = wall(lambda: share.push(a))
    assert t.kinds[0].moved == 0
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1k and 10k entries only")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    sizes = (1_000, 10_000) if args.quick else (1_000, 10_000, 100_000)
    rows = []
    for n in sizes:
        work = Path(tempfile.mkdtemp(prefix=f"kd-bench-cache-{n}-"))
        try:
            rows.append(run(n, work))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        r = rows[-1]
        print(f"{n:>7} entries ({r['entry_bytes']} B each)      files      packed   ratio")
        for label, f, p in (("put, CPU ms per 1k", "put_files_ms_per_1k", "put_packed_ms_per_1k"),
                            ("get+verify, CPU ms per 1k", "get_files_ms_per_1k", "get_packed_ms_per_1k"),
                            ("present() of all keys, CPU s", "present_files_s", "present_packed_s"),
                            ("disk bytes per entry byte", "disk_files_per_byte", "disk_packed_per_byte"),
                            ("push to a local remote, s", "push_files_s", "push_packed_s"),
                            ("pull from it, s", "pull_files_s", "pull_packed_s")):
            print(f"  {label:<32} {r[f]:>9.3f} {r[p]:>10.3f} {r[f] / r[p]:>7.1f}x")
        print(f"  second push (nothing new), s {r['push_packed_again_s']:>25.3f}", flush=True)
    out = args.out or ROOT / "bench" / "results" / ("cache-quick.json" if args.quick else "cache.json")
    out.write_text(json.dumps({"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                               "cpus": os.cpu_count(), "loadavg": os.getloadavg(), "python": platform.python_version(),
                               "sqlite": sqlite3.sqlite_version, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
