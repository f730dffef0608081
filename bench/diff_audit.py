"""`kd diff` and `kd audit` on a synthetic 1M-record dataset pair, each timed next to a baseline.

The pair looks like one real template edit (generated deterministically, no teacher):

  data/questions   N + N/100 prompt-only records (expansion-shaped provenance: template, teacher, seed)
  old/synthetic    answers to questions[0 : N]                       (labeling-shaped: parent = a question)
  data/synthetic   answers to questions[N/100 : N + N/100]: 1% removed, 1% added, and the answer template
                   edited so that 5% of the records got a new request and answer; the other 94% keep their
                   content but carry the new template hash in their provenance, as after a real edit

Timed (best of --repeat; wall clock and CPU seconds, since the machine may be shared; on a 50k pair and
on the 1M pair):
  kd diff          `kd diff old/synthetic data/synthetic --json` in a fresh interpreter, end to end
  objects          the obvious approach: json.loads every line of both sides into dicts keyed by input
                   identity, then compare record by record (no output), in-process
  dvc diff         what `dvc diff` computes for the pair: the md5 of each records file. It says
                   "modified", nothing about which records or why (DVC issue #770)
  kd audit         `kd audit <id prefix>` of a changed record: synthetic -> questions -> seed, end to end

    python bench/diff_audit.py            # 50k (all rows), then 1M (no objects baseline): ~3 minutes
    python bench/diff_audit.py --quick    # the 50k pair only

The objects baseline keeps every record of both sides as Python dicts (about 20 GB at 1M), so it runs on
the 50k pair only. Writes bench/results/diff_audit.json (diff_audit-<n>.json for other sizes).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from kd.provenance.lineage import identity  # noqa: E402

TEACHER = '{"backend": "openai", "model": "teacher-m", "revision": null}'
SI = "prompts/expansion/self_instruct.jinja"
ANSWER = "prompts/labeling/answer.jinja"
PERSONA = "prompts/common/persona.jinja"


def h(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


T_SI, T_PERSONA, T_OLD, T_NEW = h("self_instruct v1"), h("persona v1"), h("answer v1"), h("answer v2")
TOPICS = ["rivers", "fractions", "photosynthesis", "the printing press", "recursion", "tides", "inflation",
          "volcanoes", "sorting algorithms", "the water cycle", "prime numbers", "electric circuits"]


def question(i: int) -> tuple[str, str, str]:
    """(id, text, line) of question i."""
    cat = f"c{i % 7}"
    text = f"Question {i}: explain {TOPICS[i % len(TOPICS)]} to a student, with one example."
    qid = h(f"{cat}|{text}")
    line = (f'{{"category": "{cat}", "id": "{qid}", "prompt": [{{"content": "{text}", "role": "user"}}], '
            f'"provenance": {{"filters": [], "method": "expansion", "parents": [], "requests": [{{"finish_reason": '
            f'"stop", "key": "{h(f"qk{i}")}", "sample_index": {i}, "sampling": {{"max_tokens": 64, "stop": [], '
            f'"temperature": 0.9, "top_p": 0.95}}, "teacher": {TEACHER}, "template": {{"includes": {{}}, '
            f'"path": "{SI}", "sha256": "{T_SI}"}}, "usage": {{"completion_tokens": 17, "prompt_tokens": 93}}}}], '
            f'"seeds": [{{"file": "seeds/synthetic.jsonl", "id": "seed-{i % 5000:05d}"}}], "stage": "questions"}}}}')
    return qid, text, line


def answer(i: int, qid: str, text: str, version: int) -> tuple[str, str]:
    """(id, line) of the answer to question i; version 2 is the edited template's answer."""
    cat = f"c{i % 7}"
    reply = f"Answer{' (revised)' if version == 2 else ''} to question {i}: {TOPICS[i % len(TOPICS)]} work like this."
    sid = h(f"{cat}|{reply}|{text}")
    key = h(f"ak{i}v{version}") if version == 2 else h(f"ak{i}")
    line = (f'{{"category": "{cat}", "completion": [{{"content": "{reply}", "role": "assistant"}}], "id": "{sid}", '
            f'"prompt": [{{"content": "{text}", "role": "user"}}], "provenance": {{"filters": [{{"detail": "stop", '
            f'"name": "finish_reason", "passed": true}}], "method": "labeling", "parents": [{{"dataset": '
            f'"questions", "id": "{qid}"}}], "requests": [{{"finish_reason": "stop", "key": "{key}", '
            f'"sample_index": 0, "sampling": {{"max_tokens": 256, "stop": [], "temperature": 0.0, "top_p": 1.0}}, '
            f'"teacher": {TEACHER}, "template": {{"includes": {{"{PERSONA}": "{T_PERSONA}"}}, "path": "{ANSWER}", '
            f'"sha256": "{T_NEW if version else T_OLD}"}}, "usage": {{"completion_tokens": 41, '
            f'"prompt_tokens": 58}}}}], "seeds": [], "stage": "synthetic"}}, "reference": ""}}')
    return sid, line


def changed(i: int) -> bool:
    return int(h(f"edit{i}")[:8], 16) % 20 == 0  # 5%, spread evenly, deterministic


def write(directory: Path, name: str, rows: list[tuple[str, str]], template: str | None) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    rows.sort()
    (directory / "records.jsonl").write_text("".join(line + "\n" for _, line in rows))
    manifest = {"name": name, "method": "labeling", "format": "jsonl", "records": len(rows), "rejected": {},
                "files": {"records": "records.jsonl", "rejected": "rejected.jsonl"},
                "fingerprint": h("\n".join(i for i, _ in rows)), "teacher": json.loads(TEACHER),
                "templates": [{"path": ANSWER, "sha256": template}] if template else []}
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    (directory / "rejected.jsonl").write_text("")


def generate(work: Path, n: int) -> dict[str, Any]:
    """Write the three datasets one at a time (each is sorted in memory, then freed)."""
    extra = n // 100
    write(work / "data" / "questions", "questions", [(q, line) for q, _, line in map(question, range(n + extra))], None)
    (work / "old").mkdir()
    os.symlink(work / "data" / "questions", work / "old" / "questions")  # the same parents on both sides
    write(work / "old" / "synthetic", "synthetic", [answer(i, *question(i)[:2], 0) for i in range(n)], T_OLD)
    versions = [2 if i < n and changed(i) else 1 for i in range(extra, n + extra)]
    new = [answer(i, *question(i)[:2], v) for i, v in zip(range(extra, n + extra), versions, strict=True)]
    probe = next(sid for (sid, _), v in zip(new, versions, strict=True) if v == 2)
    write(work / "data" / "synthetic", "synthetic", new, T_NEW)
    del new
    (work / "seeds").mkdir()
    (work / "seeds" / "synthetic.jsonl").write_text(
        "".join(json.dumps({"id": f"seed-{i:05d}", "instruction": f"Explain topic {i}."}) + "\n" for i in range(5000)))
    return {"records": n, "removed": extra, "added": extra, "changed": versions.count(2), "probe": probe,
            "bytes": (work / "data/synthetic/records.jsonl").stat().st_size}


CPU: dict[str, float] = {}  # CPU seconds of the last timed call (this process and its children)


def timed(fn: Any, repeat: int, label: str = "") -> tuple[float, Any]:
    """Best wall time of `repeat` calls; CPU time goes to CPU[label] (less sensitive to a busy machine)."""
    best, out = float("inf"), None
    for _ in range(repeat):
        r0, c0 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
        r1, c1 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        CPU[label] = sum(getattr(e, f) - getattr(s, f) for s, e in ((r0, r1), (c0, c1)) for f in ("ru_utime", "ru_stime"))
    return best, out


def kd_cli(work: Path, *args: str) -> dict[str, Any]:
    r = subprocess.run([sys.executable, "-m", "kd.cli", "--root", str(work), *args, "--json"], cwd=work,
                       capture_output=True, text=False, check=False)
    if r.returncode != 0:
        raise SystemExit(f"kd {' '.join(args)} failed:\n{r.stderr.decode()}")
    return json.loads(r.stdout)


def objects_baseline(work: Path) -> dict[str, int]:
    """Every record of both sides as a Python dict, keyed by input identity; parents by their identity."""
    def load(path: Path) -> list[dict[str, Any]]:
        with path.open(encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]

    parents = {r["id"]: r for r in load(work / "data/questions/records.jsonl")}

    def parent_identity(dataset: str, rid: str) -> str:
        return identity(parents[rid], parent_identity) if rid in parents else rid

    sides = [{identity(r, parent_identity): r for r in load(work / d / "synthetic/records.jsonl")} for d in ("old", "data")]
    old, new = sides
    both = old.keys() & new.keys()
    return {"added": len(new.keys() - old.keys()), "removed": len(old.keys() - new.keys()),
            "changed": sum(old[k]["id"] != new[k]["id"] for k in both)}


def md5_baseline(work: Path) -> bool:
    digests = []
    for d in ("old", "data"):
        m = hashlib.md5()
        with (work / d / "synthetic/records.jsonl").open("rb") as f:
            while chunk := f.read(1 << 22):
                m.update(chunk)
        digests.append(m.hexdigest())
    return digests[0] != digests[1]


def measure(n: int, repeat: int, baseline: bool) -> dict[str, Any]:
    """Generate a pair of n records a side, time every row, check kd's counts against the generator."""
    work = Path(tempfile.mkdtemp(prefix="kd-bench-diff-"))
    CPU.clear()
    try:
        t = time.perf_counter()
        truth = generate(work, n)
        gen_s = time.perf_counter() - t
        print(f"n={n:,}: generated ({truth['bytes'] / 1e6:.0f} MB a side) in {gen_s:.0f} s", flush=True)
        seconds: dict[str, float] = {}
        load = os.getloadavg()[0]
        seconds["kd diff"], report = timed(lambda: kd_cli(work, "diff", "old/synthetic", "data/synthetic"), repeat,
                                           "kd diff")
        c = report["counts"]
        correct = (c["changed"], c["added"], c["removed"]) == (truth["changed"], truth["added"], truth["removed"])
        seconds["dvc diff"], _ = timed(lambda: md5_baseline(work), repeat, "dvc diff")
        if baseline:
            seconds["objects"], base = timed(lambda: objects_baseline(work), 1, "objects")
            correct = correct and base == {k: truth[k] for k in ("added", "removed", "changed")}
        seconds["kd audit"], audit = timed(lambda: kd_cli(work, "audit", truth["probe"][:12]), repeat, "kd audit")
        steps = 1 + len(_chain(audit["lineage"])) + (1 if audit["seeds"] else 0)  # datasets, then the seed
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"n": n, "generate_s": round(gen_s, 2), "seconds": {k: round(v, 3) for k, v in seconds.items()},
            "cpu_seconds": {k: round(v, 3) for k, v in CPU.items()}, "load_average": round(load, 2),
            "counts": c, "truth": {k: v for k, v in truth.items() if k != "probe"}, "correct": correct,
            "causes": [[g["description"], g["records"]] for g in report["causes"]], "audit_steps": steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="records a side in the large pair")
    parser.add_argument("--repeat", type=int, default=1, help="timed runs per row (the best is kept)")
    parser.add_argument("--quick", action="store_true", help="only the small pair (n/20), with the baseline")
    args = parser.parse_args()
    # The objects baseline holds every record of both sides as dicts: ~20 GB at 1M, so it runs on n/20 only.
    runs = [measure(args.n // 20, args.repeat, baseline=True)]
    if not args.quick:
        runs.append(measure(args.n, args.repeat, baseline=False))
    small, large = runs[0], runs[-1]
    print()
    print(f"{'':<36} " + "".join(f"{r['n']:>15,}" for r in runs) + "   what it tells you")
    rows = [("kd diff (CLI, end to end)", "kd diff",
             f"changed/added/removed + causes, prompt and output diffs; "
             f"{large['counts']['provenance_only']:,} records with new provenance only"),
            ("objects baseline (json.loads, dicts)", "objects", "the same counts, no causes; small pair only (memory)"),
            ("dvc diff (md5 of both files)", "dvc diff", "'modified', nothing more"),
            ("kd audit <prefix> (CLI, end to end)", "kd audit", f"{large['audit_steps']} steps: record -> parent -> seed")]
    for label, key, what in rows:
        cells = "".join(f"{r['seconds'][key]:>7.2f}s {r['cpu_seconds'][key]:>6.2f}" if key in r["seconds"]
                        else f"{'-':>15}" for r in runs)
        print(f"{label:<36} {cells}   {what}")
    print(f"{'(wall, CPU seconds; load average at start)':<36} "
          + "".join(f"{'load ' + format(r['load_average'], '.1f'):>15}" for r in runs))
    if "objects" in small["seconds"]:
        print(f"\nat n={small['n']:,}: kd diff {small['seconds']['objects'] / small['seconds']['kd diff']:.1f}x faster "
              f"than the objects baseline; causes found: {large['causes']}")
    correct = all(r["correct"] for r in runs)
    print(f"counts match the generator: {correct}")
    result = {"date": datetime.date.today().isoformat(), "cpu_count": os.cpu_count(),
              "python": platform.python_version(), "runs": runs, "correct": correct}
    out = ROOT / "bench" / "results" / ("diff_audit.json" if not args.quick and args.n == 1_000_000
                                        else f"diff_audit-{args.n // 20 if args.quick else args.n}.json")
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")
    if not correct:
        sys.exit(1)


def _chain(node: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for parent in node["parents"] for p in [parent, *_chain(parent)]]


if __name__ == "__main__":
    main()
