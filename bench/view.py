"""`kd view` on a synthetic 1M-record dataset: the index's one-time build, then the first page, a text search
and a record page through the app, each next to the naive way (kd.records.read_dataset, then Python).

The dataset (generated deterministically in a temporary directory, no teacher) looks like a labeling build:
~1 KB records (a prompt, a three-sentence-or-so answer, full provenance: request key, template hash, teacher,
sampling, usage, a seed), 1% rejections, 1,000 seed rows. Words come from a 5,000-word vocabulary with a Zipf
distribution, so a search for a common word hits most records and a rare word a few dozen.

Timed (wall clock; the machine may be shared, so CPU seconds are recorded too):
  build          DatasetIndex.open on a fresh project: one pass over records.jsonl into SQLite + FTS5
  first page     GET /data/big                    (best of --repeat, after one request opened the index)
  search rare    GET /data/big?q=<rare word>      (a word in ~0.005% of records)
  search common  GET /data/big?q=<common word>    (a word in most records: the page fills at once)
  search two     GET /data/big?q=<two words>      (all words must match)
  search prefix  GET /data/big?q=<4 letters>*     (every word starting so: SQLite merges their match lists)
  record page    GET /data/big/<id>               (the record's full lineage page, what `kd audit` knows)
  naive          read_dataset(data/big) (every record parsed, checked against its manifest), then the same
                 three answers in Python: records[:50], a substring scan of each record's content text, a scan
                 for the id

    python bench/view.py            # 1M records: ~4 minutes on 2 cores
    python bench/view.py --quick    # 100k records: ~30 s

Writes bench/results/view.json (view-quick.json for --quick).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from starlette.testclient import TestClient  # noqa: E402

from kd.provenance.lineage import content_text  # noqa: E402
from kd.records import canonical_json, content_id, fingerprint, read_dataset, sha256_text  # noqa: E402
from kd.view.app import create_app  # noqa: E402
from kd.view.index import VIEW_DIR, DatasetIndex  # noqa: E402

SEEDS = 1000
RARE = "zyzzogeton"  # put in 1 record of every 20,000


def words(n: int, rng: random.Random) -> list[str]:
    syllables = ["ka", "lo", "mi", "ne", "ra", "tu", "si", "po", "de", "gu", "ven", "tor", "al", "is", "or"]
    out: set[str] = set()
    while len(out) < n:
        out.add("".join(rng.choice(syllables) for _ in range(rng.randint(2, 4))))
    return sorted(out)


def generate(root: Path, n: int) -> dict[str, str]:
    """data/big/{records.jsonl, rejected.jsonl, manifest.json} and seeds/big.jsonl; returns probes to look up."""
    rng = random.Random(13)
    vocab = words(5000, rng)
    cum, total = [], 0.0
    for i in range(len(vocab)):
        total += 1 / (i + 1)
        cum.append(total)
    (root / "seeds").mkdir(parents=True)
    with (root / "seeds/big.jsonl").open("w") as f:
        for i in range(SEEDS):
            f.write(json.dumps({"id": f"s{i:05d}", "category": f"c{i % 8}", "instruction": f"seed {i}"}) + "\n")
    out = root / "data/big"
    out.mkdir(parents=True)
    tsha = sha256_text("template")
    ids = []
    mid = ""
    with (out / "records.jsonl").open("w") as f:
        for i in range(n):
            sample = rng.choices(vocab, cum_weights=cum, k=56)
            prompt = " ".join(sample[:12]) + "?"
            answer = ". ".join(" ".join(sample[j:j + 11]) for j in range(12, 56, 11)) + "."
            if i % 20_000 == 7:
                answer += f" {RARE}."
            seed = i % SEEDS
            rec = {"prompt": [{"role": "user", "content": prompt}],
                   "completion": [{"role": "assistant", "content": answer}], "category": f"c{seed % 8}"}
            rec["id"] = content_id(rec)
            key = sha256_text(canonical_json({"i": i}))
            rec["provenance"] = {
                "method": "labeling", "stage": "big", "parents": [], "filters": [],
                "seeds": [{"file": "seeds/big.jsonl", "id": f"s{seed:05d}"}],
                "requests": [{"key": key, "template": {"path": "prompts/labeling/explain.jinja", "sha256": tsha},
                              "teacher": {"backend": "openai", "model": "teacher-7b"},
                              "sampling": {"temperature": 0.7, "max_tokens": 256}, "sample_index": 0,
                              "usage": {"prompt_tokens": 40, "completion_tokens": 160}, "finish_reason": "stop"}]}
            f.write(json.dumps(rec, sort_keys=True) + "\n")
            ids.append(rec["id"])
            if i == n // 2:
                mid = rec["id"]
    with (out / "rejected.jsonl").open("w") as f:
        for i in range(n // 100):
            f.write(json.dumps({"reason": "length" if i % 3 else "refusal", "text": f"cut answer {i}"}) + "\n")
    manifest = {"name": "big", "method": "labeling", "format": "jsonl",
                "files": {"records": "records.jsonl", "rejected": "rejected.jsonl"},
                "fingerprint": fingerprint(ids), "records": n, "rejected": {"length": n // 100 - n // 300,
                                                                             "refusal": n // 300},
                "templates": [{"path": "prompts/labeling/explain.jinja", "sha256": tsha}],
                "teacher": {"backend": "openai", "model": "teacher-7b"}, "kd_version": "bench"}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return {"common": vocab[0], "two": f"{vocab[1]} {vocab[2]}", "rare": RARE, "prefix": f"{vocab[7][:4]}*",
            "id": mid}


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def timed(fn, repeat: int) -> dict[str, float]:
    best_wall, best_cpu = float("inf"), float("inf")
    for _ in range(repeat):
        w, c = time.perf_counter(), cpu()
        fn()
        best_wall, best_cpu = min(best_wall, time.perf_counter() - w), min(best_cpu, cpu() - c)
    return {"wall_s": round(best_wall, 4), "cpu_s": round(best_cpu, 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="100k records instead of 1M")
    ap.add_argument("-n", type=int, default=None, help="records (overrides --quick)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-naive", action="store_true", help="skip the read_dataset baseline (it holds every record)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    n = args.n or (100_000 if args.quick else 1_000_000)
    result: dict = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "records": n, "cpus": os.cpu_count(), "load_avg": os.getloadavg(), "python": platform.python_version(),
                    "machine": platform.processor() or platform.machine()}
    with tempfile.TemporaryDirectory(prefix="kd-bench-view-") as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        probes = generate(root, n)
        size = (root / "data/big/records.jsonl").stat().st_size
        result["dataset"] = {"generate_s": round(time.perf_counter() - t, 1), "records_bytes": size,
                             "bytes_per_record": round(size / n)}
        print(f"generated {n} records, {size / 1e6:.0f} MB ({size / n:.0f} B a record) in {result['dataset']['generate_s']} s")

        w, c = time.perf_counter(), cpu()
        DatasetIndex.open(root, root / "data/big").close()
        index_file = next((root / VIEW_DIR).glob("big-*.sqlite"))
        result["index"] = {"build_wall_s": round(time.perf_counter() - w, 1), "build_cpu_s": round(cpu() - c, 1),
                           "bytes": index_file.stat().st_size,
                           "bytes_vs_records": round(index_file.stat().st_size / size, 3)}
        print(f"index: built in {result['index']['build_wall_s']} s, {index_file.stat().st_size / 1e6:.0f} MB "
              f"({result['index']['bytes_vs_records']:.2f}x the records file)")

        client = TestClient(create_app(root), base_url="http://127.0.0.1")
        urls = {"first_page": "/data/big", "search_rare": f"/data/big?q={probes['rare']}",
                "search_common": f"/data/big?q={probes['common']}", "search_two": f"/data/big?q={probes['two'].replace(' ', '+')}",
                "search_prefix": f"/data/big?q={probes['prefix']}",
                "record_page": f"/data/big/{probes['id']}"}
        w = time.perf_counter()
        assert client.get(urls["first_page"]).status_code == 200
        result["first_request_after_build_s"] = round(time.perf_counter() - w, 4)
        app: dict = {}
        for name, url in urls.items():
            r = client.get(url)
            assert r.status_code == 200, (url, r.text[:300])
            app[name] = timed(lambda url=url: client.get(url), args.repeat)
            print(f"app   {name:<14} {app[name]['wall_s'] * 1000:8.1f} ms")
        assert probes["rare"] in client.get(urls["search_rare"]).text
        result["app"] = app

        if not args.no_naive:
            naive: dict = {}
            holder: dict = {}
            w, c = time.perf_counter(), cpu()
            holder["records"] = read_dataset(root / "data/big")[1]
            naive["load"] = {"wall_s": round(time.perf_counter() - w, 2), "cpu_s": round(cpu() - c, 2)}
            recs = holder["records"]
            naive["first_page"] = timed(lambda: recs[:50], args.repeat)
            naive["search_rare"] = timed(lambda: [r for r in recs if probes["rare"] in content_text(r)][:50], 1)
            naive["record_page"] = timed(lambda: next(r for r in recs if r["id"] == probes["id"]), args.repeat)
            naive["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
            for name in ("first_page", "search_rare", "record_page"):
                total = naive["load"]["wall_s"] + naive[name]["wall_s"]  # a page served the naive way reads first
                naive[name]["with_load_wall_s"] = round(total, 2)
                naive[name]["ratio_vs_app"] = round(total / app[name]["wall_s"], 1)
                print(f"naive {name:<14} {total:8.2f} s  ({naive[name]['ratio_vs_app']}x the app)")
            result["naive"] = naive
    out = Path(args.out) if args.out else REPO / "bench/results" / f"view{'-quick' if args.quick else ''}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
