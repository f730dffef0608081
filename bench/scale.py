"""A labeling stage at 1k / 10k / 100k requests (1M with --million), side by side with a bare client.

Every figure is the CPU time (user + system) and peak RSS of one process, measured with wait4, so the fake
OpenAI-compatible server (its own process on loopback, zero latency, answers as long as the prompts, ~370
characters) is not counted. For each size, in one run:

  bare      asyncio + httpx, 16 requests in flight, reading the seed JSONL and appending each answer to a JSONL
            file as it arrives: what a script without kd costs.
  kd        `python stages/labeling.py qa` on an empty request cache: forecast, requests, cache writes, records
            with provenance, the dataset written by id, card and metrics. At 1M (and with --in-process) the
            teacher is answered in the stage's process by the fake server's own answer function: no HTTP, no
            bare side; the figure is kd's own cost and memory.
  rebuild   the same stage again with every answer cached (data/qa removed first, as `dvc repro -f` does).
  read      baselines for the rebuild: (a) parsing the bare client's answers JSONL; (b) `kd cache verify`,
            which reads and checks every cache entry (what any reader of the cache must do to trust it).
  status    `kd status` after editing one seed row, in a git + DVC project whose lock matches the build:
            must forecast exactly 1 new request.

    python bench/scale.py                       # 1k, 10k, 100k: about 10 minutes on 2 cores
    python bench/scale.py --sizes 1000 10000    # quicker
    python bench/scale.py --million             # adds 1M, its teacher answered in-process (about 30 minutes)
    python bench/scale.py --in-process          # every size without HTTP: kd's own cost and memory

Writes bench/results/scale.json (scale-<sizes>.json for other sizes).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SERVER = """
import sys, time
sys.path.insert(0, sys.argv[1])
from fake_openai import FakeOpenAI
s = FakeOpenAI().start()
print(s.url, flush=True)
time.sleep(86400)
"""
CONCURRENCY = 16
MAX_TOKENS = 256
WORDS = ("model", "teacher", "student", "answer", "explain", "carefully", "data", "record", "prompt", "token", "reason",
         "step", "value", "compute", "summary", "detail", "example", "method", "result", "careful", "short", "clear",
         "number", "list", "table", "write", "describe")


def seeds(path: Path, n: int) -> None:
    """n instructions of ~370 characters, deterministic."""
    rng = random.Random(0)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            text = f"Task {i}: " + " ".join(rng.choice(WORDS) for _ in range(52))
            f.write(json.dumps({"id": f"r{i}", "instruction": text[:370], "category": "bench"}) + "\n")


def project(root: Path, n: int, url: str) -> None:
    import yaml

    root.mkdir(parents=True)
    for d in ("prompts", "stages"):
        shutil.copytree(ROOT / d, root / d)
    (root / "seeds").mkdir()
    seeds(root / "seeds/big.jsonl", n)
    teacher = {"backend": "openai", "base_url": url, "model": "fake", "api_key_env": None,
               "concurrency": CONCURRENCY, "timeout_s": 30, "max_attempts": 3, "backoff_s": 0.05}
    dataset = {"method": "labeling", "teacher": "fake", "inputs": [{"seeds": "seeds/big.jsonl"}],
               "template": "prompts/labeling/answer.jinja", "sampling": {"temperature": 0.0, "max_tokens": MAX_TOKENS}}
    (root / "params.yaml").write_text(yaml.safe_dump({"project": "kd-scale", "teachers": {"fake": teacher},
                                                      "datasets": {"qa": dataset}}, sort_keys=False))
    sys.path.insert(0, str(ROOT))
    from kd.config import load_params
    from kd.pipeline.spec import dvc_yaml

    (root / "dvc.yaml").write_text(dvc_yaml(load_params(root), root))
    (root / ".gitignore").write_text(".kd/\n")
    for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "b@example.com"],
                ["git", "config", "user.name", "bench"], ["dvc", "init", "-q"],
                ["dvc", "config", "core.analytics", "false"]):
        run(root, cmd)


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
            "OMP_NUM_THREADS": "1", "NO_COLOR": "1"}


def run(root: Path, cmd: list[str]) -> str:
    exe = str(BIN / cmd[0]) if (BIN / cmd[0]).exists() else cmd[0]
    r = subprocess.run([exe, *cmd[1:]], cwd=root, capture_output=True, text=True, env=env())
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed in {root}:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return r.stdout


def measure(root: Path, cmd: list[str], keep: dict[str, str] | None = None) -> dict[str, Any]:
    """CPU seconds, wall seconds and peak RSS of one child process (wait4: its own figures only)."""
    exe = str(BIN / cmd[0]) if (BIN / cmd[0]).exists() else cmd[0]
    start = time.monotonic()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([exe, *cmd[1:]], cwd=root, stdout=out, stderr=err, env=env())
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    if keep is not None:
        keep["stdout"] = stdout
    return {"cpu_s": round(usage.ru_utime + usage.ru_stime, 3), "wall_s": round(time.monotonic() - start, 3),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "last_line": stdout.strip().splitlines()[-1][:300]
            if stdout.strip() else ""}


def edit_row(path: Path, n: int) -> None:
    """Change row n's instruction, streaming: this process must not grow (a child's peak RSS as wait4 reports it
    starts from the size of the process that forked it)."""
    with open(path, encoding="utf-8") as f, open(path.with_suffix(".tmp"), "w", encoding="utf-8") as out:
        for i, line in enumerate(f):
            if i == n:
                row = json.loads(line)
                row["instruction"] = row["instruction"][:-8] + " (edited)"
                line = json.dumps(row) + "\n"
            out.write(line)
    os.replace(path.with_suffix(".tmp"), path)


def disk_bytes(path: Path) -> tuple[int, int]:
    """(bytes allocated on disk, bytes of content) under `path`."""
    allocated = content = 0
    for p in path.rglob("*"):
        if p.is_file():
            st = p.stat()
            allocated += st.st_blocks * 512
            content += st.st_size
    return allocated, content


# --------------------------------------------------------------------------------------------- children


async def _bare(url: str, seeds_file: Path, out_file: Path) -> None:
    import httpx

    source = open(seeds_file, encoding="utf-8")  # noqa: SIM115 (read by the workers, closed below)
    rows = (json.loads(line) for line in source)
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    with open(out_file, "w", encoding="utf-8") as out:
        async with httpx.AsyncClient(base_url=url.rstrip("/") + "/", limits=limits, timeout=30) as client:

            async def worker() -> None:
                for row in rows:
                    body = {"model": "fake", "messages": [{"role": "user", "content": row["instruction"]}],
                            "temperature": 0.0, "max_tokens": MAX_TOKENS}
                    r = await client.post("chat/completions", json=body)
                    r.raise_for_status()
                    data = r.json()
                    out.write(json.dumps({"id": row["id"], "text": data["choices"][0]["message"]["content"],
                                          "usage": data["usage"]}) + "\n")

            await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    source.close()


def child_inproc(root: Path) -> None:
    """The labeling stage with the teacher answered in this process (the fake server's answer function, no HTTP):
    kd's own cost and memory at sizes where a million HTTP requests would take hours of the client's CPU."""
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    from fake_openai import FakeOpenAI

    from kd.elicit.build import build_dataset
    from kd.elicit.labeling import label
    from kd.runtime.openai import OpenAITeacher, parse_completion

    fake = FakeOpenAI()

    def generate(self: OpenAITeacher, items: Any, on_result: Any) -> None:
        for key, request in items:
            body = json.dumps(fake.completion(self.body(key, request))).encode()
            on_result(key, parse_completion(body, self.endpoint))

    OpenAITeacher.generate = generate  # type: ignore[method-assign]
    os.chdir(root)
    print(build_dataset("qa", "labeling", label, Path(".")))


def child_read(answers: Path) -> None:
    with open(answers, encoding="utf-8") as f:
        print(sum(1 for line in f if json.loads(line)["text"]))


# ------------------------------------------------------------------------------------------------- main


def one_size(base: Path, n: int, url: str, http: bool) -> dict[str, Any]:
    """`http`: kd and the bare client against the server; else kd with the teacher answered in-process (no bare
    side: the figure is kd's own cost and memory)."""
    root = base / f"p{n}"
    project(root, n, url)
    py = str(Path(sys.executable))
    if http:
        bare = measure(root, [py, __file__, "--child", "bare", "--url", url, str(root / "seeds/big.jsonl"),
                              str(base / f"bare{n}.jsonl")])
        kd = measure(root, [py, "stages/labeling.py", "qa"])
    else:
        bare = None
        kd = measure(root, [py, __file__, "--child", "inproc", str(root)])
        answers = root / "data/qa/records.jsonl"  # the answers as a JSONL file, for the reading baseline
        with open(answers, encoding="utf-8") as f, open(base / f"bare{n}.jsonl", "w", encoding="utf-8") as out:
            for line in f:
                rec = json.loads(line)
                out.write(json.dumps({"id": rec["id"], "text": rec["completion"][0]["content"],
                                      "usage": rec["provenance"]["requests"][0]["usage"]}) + "\n")
    allocated, content = disk_bytes(root / ".kd/cache")
    data_allocated, data_content = disk_bytes(root / "data/qa")
    shutil.rmtree(root / "data/qa")
    rebuild = measure(root, [py, "stages/labeling.py", "qa"])
    read_jsonl = measure(root, [py, __file__, "--child", "read", str(base / f"bare{n}.jsonl")])
    verify = measure(root, ["kd", "cache", "verify"])
    # a lock that matches the build, then one seed row edited: `kd status` must say 1 new request
    run(root, [py, "stages/params.py"])
    run(root, ["dvc", "commit", "-f", "-q"])
    run(root, ["git", "add", "-A"])
    run(root, ["git", "commit", "-q", "-m", "built"])
    edit_row(root / "seeds/big.jsonl", n // 2)
    said: dict[str, str] = {}
    status = measure(root, ["kd", "status", "--json"], said)
    forecast = next(s["forecast"] for s in json.loads(said["stdout"])["stages"] if s["stage"] == "qa")
    if (forecast["new"], forecast["cached"]) != (1, n - 1):
        raise SystemExit(f"kd status after a one-row edit forecast {forecast['new']} new, {forecast['cached']} cached")
    shutil.rmtree(root)
    per_1k = 1000 / n
    sides = (("bare", bare), ("kd", kd), ("rebuild", rebuild), ("read_answers_jsonl", read_jsonl),
             ("cache_verify", verify))
    return {
        "n": n, "teacher": "http" if http else "in-process (no HTTP)",
        "bare": bare, "kd": kd, "rebuild": rebuild, "read_answers_jsonl": read_jsonl, "cache_verify": verify,
        "status_after_edit": status,
        "cache_disk_bytes_per_record": round(allocated / n), "cache_content_bytes_per_record": round(content / n),
        "dataset_bytes_per_record": round(data_content / n),
        "cpu_s_per_1k": {k: round(v["cpu_s"] * per_1k, 3) for k, v in sides if v is not None},
        "ratios": {"kd_over_bare": round(kd["cpu_s"] / bare["cpu_s"], 3) if bare else None,
                   "rebuild_over_read_jsonl": round(rebuild["cpu_s"] / read_jsonl["cpu_s"], 2),
                   "rebuild_over_verify": round(rebuild["cpu_s"] / verify["cpu_s"], 2)},
    }


def table(results: list[dict[str, Any]]) -> str:
    rows = ["| N | bare CPU s/1k | kd CPU s/1k | kd / bare | rebuild s/1k | read JSONL s/1k | verify s/1k | "
            "rebuild / verify | peak RSS bare / kd / rebuild MB | status after edit CPU s, MB | cache disk B/rec |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        c, q = r["cpu_s_per_1k"], r["ratios"]
        bare = (f"{c['bare']:.2f} | {c['kd']:.2f} | {q['kd_over_bare']:.2f}" if r["bare"] else
                f"— | {c['kd']:.2f} (in-process teacher) | —")
        rss = f"{r['bare']['peak_rss_mb']:.0f}" if r["bare"] else "—"
        rows.append(f"| {r['n']:,} | {bare} | {c['rebuild']:.3f} | "
                    f"{c['read_answers_jsonl']:.3f} | {c['cache_verify']:.3f} | {q['rebuild_over_verify']:.2f} | "
                    f"{rss} / {r['kd']['peak_rss_mb']:.0f} / {r['rebuild']['peak_rss_mb']:.0f}"
                    f" | {r['status_after_edit']['cpu_s']:.1f}, {r['status_after_edit']['peak_rss_mb']:.0f} | "
                    f"{r['cache_disk_bytes_per_record']} ({r['cache_content_bytes_per_record']} content) |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 100_000])
    ap.add_argument("--million", action="store_true", help="add a 1,000,000-request run (teacher answered "
                    "in-process: a million HTTP requests cost the client over an hour of CPU on each side)")
    ap.add_argument("--in-process", action="store_true", help="answer the teacher in-process at every size")
    ap.add_argument("--child", choices=["bare", "read", "inproc"], help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    ap.add_argument("files", nargs="*", help=argparse.SUPPRESS)
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.child == "bare":
        asyncio.run(_bare(args.url, Path(args.files[0]), Path(args.files[1])))
        return
    if args.child == "read":
        child_read(Path(args.files[0]))
        return
    if args.child == "inproc":
        child_inproc(Path(args.files[0]))
        return
    sizes = args.sizes + ([1_000_000] if args.million else [])
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(ROOT / "tests")], stdout=subprocess.PIPE, text=True)
    results = []
    try:
        url = server.stdout.readline().strip()
        with tempfile.TemporaryDirectory(prefix="kd-scale-") as tmp:
            for n in sizes:
                results.append(one_size(Path(tmp), n, url, http=not args.in_process and n < 1_000_000))
                print(table(results[-1:]).splitlines()[-1], flush=True)
    finally:
        server.kill()
    print(table(results))
    result = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
              "loadavg_at_end": os.getloadavg(), "concurrency": CONCURRENCY, "results": results}
    default = "scale.json" if sizes == [1000, 10_000, 100_000] else f"scale-{'-'.join(map(str, sizes))}.json"
    out = Path(args.out) if args.out else ROOT / "bench/results" / default
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
