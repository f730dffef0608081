"""kd's ROUGE-L novelty filter against the naive loop Self-Instruct runs, side by side in one process.

Self-Instruct keeps a generated instruction only if its ROUGE-L F1 against every instruction kept so far is
at most 0.7, computing each score with an O(len_a * len_b) dynamic-programming LCS in Python (the
`rouge_score` package, over a process pool). The baseline here is that loop on one core: every candidate
against every kept instruction, no early exit. kd (`kd.runtime.novelty.NoveltyIndex.admit`) bounds all kept
instructions at once from an inverted index and runs a bit-parallel LCS only where the bound can exceed
the threshold.

Inputs are synthetic, deterministic instruction-like sentences of 10-25 words (templates over a
vocabulary, a quarter of them edited copies of earlier ones, so near-duplicates exist). At the smallest size
both sides run and must make identical keep/reject decisions; above it only kd runs and the baseline's time
is extrapolated from its measured cost per pair (printed as an estimate).

    python bench/novelty.py            # under 20 s on 2 idle CPU cores
    python bench/novelty.py --quick    # about 3 s: sizes 500, 2k, 5k

Writes bench/results/novelty.json (novelty-quick.json with --quick).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import random
import re
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kd.runtime.novelty import NoveltyIndex  # noqa: E402

THRESHOLD = 0.7  # Self-Instruct's, and kd's default (params.yaml: novelty_threshold)

# ------------------------------------------------------------------------------------------ synthetic data

VERBS = ["Write", "Explain", "Describe", "Summarize", "List", "Compare", "Suggest", "Create", "Outline", "Give",
         "Design", "Draft", "Propose", "Analyze", "Evaluate", "Rewrite", "Translate", "Classify", "Plan", "Review"]
FORMS = ["a short poem", "a product description", "a list of tips", "a short story", "an email", "a tweet",
         "a lesson plan", "a recipe", "a dialogue", "a news headline", "a haiku", "a cover letter", "a summary",
         "a step-by-step guide", "a persuasive paragraph", "a job posting", "a quiz", "a limerick", "a speech",
         "a checklist", "a blog introduction", "a riddle", "a slogan", "a book review", "a travel itinerary"]
ADJECTIVES = ["renewable", "ancient", "urban", "digital", "remote", "healthy", "affordable", "quantum", "local",
              "volcanic", "medieval", "tropical", "electric", "rural", "modern", "organic", "coastal", "arctic",
              "financial", "public", "private", "small", "global", "personal", "musical", "cultural", "mobile",
              "industrial", "historic", "scientific", "online", "seasonal", "wild", "domestic", "solar", "social"]
NOUNS = ["energy", "gardening", "libraries", "transport", "teamwork", "cooking", "budgets", "computing", "forests",
         "markets", "schools", "sleep", "photography", "rivers", "volunteering", "chess", "recycling", "bridges",
         "vaccines", "robots", "languages", "festivals", "museums", "oceans", "cycling", "poetry", "startups",
         "insurance", "housing", "podcasts", "farming", "weather", "birds", "history", "mathematics", "painting",
         "hospitals", "elections", "tourism", "coffee", "batteries", "textiles", "deserts", "theatre", "taxes"]
AUDIENCES = ["children", "beginners", "retirees", "students", "engineers", "tourists", "parents", "nurses",
             "managers", "teenagers", "farmers", "investors", "teachers", "scientists", "new employees"]
CONSTRAINTS = ["in under 100 words", "using simple language", "with three examples", "in a formal tone",
               "as a numbered list", "without technical jargon", "in the second person", "with a clear title",
               "in exactly five sentences", "with one surprising fact", "using a friendly tone",
               "including a short conclusion", "with pros and cons", "from a historical perspective"]
QUESTIONS = ["How does", "Why does", "In what ways does", "To what extent does", "When does"]
EFFECTS = ["affect", "change", "improve", "threaten", "depend on", "shape", "benefit from", "compete with"]
PLACES = ["small towns", "large cities", "developing countries", "the classroom", "the workplace", "rural areas",
          "coastal regions", "online communities", "the last decade", "the next twenty years"]
EXTRAS = ["Keep the answer practical.", "Mention one common mistake.", "End with a question for the reader.",
          "Avoid clichés.", "Use an analogy.", "Cite no sources.", "Make it memorable.", "Be specific."]


def topic(rng: random.Random) -> str:
    return f"{rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}"


def fresh(rng: random.Random) -> str:
    match rng.randrange(4):
        case 0:
            s = (f"{rng.choice(VERBS)} {rng.choice(FORMS)} about {topic(rng)} for {rng.choice(AUDIENCES)}, "
                 f"{rng.choice(CONSTRAINTS)}.")
        case 1:
            s = (f"{rng.choice(QUESTIONS)} {topic(rng)} {rng.choice(EFFECTS)} {topic(rng)} in "
                 f"{rng.choice(PLACES)}? Answer {rng.choice(CONSTRAINTS)}.")
        case 2:
            s = (f"Given a description of {topic(rng)}, {rng.choice(VERBS).lower()} {rng.choice(FORMS)} that "
                 f"{rng.choice(AUDIENCES)} in {rng.choice(PLACES)} would understand.")
        case _:
            s = (f"{rng.choice(VERBS)} the relationship between {topic(rng)} and {topic(rng)}, "
                 f"{rng.choice(CONSTRAINTS)}, for {rng.choice(AUDIENCES)}.")
    while len(s.split()) < 10 or rng.random() < 0.3:
        s += " " + rng.choice(EXTRAS)
    return s


def edited(rng: random.Random, text: str) -> str:
    """A near-duplicate: one to four word substitutions, insertions or deletions."""
    w = text.split()
    pool = ADJECTIVES + NOUNS + AUDIENCES + ["the", "a", "very", "short", "new", "simple", "clear"]
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(len(w))
        match rng.randrange(3):
            case 0:
                w[i] = rng.choice(pool)
            case 1:
                w.insert(i, rng.choice(pool))
            case _:
                if len(w) > 10:
                    del w[i]
    return " ".join(w)


def instructions(n: int, seed: int = 0) -> list[str]:
    """n deterministic instruction-like sentences of 10-25 words, a quarter of them edits of earlier ones."""
    rng = random.Random(seed)
    out: list[str] = []
    while len(out) < n:
        s = edited(rng, rng.choice(out)) if out and rng.random() < 0.25 else fresh(rng)
        if 10 <= len(s.split()) <= 25:
            out.append(s)
    return out


# ------------------------------------------------------------------------------------------ the baseline

_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def tokenize(text: str) -> list[str]:
    """rouge_score's tokenizer without stemming (as Self-Instruct configures it)."""
    return _NON_ALNUM.sub(" ", text.lower()).split()


def lcs_dp(a: list[str], b: list[str]) -> int:
    """Longest common subsequence by the O(len_a * len_b) table, one row at a time."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def naive_filter(texts: list[str], threshold: float) -> tuple[list[bool], int, int]:
    """Self-Instruct's loop: score each candidate against every kept instruction, keep it if max F1 <= threshold.

    Returns (decisions, pairs scored, candidates whose decision would flip under rouge_score's float formula
    2PR/(P+R) instead of 2*LCS/(|a|+|b|): at an exact tie F1 == threshold it can round above the threshold).
    """
    kept: list[list[str]] = []
    decisions, pairs, flips = [], 0, 0
    for text in texts:
        a = tokenize(text)
        best = best_rs = 0.0
        for b in kept:
            lcs = lcs_dp(a, b)
            if a and b:
                best = max(best, 2.0 * lcs / (len(a) + len(b)))
                p, r = lcs / len(b), lcs / len(a)
                best_rs = max(best_rs, 2 * p * r / (p + r) if p + r else 0.0)
        pairs += len(kept)
        keep = best <= threshold
        flips += keep != (best_rs <= threshold)
        decisions.append(keep)
        if keep:
            kept.append(a)
    return decisions, pairs, flips


def kd_filter(texts: list[str], threshold: float) -> list[bool]:
    index = NoveltyIndex(threshold)
    return [index.admit(t)[0] for t in texts]


def pairs_of(decisions: list[bool]) -> int:
    """Pairs the naive loop scores for these decisions: each candidate against all kept before it."""
    kept = pairs = 0
    for d in decisions:
        pairs += kept
        kept += d
    return pairs


# ---------------------------------------------------------------------------------------------- report


def timed(fn: Any, *args: Any) -> tuple[float, float, Any]:
    """(wall seconds, CPU seconds of this process, result); CPU time is the steadier figure on a busy machine."""
    gc.collect()
    t, c = time.perf_counter(), time.process_time()
    out = fn(*args)
    return time.perf_counter() - t, time.process_time() - c, out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a < 40 s version: sizes 500 / 2k / 5k")
    parser.add_argument("--out", type=Path, help="JSON results file (default bench/results/novelty[-quick].json)")
    args = parser.parse_args()
    both, kd_only = (500, [2_000, 5_000]) if args.quick else (1_000, [10_000, 50_000])
    start = time.perf_counter()
    texts = instructions(max([both, *kd_only]))
    words = [len(tokenize(t)) for t in texts]
    res: dict[str, Any] = {"date": datetime.date.today().isoformat(), "cpu_count": os.cpu_count(),
                           "load_avg_start": os.getloadavg()[0], "quick": args.quick, "threshold": THRESHOLD,
                           "python": platform.python_version(),
                           "words_per_text": {"min": min(words), "mean": sum(words) / len(words), "max": max(words)},
                           "sizes": []}

    print(f"{both} instructions, both sides", flush=True)
    kd_s, kd_cpu, kd_dec = timed(kd_filter, texts[:both], THRESHOLD)
    naive_s, naive_cpu, (naive_dec, pairs, flips) = timed(naive_filter, texts[:both], THRESHOLD)
    identical = kd_dec == naive_dec
    per_pair, per_pair_cpu = naive_s / pairs, naive_cpu / pairs
    res["sizes"].append({"n": both, "kept": sum(kd_dec), "kd_s": kd_s, "naive_s": naive_s, "naive_estimated": False,
                         "kd_cpu_s": kd_cpu, "naive_cpu_s": naive_cpu, "pairs": pairs, "speedup": naive_s / kd_s,
                         "speedup_cpu": naive_cpu / kd_cpu, "decisions_identical": identical})
    res["naive_us_per_pair"] = per_pair * 1e6
    res["naive_cpu_us_per_pair"] = per_pair_cpu * 1e6
    res["rouge_score_formula_flips"] = flips
    for n in kd_only:
        print(f"{n} instructions, kd only", flush=True)
        kd_s, kd_cpu, kd_dec = timed(kd_filter, texts[:n], THRESHOLD)
        pairs_n = pairs_of(kd_dec)
        res["sizes"].append({"n": n, "kept": sum(kd_dec), "kd_s": kd_s, "naive_s": pairs_n * per_pair,
                             "naive_estimated": True, "kd_cpu_s": kd_cpu, "naive_cpu_s": pairs_n * per_pair_cpu,
                             "pairs": pairs_n, "speedup": pairs_n * per_pair / kd_s,
                             "speedup_cpu": pairs_n * per_pair_cpu / kd_cpu})
    res["load_avg_end"] = os.getloadavg()[0]
    res["noisy"] = max(res["load_avg_start"], res["load_avg_end"]) > (os.cpu_count() or 1)
    res["run_s"] = time.perf_counter() - start
    out = args.out or ROOT / "bench/results" / ("novelty-quick.json" if args.quick else "novelty.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2, sort_keys=True) + "\n")

    print(f"\n{'instructions':>12} {'kept':>7} {'naive (s)':>18} {'kd (s)':>9} {'kd speedup':>11} "
          f"{'(CPU time)':>11} {'kd per admit':>13}")
    for r in res["sizes"]:
        naive = f"{r['naive_s']:.1f}" + (" (estimated)" if r["naive_estimated"] else "")
        print(f"{r['n']:>12} {r['kept']:>7} {naive:>18} {r['kd_s']:>9.2f} {r['speedup']:>10.0f}x "
              f"{r['speedup_cpu']:>10.0f}x {r['kd_s'] / r['n'] * 1e6:>10.0f} us")
    print(f"\ndecisions identical: {identical}")
    print(f"naive cost per pair: {per_pair * 1e6:.1f} us ({pairs} pairs at {both}); estimates above scale it by the "
          f"pairs the naive loop would score given kd's decisions")
    print(f"candidates whose decision flips under rouge_score's float formula (exact ties at {THRESHOLD}): {flips}")
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out} in {res['run_s']:.0f} s "
          f"(load average {res['load_avg_start']:.1f} -> {res['load_avg_end']:.1f} on {os.cpu_count()} CPUs)")
    if res["noisy"]:
        print("warning: other work shared the cores during the run; wall times are inflated, the CPU-time column "
              "is the steadier one")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
