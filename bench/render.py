"""Rendering prompts: the bounded sandbox (kd.sandbox) against the kd of another git revision, same inputs.

Renders every template of the default project (prompts/**/*.jinja) over rows made from the seed files
(instructions, topics, attributes; demos and responses taken from other rows), as a stage renders them:
`Prompt.render` per row, the request hashed to its key (kd.cache.store.request_key). Each side runs in its own
process (the baseline from `git archive <rev> kd`), alternating which goes first; the figure is the best CPU time
(process_time: the watchdog thread's CPU counts, a busy machine's waiting does not) of `--repeats`; both must
give the same request keys, or the script exits 1 (a benign template renders the same bytes as before).

    python bench/render.py                       # against main, 3000 rows a template, ≈1 min on 2 idle cores
    python bench/render.py --against HEAD~3 --rows 500 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WORKER = r"""
import hashlib, json, sys, time
from pathlib import Path
from kd.cache.store import request_key
from kd.prompts import load_prompt

root, rows, repeats = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
seeds = [json.loads(l) for f in ("instructions", "eval_prompts") for l in (root / f"seeds/{f}.jsonl").open()]
topics = [json.loads(l) for l in (root / "seeds/topics.jsonl").open()]
attrs = [json.loads(l) for l in (root / "seeds/attributes.jsonl").open()]
def values(n):
    s, t, a = seeds[n % len(seeds)], topics[n % len(topics)], attrs[n % len(attrs)]
    text = s["instruction"] + f" (variant {n})"
    return {"instruction": text, "category": s.get("category", ""), "response": s.get("reference", "") * 3,
            "response_a": s.get("reference", ""), "response_b": text, "aspects": ["helpfulness", "accuracy"],
            "low": 1, "high": 5, "allow_prose": n % 2 == 0, "topic": t["topic"], "domain": t.get("domain", ""),
            "attribute": a["attribute"], "question": text, "demos": [x["instruction"] for x in seeds[n % 7:n % 7 + 4]]}
names = sorted(str(p.relative_to(root)) for p in (root / "prompts").rglob("*.jinja") if "common" not in p.parts)
prompts = [load_prompt(root, name, list(values(0))) for name in names]
inputs = [values(n) for n in range(rows)]
best, digest = float("inf"), hashlib.sha256()
for r in range(repeats):
    t = time.process_time()  # CPU of the process, the watchdog thread included: a loaded machine's waits are not counted
    for p in prompts:
        for v in inputs:
            key = request_key({"backend": "bench", "teacher": {"backend": "bench"}, "messages": p.render(**v),
                               "sampling": {}, "sample_index": 0, "response_format": None})
            if r == 0:
                digest.update(key.encode())
    best = min(best, time.process_time() - t)
print(json.dumps({"us_per_prompt": best / (len(prompts) * rows) * 1e6, "prompts": len(prompts) * rows,
                  "keys": digest.hexdigest()}))
"""


def run(kd_dir: Path, rows: int, repeats: int) -> dict:
    out = subprocess.run([sys.executable, "-c", WORKER, str(ROOT), str(rows), str(repeats)], check=True,
                         capture_output=True, text=True, cwd=ROOT, env={"PYTHONPATH": str(kd_dir), "PATH": "/usr/bin"})
    return json.loads(out.stdout)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--against", default="main", help="git revision of the baseline kd")
    ap.add_argument("--rows", type=int, default=3000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3, help="alternations of the two sides")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "archive", args.against, "kd"], cwd=ROOT, check=True, capture_output=True)
        with tarfile.open(fileobj=__import__("io").BytesIO(archive.stdout)) as tar:
            tar.extractall(tmp, filter="data")
        sides = {"kd": ROOT, args.against: Path(tmp)}
        results: dict[str, list[dict]] = {k: [] for k in sides}
        for r in range(args.rounds):
            for name in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
                results[name].append(run(sides[name], args.rows, args.repeats))
    best = {k: min(x["us_per_prompt"] for x in v) for k, v in results.items()}
    keys = {k: {x["keys"] for x in v} for k, v in results.items()}
    for k, v in best.items():
        print(f"{k:>12}: {v:6.1f} CPU-µs/prompt (best of {args.rounds} x {args.repeats}, {results[k][0]['prompts']} "
              f"prompts)")
    print(f"ratio kd / {args.against}: {best['kd'] / best[args.against]:.3f}; "
          f"request keys {'identical' if keys['kd'] == keys[args.against] else 'DIFFER'}")
    return 0 if keys["kd"] == keys[args.against] and len(keys["kd"]) == 1 else 1


if __name__ == "__main__":
    sys.exit(main())
