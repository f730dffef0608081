"""CPU of kd's OpenAI-compatible client per 1k requests with `sniffio` importable vs missing, side by side.

httpcore tries `import sniffio` on every request to learn which async library runs it; when the package is
missing, each try searches every `sys.path` entry and fails. kd depends on sniffio (pyproject.toml) so the
import succeeds once and is cached. Here the "missing" side is emulated faithfully: a finder at the front of
`sys.meta_path` makes `import sniffio` do the same path search for a name that does not exist, then fail.

The fake OpenAI-compatible server runs in its own process on loopback (zero latency), so only the client's
CPU is counted (`time.process_time` of the client process). Sides alternate, three rounds each, to spread the
drift of a shared machine over both.

    python bench/http_client.py              # 2,000 requests a run, about 1 minute on 2 CPU cores
    python bench/http_client.py --n 500      # quicker

Writes bench/results/http_client.json.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.machinery
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SERVER = """
import sys, time
sys.path.insert(0, sys.argv[1])
from fake_openai import FakeOpenAI
s = FakeOpenAI().start()
print(s.url, flush=True)
time.sleep(3600)
"""


class _MissingSniffio:
    """`import sniffio` as it costs when the package is not installed: a full path search, then ImportError."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name == "sniffio":
            importlib.machinery.PathFinder.find_spec("sniffio_not_installed", None)
            raise ModuleNotFoundError("No module named 'sniffio'", name="sniffio")
        return None


def child(url: str, n: int, missing: bool) -> None:
    if missing:
        sys.modules.pop("sniffio", None)
        sys.meta_path.insert(0, _MissingSniffio())
    sys.path.insert(0, str(ROOT))
    from kd.cache.store import request_key
    from kd.config import OpenAITeacher as OpenAIConfig
    from kd.config import Sampling
    from kd.runtime.openai import OpenAITeacher

    cfg = OpenAIConfig(backend="openai", base_url=url, model="fake", api_key_env=None, concurrency=16)
    teacher = OpenAITeacher("bench", cfg)
    items = []
    for i in range(n):
        request = {"backend": "openai", "teacher": teacher.identity,
                   "messages": [{"role": "user", "content": f"What is {i} + {i}? Explain briefly."}],
                   "sampling": Sampling(max_tokens=32).model_dump(), "sample_index": 0, "response_format": None}
        items.append((request_key(request), request))
    answers: dict[str, dict] = {}
    start = time.process_time()
    teacher.generate(items, answers.__setitem__)
    cpu = time.process_time() - start
    assert len(answers) == n
    print(json.dumps({"cpu_s": cpu}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--child", choices=["with", "missing"])
    ap.add_argument("--url")
    args = ap.parse_args()
    if args.child:
        child(args.url, args.n, args.child == "missing")
        return
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(ROOT / "tests")], stdout=subprocess.PIPE, text=True)
    try:
        url = server.stdout.readline().strip()
        runs: dict[str, list[float]] = {"with": [], "missing": []}
        for _ in range(args.rounds):
            for side in ("missing", "with"):
                out = subprocess.run([sys.executable, __file__, "--child", side, "--url", url, "--n", str(args.n)],
                                     capture_output=True, text=True, check=True).stdout
                runs[side].append(json.loads(out.splitlines()[-1])["cpu_s"] / args.n * 1000)
    finally:
        server.kill()
    med = {side: statistics.median(v) for side, v in runs.items()}
    result = {"date": datetime.date.today().isoformat(), "cpu": platform.processor() or platform.machine(),
              "requests_per_run": args.n, "rounds": args.rounds,
              "cpu_s_per_1k": {side: [round(x, 3) for x in v] for side, v in runs.items()},
              "median_cpu_s_per_1k": {side: round(x, 3) for side, x in med.items()},
              "with_over_missing": round(med["with"] / med["missing"], 3)}
    print(f"client CPU per 1k requests (median of {args.rounds}): sniffio missing {med['missing']:.2f} s, "
          f"installed {med['with']:.2f} s: {med['with'] / med['missing']:.2f}x")
    out = ROOT / "bench/results/http_client.json"
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
