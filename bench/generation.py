"""kd's generation throughput against calling the same backend directly, side by side in one process.

Speed is measured, not asserted (STYLE.md): every kd figure is printed next to a baseline run in the same
process, on the same requests, alternating sides so that drift on a shared machine hits both.

  a. local   LocalTeacher through kd's Asker (template rendering, request keys, cache lookups and writes)
             vs bare transformers: apply_chat_template, left padding, `model.generate` in the same batches
             (kd's order: sorted by prompt length), greedy and sampled. Plus a fully cached rerun.
  b. openai  OpenAITeacher through the Asker vs a bare asyncio + httpx client (and the openai SDK with
             max_retries=0) posting the same bodies at the same concurrency to a loopback fake server
             with a fixed latency.
  c. edit    record-level incrementality: label the 40 seed instructions, edit the template so that only
             the math category renders differently, label again: the share of requests that reach the
             teacher must equal the math share of the seeds, exactly.

    python bench/generation.py            # about 1.5 minutes on 2 idle CPU cores
    python bench/generation.py --quick    # under 40 s: 16 requests x 32 tokens, 128 HTTP requests

Writes bench/results/generation.json (generation-quick.json with --quick).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import gc
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # kd (also when not installed) and tests/fake_openai.py

from kd.cache.store import RequestCache  # noqa: E402
from kd.config import LocalTeacher as LocalConfig  # noqa: E402
from kd.config import OpenAITeacher as OpenAIConfig  # noqa: E402
from kd.config import Sampling  # noqa: E402
from kd.prompts import load_prompt  # noqa: E402
from kd.runtime.ask import Asker, Call  # noqa: E402

TEMPLATE = "prompts/labeling/answer.jinja"
VARIABLES = ("instruction", "category")  # what kd.elicit.labeling passes to its template
SEEDS = "seeds/instructions.jsonl"
MODEL_DIR = ROOT / "models/teacher"


def seed_rows() -> list[dict[str, Any]]:
    return [json.loads(line) for line in (ROOT / SEEDS).read_text().splitlines() if line.strip()]


def make_calls(asker: Asker, prompt: Any, rows: list[dict], sampling: Sampling, n: int) -> list[Call]:
    """n distinct requests: the seed rows in order, then again with the next sample index."""
    return [asker.call(prompt, sampling, i // len(rows), instruction=rows[i % len(rows)]["instruction"],
                       category=rows[i % len(rows)]["category"]) for i in range(n)]


def new_asker(teacher: Any, cache_dir: Path, label: str) -> Asker:
    """An Asker with its own cache directory (a fresh one misses every request)."""
    return Asker(teacher, RequestCache(cache_dir), label)


# ------------------------------------------------------------------------------------------- a. local


def count_row(new: list[int], eos_ids: set[int]) -> tuple[int, str]:
    """Completion tokens up to the first end token, and the finish reason (kd's own counting rule)."""
    for n, t in enumerate(new):
        if t in eos_ids:
            return n, "stop"
    return len(new), "length"


def decode_steps(rows: list[tuple[int, str]], batch: int) -> int:
    """generate() steps the batches took: a batch runs until its longest row ends (its end token included)."""
    return sum(max(n + (f == "stop") for n, f in rows[i:i + batch]) for i in range(0, len(rows), batch))


def bare_generate(model: Any, tok: Any, messages: list[list[dict]], batch: int, max_tokens: int,
                  temperature: float, seed: int = 0) -> tuple[list[tuple[int, str]], list[str]]:
    """The baseline: plain transformers on requests already in kd's batch order."""
    import torch

    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) | {tok.eos_token_id}
    sample = {"do_sample": True, "temperature": temperature, "top_p": 1.0, "top_k": 0} if temperature > 0 \
        else {"do_sample": False}
    torch.manual_seed(seed)
    rows, texts = [], []
    for i in range(0, len(messages), batch):
        enc = tok.apply_chat_template(messages[i:i + batch], add_generation_prompt=True, tokenize=True,
                                      padding=True, return_tensors="pt", return_dict=True)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=max_tokens, pad_token_id=tok.pad_token_id, **sample)
        width = enc["input_ids"].shape[1]
        for new in out[:, width:].tolist():
            n, finish = count_row(new, eos_ids)
            rows.append((n, finish))
            texts.append(tok.decode(new[:n], skip_special_tokens=True))
    return rows, texts


def bench_local(n: int, max_tokens: int, batch: int, repeats: int, work: Path) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kd.runtime.local import LocalTeacher

    rows = seed_rows()[:n]
    prompt = load_prompt(ROOT, TEMPLATE, VARIABLES)
    cfg = LocalConfig(backend="local", path=str(MODEL_DIR), dtype="bfloat16", device="cpu", batch_size=batch)
    teacher = LocalTeacher("smollm2", cfg, ROOT)

    # Load each side once, outside the timings, and warm each up with one short generation.
    t = time.perf_counter()
    warm = new_asker(teacher, work / "warm", "warm-up")
    warm.ask([warm.call(prompt, Sampling(max_tokens=4), 0, instruction="Say hello.", category="")])
    kd_load_s = time.perf_counter() - t
    t = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.bfloat16, use_safetensors=True).eval()
    bare_generate(model, tok, [[{"role": "user", "content": "Say hello."}]], 1, 4, 0.0)
    bare_load_s = time.perf_counter() - t

    out: dict[str, Any] = {"requests": n, "max_tokens": max_tokens, "batch_size": batch, "repeats": repeats,
                           "torch_threads": torch.get_num_threads(), "load_s": {"kd": kd_load_s, "bare": bare_load_s}}
    for temperature in (0.0, 0.8):
        sampling = Sampling(temperature=temperature, max_tokens=max_tokens)
        # kd's batching: one group per sampling params, sorted by (prompt tokens, request key). The baseline
        # gets the same messages in the same order, so both sides run identical batches.
        calls = make_calls(new_asker(teacher, work / "probe", "probe"), prompt, rows, sampling, n)
        lengths = [len(tok.apply_chat_template(c.request["messages"], add_generation_prompt=True,
                                               tokenize=True)["input_ids"]) for c in calls]
        order = sorted(range(n), key=lambda i: (lengths[i], calls[i].key))
        messages = [calls[i].request["messages"] for i in order]

        best: dict[str, dict[str, Any]] = {}
        best_cpu: dict[str, float] = {}  # CPU seconds of this process: steadier than wall time on a shared machine
        kd_texts: list[str] = []
        bare_texts: list[str] = []
        last_cache = work / "none"
        for rep in range(repeats):
            for side in (("bare", "kd") if rep % 2 == 0 else ("kd", "bare")):
                gc.collect()
                if side == "bare":
                    t, c = time.perf_counter(), time.process_time()
                    counted, bare_texts = bare_generate(model, tok, messages, batch, max_tokens, temperature)
                    seconds, cpu = time.perf_counter() - t, time.process_time() - c
                else:
                    last_cache = work / f"local-t{temperature}-r{rep}"
                    asker = new_asker(teacher, last_cache, "bench-local")
                    t, c = time.perf_counter(), time.process_time()
                    kd_calls = make_calls(asker, prompt, rows, sampling, n)
                    answers = asker.ask(kd_calls)
                    seconds, cpu = time.perf_counter() - t, time.process_time() - c
                    assert asker.new == n and asker.cached == 0, (asker.new, asker.cached)
                    by_order = [answers[kd_calls[i].key] for i in order]
                    counted = [(a["usage"]["completion_tokens"], a["finish_reason"]) for a in by_order]
                    kd_texts = [a["text"] for a in by_order]
                tokens = sum(c for c, _ in counted)
                steps = decode_steps(counted, batch)
                run = {"seconds": seconds, "cpu_s": cpu, "tokens": tokens, "decode_steps": steps,
                       "tokens_per_s": tokens / seconds, "steps_per_s": steps / seconds}
                if side not in best or seconds < best[side]["seconds"]:
                    best[side] = run
                best_cpu[side] = min(best_cpu.get(side, cpu), cpu)
        # A fully cached rerun of the same requests: only rendering, keys and cache reads.
        gc.collect()
        asker = new_asker(teacher, last_cache, "bench-local-cached")
        t = time.perf_counter()
        asker.ask(make_calls(asker, prompt, rows, sampling, n))
        cached_s = time.perf_counter() - t
        assert asker.new == 0 and asker.cached == n, (asker.new, asker.cached)
        out[f"t{temperature:g}"] = {
            **best,
            "ratio_tokens_per_s": best["kd"]["tokens_per_s"] / best["bare"]["tokens_per_s"],
            # sampled runs draw different tokens on each side, so their batches stop at different steps:
            # seconds per generate() step compares the work itself
            "ratio_steps_per_s": best["kd"]["steps_per_s"] / best["bare"]["steps_per_s"],
            "best_cpu_s": best_cpu,
            "ratio_tokens_per_cpu_s": (best["kd"]["tokens"] / best_cpu["kd"]) / (best["bare"]["tokens"] / best_cpu["bare"]),
            "identical_texts": kd_texts == bare_texts if temperature == 0 else None,
            "cached_rerun_s": cached_s,
        }
    return out


# ------------------------------------------------------------------------------------------ b. openai


def body_of(model: str, call: Call) -> dict[str, Any]:
    """The chat-completions body for a request, written out as any client would."""
    s = call.request["sampling"]
    body = {"model": model, "messages": call.request["messages"], "temperature": s["temperature"],
            "top_p": s["top_p"], "max_tokens": s["max_tokens"], "n": 1, "seed": int(call.key[:8], 16)}
    if s["stop"]:
        body["stop"] = s["stop"]
    return body


async def bare_httpx(url: str, bodies: list[dict], concurrency: int) -> list[str]:
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url + "/", limits=limits, timeout=httpx.Timeout(120.0)) as client:

        async def one(body: dict) -> str:
            async with sem:
                r = await client.post("chat/completions", json=body)
            r.raise_for_status()
            return r.json()["choices"][0]["message"]["content"]

        return await asyncio.gather(*(one(b) for b in bodies))


async def bare_sdk(url: str, bodies: list[dict], concurrency: int) -> list[str]:
    from openai import AsyncOpenAI

    sem = asyncio.Semaphore(concurrency)
    async with AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120.0) as client:

        async def one(body: dict) -> str:
            async with sem:
                r = await client.chat.completions.create(**body)
            return r.choices[0].message.content

        return await asyncio.gather(*(one(b) for b in bodies))


def fake_server(latency_s: float, concurrency: int) -> Any:
    """tests/fake_openai.py's server, adjusted so that its latency is the one asked for.

    - socketserver's default listen backlog is 5: 16 clients connecting at once overflow it and some
      connections are reset (httpx.ReadError) or stall on SYN retries, which would time the kernel.
    - The handler writes the headers and the body in two sends; with Nagle's algorithm on, the second
      waits for the client's delayed ACK, adding ~40 ms to every answer (44 ms at latency 0 here, 0.4 ms
      with TCP_NODELAY).
    """
    import fake_openai

    if fake_openai._Server.request_queue_size < 4 * concurrency:
        fake_openai._Server.request_queue_size = 4 * concurrency
    fake_openai._Handler.disable_nagle_algorithm = True
    return fake_openai.FakeOpenAI(latency_s=latency_s)


def bench_openai(n: int, concurrency: int, latency_s: float, repeats: int, work: Path) -> dict[str, Any]:
    from kd.runtime.openai import OpenAITeacher

    try:
        import openai  # noqa: F401

        sides = ["httpx", "sdk", "kd"]
    except ImportError:
        sides = ["httpx", "kd"]
    rows = seed_rows()
    prompt = load_prompt(ROOT, TEMPLATE, VARIABLES)
    sampling = Sampling(temperature=0.0, max_tokens=64)
    best: dict[str, dict[str, Any]] = {}
    same_bodies = True
    with fake_server(latency_s, concurrency) as server:
        cfg = OpenAIConfig(backend="openai", base_url=server.url, model="fake-teacher", api_key_env=None,
                           concurrency=concurrency)
        teacher = OpenAITeacher("fake", cfg)
        calls = make_calls(new_asker(teacher, work / "probe", "probe"), prompt, rows, sampling, n)
        bodies = [body_of(cfg.model, c) for c in calls]
        expected = sorted(json.dumps(b, sort_keys=True) for b in bodies)

        def run(side: str, rep: int, count: int) -> tuple[float, list[dict]]:
            first = len(server.bodies)
            t = time.perf_counter()
            if side == "kd":
                asker = new_asker(teacher, work / f"openai-{rep}", "bench-openai")
                answers = asker.ask(make_calls(asker, prompt, rows, sampling, count))
                assert asker.new == count, asker.new
                assert len(answers) == count
            else:
                texts = asyncio.run((bare_httpx if side == "httpx" else bare_sdk)(server.url, bodies[:count], concurrency))
                assert len(texts) == count
            return time.perf_counter() - t, server.bodies[first:]

        for side in sides:  # warm-up: imports, connection code paths, server threads
            run(side, -1, 2 * concurrency)
        for rep in range(repeats):
            for side in sides[rep % len(sides):] + sides[:rep % len(sides)]:
                gc.collect()
                seconds, sent = run(side, rep, n)
                same_bodies &= sorted(json.dumps(b, sort_keys=True) for b in sent) == expected
                if side not in best or seconds < best[side]["seconds"]:
                    best[side] = {"seconds": seconds, "requests_per_s": n / seconds}
        asker = new_asker(teacher, work / f"openai-{repeats - 1}", "bench-openai-cached")
        t = time.perf_counter()
        asker.ask(make_calls(asker, prompt, rows, sampling, n))
        cached_s = time.perf_counter() - t
        assert asker.new == 0 and asker.cached == n
        max_in_flight = server.max_in_flight
    out: dict[str, Any] = {"requests": n, "concurrency": concurrency, "latency_s": latency_s, "repeats": repeats,
                           "ideal_requests_per_s": concurrency / latency_s, **best,
                           "ratio_kd_httpx": best["kd"]["requests_per_s"] / best["httpx"]["requests_per_s"],
                           "same_bodies": same_bodies, "server_max_in_flight": max_in_flight,
                           "cached_rerun_s": cached_s}
    if "sdk" in best:
        out["ratio_kd_sdk"] = best["kd"]["requests_per_s"] / best["sdk"]["requests_per_s"]
    return out


# -------------------------------------------------------------------------------------------- c. edit

EDIT_FROM = '{% block system %}{% include "prompts/common/persona.jinja" %}{% endblock %}'
EDIT_TO = ('{% block system %}{% include "prompts/common/persona.jinja" %}'
           '{% if category == "math" %}Show each calculation.{% endif %}{% endblock %}')


def bench_edit(latency_s: float, work: Path) -> dict[str, Any]:
    from kd.config import Labeling, Source
    from kd.elicit.labeling import label
    from kd.runtime.openai import OpenAITeacher

    project = work / "project"
    for d in ("prompts", "seeds"):
        shutil.copytree(ROOT / d, project / d)
    cfg = Labeling(method="labeling", teacher="fake", inputs=[Source(seeds=SEEDS)], template=TEMPLATE,
                   sampling=Sampling(temperature=0.0, max_tokens=64))
    rows = seed_rows()
    with fake_server(latency_s, 16) as server:
        teacher = OpenAITeacher("fake", OpenAIConfig(backend="openai", base_url=server.url, model="fake-teacher",
                                                     api_key_env=None, concurrency=16))
        first = new_asker(teacher, work / "edit-cache", "sft")
        t = time.perf_counter()
        records1, rejected1, _ = label("sft", cfg, project, project / "data", first)
        first_s = time.perf_counter() - t

        path = project / TEMPLATE
        source = path.read_text()
        edited = source.replace("vars: instruction #}", "vars: instruction, category #}").replace(EDIT_FROM, EDIT_TO)
        assert EDIT_FROM in source and "vars: instruction #}" in source, f"{TEMPLATE} changed; update EDIT_FROM"
        path.write_text(edited)

        received = server.received
        second = new_asker(teacher, work / "edit-cache", "sft")
        t = time.perf_counter()
        records2, rejected2, _ = label("sft", cfg, project, project / "data", second)
        second_s = time.perf_counter() - t
        server_new = server.received - received
    keys1 = {r["provenance"]["requests"][0]["key"] for r in records1}
    changed = sorted({r["category"] for r in records2 if r["provenance"]["requests"][0]["key"] not in keys1})
    total = second.new + second.cached
    math = sum(r["category"] == "math" for r in rows)
    return {"seeds": len(rows), "first_run": {"requests": first.new + first.cached, "new": first.new, "seconds": first_s},
            "new_requests": second.new, "total_requests": total, "server_requests": server_new,
            "measured_fraction": second.new / total, "expected_fraction": math / len(rows),
            "equal": second.new * len(rows) == math * total and server_new == second.new,
            "changed_categories": changed, "records": [len(records1), len(records2)],
            "rejected": [len(rejected1), len(rejected2)], "second_run_s": second_s}


# ---------------------------------------------------------------------------------------------- report


def versions() -> dict[str, str]:
    import contextlib
    import importlib.metadata

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "httpx", "openai", "kd"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[pkg] = importlib.metadata.version(pkg)
    return out


def table(res: dict[str, Any]) -> str:
    loc, oai, edit = res["local"], res["openai"], res["edit"]
    lines = [f"{'benchmark':<34} {'baseline':>13} {'kd':>13} {'kd/baseline':>12}"]
    for t in ("t0", "t0.8"):
        r = loc[t]
        name = f"local T={t[1:]} {loc['requests']}x{loc['max_tokens']} tok/s"
        lines.append(f"{name:<34} {r['bare']['tokens_per_s']:>13.1f} {r['kd']['tokens_per_s']:>13.1f} "
                     f"{r['ratio_tokens_per_s']:>12.3f}")
        lines.append(f"{'  same, generate() steps/s':<34} {r['bare']['steps_per_s']:>13.2f} "
                     f"{r['kd']['steps_per_s']:>13.2f} {r['ratio_steps_per_s']:>12.3f}")
        lines.append(f"{'  same, tokens per CPU-second':<34} {r['bare']['tokens'] / r['best_cpu_s']['bare']:>13.1f} "
                     f"{r['kd']['tokens'] / r['best_cpu_s']['kd']:>13.1f} {r['ratio_tokens_per_cpu_s']:>12.3f}")
        lines.append(f"{'  fully cached rerun (s)':<34} {r['bare']['seconds']:>13.2f} {r['cached_rerun_s']:>13.3f} "
                     f"{r['cached_rerun_s'] / r['bare']['seconds']:>12.4f}")
    name = f"openai {oai['requests']} req c={oai['concurrency']} req/s"
    lines.append(f"{name:<34} {oai['httpx']['requests_per_s']:>13.1f} {oai['kd']['requests_per_s']:>13.1f} "
                 f"{oai['ratio_kd_httpx']:>12.3f}")
    if "sdk" in oai:
        lines.append(f"{'  vs openai SDK (max_retries=0)':<34} {oai['sdk']['requests_per_s']:>13.1f} "
                     f"{oai['kd']['requests_per_s']:>13.1f} {oai['ratio_kd_sdk']:>12.3f}")
    lines.append(f"{'  fully cached rerun (s)':<34} {oai['httpx']['seconds']:>13.2f} {oai['cached_rerun_s']:>13.3f} "
                 f"{oai['cached_rerun_s'] / oai['httpx']['seconds']:>12.4f}")
    lines.append(f"{'edit: requests to teacher':<34} {'expected':>13} {'measured':>13}")
    lines.append(f"{'  math-only template edit':<34} {edit['expected_fraction']:>13.4f} "
                 f"{edit['measured_fraction']:>13.4f}   ({edit['new_requests']}/{edit['total_requests']}, "
                 f"equal: {edit['equal']})")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a < 40 s version: 16 requests x 32 tokens, 128 HTTP requests")
    parser.add_argument("--repeats", type=int, help="timed runs per side (best is kept); default 2")
    parser.add_argument("--out", type=Path, help="JSON results file (default bench/results/generation[-quick].json)")
    parser.add_argument("--threads", type=int, help="torch threads for both sides (default: one per core, or 1 "
                        "when the load average already exceeds the cores)")
    args = parser.parse_args()
    busy = os.getloadavg()[0] > (os.cpu_count() or 1)
    if args.threads or busy:
        import torch

        # With every core already busy, torch's one-thread-per-core parallel regions wait on preempted
        # threads: generation ran 50x slower than idle on 2 cores at load 6, against 5x with one thread.
        torch.set_num_threads(args.threads or 1)
    repeats = args.repeats or 2
    local_n, local_tokens, openai_n = (16, 32, 128) if args.quick else (32, 64, 256)
    start = time.perf_counter()
    res: dict[str, Any] = {"date": datetime.date.today().isoformat(), "cpu_count": os.cpu_count(),
                           "load_avg_start": os.getloadavg()[0], "quick": args.quick, "versions": versions()}
    if busy:
        print(f"note: load average {res['load_avg_start']:.1f} on {os.cpu_count()} CPUs: other work competes for the "
              f"cores, figures will be noisy{'' if args.threads else '; torch runs one thread (--threads to override)'}",
              flush=True)
    with tempfile.TemporaryDirectory(prefix="kd-bench-") as tmp:
        work = Path(tmp)
        cwd = os.getcwd()
        os.chdir(work)  # kd writes its digest memo under ./.kd: keep that out of the project
        try:
            print(f"a. local teacher: {local_n} requests x {local_tokens} tokens, batch 16, {repeats} repeat(s)",
                  flush=True)
            res["local"] = bench_local(local_n, local_tokens, 16, repeats, work)
            print(f"b. openai backend: {openai_n} requests, concurrency 16, latency 50 ms", flush=True)
            res["openai"] = bench_openai(openai_n, 16, 0.05, repeats + 1, work)
            print("c. one-template edit", flush=True)
            res["edit"] = bench_edit(0.0, work)
        finally:
            os.chdir(cwd)
    res["run_s"] = time.perf_counter() - start
    res["load_avg_end"] = os.getloadavg()[0]
    res["noisy"] = max(res["load_avg_start"], res["load_avg_end"]) > (os.cpu_count() or 1)
    out = args.out or ROOT / "bench/results" / ("generation-quick.json" if args.quick else "generation.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2, sort_keys=True) + "\n")

    print()
    print(table(res))
    greedy = res["local"]["t0"]["identical_texts"]
    print(f"\ngreedy texts identical (kd vs bare): {greedy}; openai bodies identical: {res['openai']['same_bodies']}; "
          f"changed categories after the edit: {', '.join(res['edit']['changed_categories']) or 'none'}")
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out} in {res['run_s']:.0f} s "
          f"(load average {res['load_avg_start']:.1f} -> {res['load_avg_end']:.1f} on {os.cpu_count()} CPUs)")
    if res["noisy"]:
        print("warning: other work shared the cores during the run; the timings above are not reliable (the "
              "correctness checks are). Rerun on a quiet machine.")
    ok = greedy and res["openai"]["same_bodies"] and res["edit"]["equal"] \
        and res["edit"]["changed_categories"] == ["math"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
