"""Hostile templates and a damaged render memo (issue 19, items 7, 8, 10, 11, 13, 14): every template bomb ends in
one line within 2 s and 500 MB, nothing that prints a memory address reaches a prompt, a swapped memo row is a miss
and never another record's answer, and a row too long for any prompt is a rejection of that row."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from fake_openai import FakeOpenAI

from kd.cache.store import request_key
from kd.errors import KdError
from kd.prompts import MAX_TEXT, load_prompt

REPO = Path(__file__).resolve().parents[1]

# The bombs, each one hung or filled memory for minutes, or printed a traceback.
BOMBS = [
    "{{ ['x'*7000000]*1000 }}", "{{ (['x'*7000000]*1000)|string }}", "{{ (['x'*7000000]*1000)|tojson }}",
    "{{ (['x'*7000000]*1000)|map('string')|join }}", "{{ '{:>{w}}'.format(1, w=4000000000) }}",
    "{{ '%*d'|format(4000000000, 1) }}", "{{ '%*d' % (4000000000, 1) }}",
    "{% set ns = namespace(x=3) %}{% for i in range(40) %}{% set ns.x = ns.x * ns.x %}{% endfor %}{{ ns.x }}",
    "{% for i in range(40) recursive %}{% if loop.depth < 9 %}{{ loop(range(40)) }}{% endif %}{% endfor %}",
    "{{ 1/0 }}", "{{ 9**5000 }}", "{{ 2**100000000 }}",
    # found while closing them: shared structures, width and count arguments, growth by filters and methods
    "{% set ns = namespace(a=[]) %}{% for i in range(60) %}{% set ns.a = [ns.a, ns.a] %}{% endfor %}{{ ns.a == ns.a }}",
    "{% set ns = namespace(a=()) %}{% for i in range(60) %}{% set ns.a = (ns.a, ns.a) %}{% endfor %}{{ {ns.a: 1} }}",
    "{% set ns = namespace(l=[]) %}{% for i in range(1000) %}{% set ns.l = ns.l + ['x' * 7000000 ~ i] %}{% endfor %}",
    "{{ ('\\n' * 1000)|indent(7000000) }}", "{{ ('a' * 1000)|wordwrap(1, wrapstring='x' * 7000000) }}",
    "{{ ([[1] * 1000] * 1000)|sum(start=[]) }}", "{{ (1).to_bytes(4000000000, 'big') }}",
    "{{ ('\\t' * 1000).expandtabs(7000000) }}", "{{ [1]|batch(1000000000, 'x')|list }}",
    "{{ ('ab' * 2000000).translate({97: 'x' * 100}) }}", "{{ '{:.4000000000f}'.format(1.5) }}",
    "{{ ('a' * 4000000)|replace('a', 'aaa') }}", "{{ 'a'.join(['x' * 7000000] * 100) }}",
    "{% macro m(n) %}{{ m(n) }}{% endmacro %}{{ m(1) }}",
]
# Every route from a value to text, with values whose text holds a memory address (or is not plain data).
ROUTES = ["{{ V }}", "{{ '' ~ V }}", "{{ (V)|string }}", "{{ '%s'|format(V) }}", "{{ '%r' % (V,) }}",
          "{{ '{}'.format(V) }}", "{{ '{0!r}'.format(V) }}", "{{ (V)|pprint }}", "{{ [V]|join }}", "{{ (V)|upper }}",
          "{{ (V)|tojson }}", "{{ (V)|e }}", "{{ (V)|center(30) }}", "{{ [V] }}", "{{ {'k': V} }}",
          "{% set x = V %}{{ 'a' ~ x }}", "{{ (V)|replace('a', 'b') }}", "{{ (V)|urlencode }}", "{{ (V, 1)|join }}"]
UNPRINTABLE = ["(('%r'.encode() % (joiner(),)).decode())", "joiner()", "cycler(1)", "'abc'.upper", "range(3)", "dict(a=1).items()", "[1, 2]|map('string')",
               "namespace(a=1)", "instruction.split", "'{0.upper}'"]

RUN_BOMBS = """
import json, resource, sys, time
from pathlib import Path
from kd.errors import KdError
from kd.prompts import load_prompt
root, out = Path(sys.argv[1]), []


def peak_mb():
    # this process's own high-water mark (VmHWM): ru_maxrss starts from the forking process's size, so under xdist
    # it reported the worker's 1.3 GB after training tests instead of this process's
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) / 1024


for name in sorted(p.name for p in (root / "prompts").glob("*.jinja")):
    start = time.monotonic()
    try:
        load_prompt(root, f"prompts/{name}", ["instruction"]).render("row 7", instruction="hi")
        error = None
    except KdError as e:
        error = str(e)
    out.append({"name": name, "s": time.monotonic() - start, "error": error,
                "peak_mb": peak_mb()})
print(json.dumps({"results": out, "peak_mb": peak_mb()}))
"""


def write_templates(root: Path, bodies: list[str]) -> dict[str, str]:
    (root / "prompts").mkdir(parents=True, exist_ok=True)
    names = {}
    for n, body in enumerate(bodies):
        names[f"b{n:03d}.jinja"] = body
        (root / "prompts" / f"b{n:03d}.jinja").write_text("{# vars: instruction #}{% block user %}" + body +
                                                          "{% endblock %}")
    return names


def test_fuzz_template_bombs_end_in_one_line_within_two_seconds_and_500_mb(tmp_path):
    # regression: each of these hung for minutes, allocated gigabytes (MemoryError under a 3 GB ulimit) or ended in a
    # traceback ({{ 1/0 }}, {{ 9**5000 }}); the 8M-character bound was checked only after the text was built
    # generated variants: other sizes of the shared-string bomb, other routes for a width given as an argument
    sizes = [f"{{{{ (['x' * {n}] * {m}){f} }}}}" for n, m in ((100, 10**6), (4 * 10**6, 3)) for f in ("", "|string")]
    widths = [w.replace("W", str(n)) for n in (9 * 10**6, 4 * 10**9, "10 ** 30") for w in (
        "{{ '{:{w}}'.format('a', w=W) }}", "{{ '%-*s' % (W, 'a') }}", "{{ 'a'|center(W) }}", "{{ 'a'.ljust(W) }}",
        "{{ 'a'.zfill(W) }}", "{{ '{:.{p}f}'.format(1.0, p=W) }}")]
    bodies = BOMBS + sizes + widths
    names = write_templates(tmp_path, bodies)
    # its own process, under a 2 GB address-space limit so that a regression cannot take the machine down
    limit = "import resource; resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))\n"
    proc = subprocess.run([sys.executable, "-c", limit + RUN_BOMBS, str(tmp_path)], capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    for r in report["results"]:
        body, error = names[r["name"]], r["error"]
        assert error is not None, f"rendered: {body}"
        assert "\n" not in error and error.startswith(f"prompts/{r['name']} (row 7): "), (body, error)
        assert "MemoryError" not in error, (body, error)  # refused by the sandbox, not by the address-space limit
        assert r["s"] <= 2.0, (body, r["s"])
        assert r["peak_mb"] <= 500, (body, r["peak_mb"])  # the peak so far: the first bomb past it is named


def test_fuzz_nothing_that_prints_a_memory_address_reaches_a_prompt(tmp_path):
    # regression: only `{{ }}` refused to print an object: `'' ~ joiner()`, `joiner()|string`, `'%s'|format(cycler(1))`,
    # `.format`, `|pprint`, `'' ~ 'abc'.upper`, `'' ~ range(3)` put memory addresses (a new request every run) in prompts
    bodies = [route.replace("V", v) for route in ROUTES for v in UNPRINTABLE]
    names = write_templates(tmp_path, bodies)
    for name, body in names.items():
        prompt = load_prompt(tmp_path, f"prompts/{name}", ["instruction"])
        try:
            texts = {json.dumps(prompt.render("row 1", instruction="hi")) for _ in range(2)}
        except KdError as e:
            assert "\n" not in str(e) and str(e).startswith(f"prompts/{name} (row 1): "), (body, str(e))
            continue
        # what renders is plain text: no address, the same every time (`'{0.upper}'` is a plain string)
        assert len(texts) == 1 and " at 0x" not in texts.pop(), body


def test_a_runaway_render_in_another_thread_is_stopped_too(tmp_path):
    # `kd view` plans (renders) in worker threads, where no SIGALRM reaches: the deadline must hold there as well
    import threading
    import time

    write_templates(tmp_path, ["{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                               "{{ instruction }}"])
    prompt = load_prompt(tmp_path, "prompts/b000.jinja", ["instruction"])
    errors: list[str] = []

    def render() -> None:
        try:
            prompt.render("row 2", instruction="hi")
        except KdError as e:
            errors.append(str(e))

    start = time.monotonic()
    worker = threading.Thread(target=render, daemon=True)  # without the bound it would never end
    worker.start()
    worker.join(10)
    assert time.monotonic() - start <= 2.0 and len(errors) == 1, errors
    assert errors[0].startswith("prompts/b000.jinja (row 2): stopped after 1 s"), errors
    benign = load_prompt(tmp_path, "prompts/b001.jinja", ["instruction"])
    assert benign.render(instruction="hi") == [{"role": "user", "content": "hi"}]  # no late stop lands elsewhere


def test_plain_data_still_prints_everywhere(tmp_path):
    # the bounds refuse no benign template: plain values through every route print as before
    body = ("{{ instruction ~ '!' }} {{ [1, 'a', {'k': none}] }} {{ '%s-%05.1f' % (instruction, 2.5) }} "
            "{{ '{:>6}|{!r}'.format(instruction, instruction) }} {{ ['a', 'b']|map('upper')|join(',') }} "
            "{{ {'b': [1, 2]}|tojson }} {{ instruction|center(8)|replace(' ', '.') }} {{ [3, 1, 2]|sort|sum }} "
            "{{ 2 ** 64 }} {% for i in range(3) recursive %}{{ i }}{% endfor %} {{ instruction.split()|length }}")
    write_templates(tmp_path, [body])
    text = load_prompt(tmp_path, "prompts/b000.jinja", ["instruction"]).render(instruction="hi")[0]["content"]
    assert text == ("hi! [1, 'a', {'k': None}] hi-002.5     hi|'hi' A,B {\"b\": [1, 2]} ...hi... 6 "
                    "18446744073709551616 012 1")


def request_keys() -> str:
    """One hash over the request keys of every default template rendered over 40 rows (as bench/render.py does)."""
    seeds = [json.loads(line) for line in (REPO / "seeds/instructions.jsonl").read_text().splitlines()]
    topics = [json.loads(line) for line in (REPO / "seeds/topics.jsonl").read_text().splitlines()]
    digest = hashlib.sha256()
    for path in sorted(p for p in (REPO / "prompts").rglob("*.jinja") if "common" not in p.parts):
        prompt = None
        for n in range(40):
            s, t = seeds[n % len(seeds)], topics[n % len(topics)]
            values = {"instruction": s["instruction"], "category": s.get("category", ""), "response": s["reference"],
                      "response_a": s["reference"], "response_b": s["instruction"], "aspects": ["a", "b"], "low": 1,
                      "high": 5, "allow_prose": n % 2 == 0, "topic": t["topic"], "domain": t.get("domain", ""),
                      "attribute": "x", "question": s["instruction"], "demos": [x["instruction"] for x in seeds[:n % 5]]}
            prompt = prompt or load_prompt(REPO, str(path.relative_to(REPO)), list(values))
            digest.update(request_key({"messages": prompt.render(**values)}).encode())
    return digest.hexdigest()


def test_default_templates_render_the_same_requests_as_before():
    # golden hash, computed with the code before the sandbox was bounded: benign prompts are byte-identical, so the
    # default build asks nothing again and its datasets stay byte-identical
    assert request_keys() == "56107f29166db0f9b5ba80c203b297182a30ea9e9b255121d3f7b3b9452dbecf"


def test_a_value_longer_than_any_message_is_the_rows_fault_and_a_bomb_is_the_templates(tmp_path):
    write_templates(tmp_path, ["{{ instruction }}", "{{ ['x' * 7000000] * 2 }}"])
    row = load_prompt(tmp_path, "prompts/b000.jinja", ["instruction"])
    with pytest.raises(KdError, match=r"the user message passes 8000000 characters") as e:
        row.render("row 3", instruction="x" * (MAX_TEXT + 1))
    assert type(e.value).__name__ == "TooLong"
    with pytest.raises(KdError, match="would print over") as e:
        load_prompt(tmp_path, "prompts/b001.jinja", ["instruction"]).render("row 3", instruction="x")
    assert type(e.value).__name__ == "KdError"


# ------------------------------------------------------------------------------------------ through a stage

def labeling(root: Path, server: FakeOpenAI, template: str, rows: list[dict[str, str]]) -> Path:
    (root / "prompts").mkdir(parents=True, exist_ok=True)
    (root / "seeds").mkdir(exist_ok=True)
    (root / "prompts/t.jinja").write_text("{# vars: instruction #}{% block user %}" + template + "{% endblock %}")
    (root / "seeds/s.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    teacher = {"backend": "openai", "base_url": server.url, "model": "fake", "api_key_env": None, "concurrency": 1,
               "timeout_s": 5, "max_attempts": 1}
    dataset = {"method": "labeling", "teacher": "t", "inputs": [{"seeds": "seeds/s.jsonl"}], "template": "prompts/t.jinja",
               "sampling": {"max_tokens": 16}}
    (root / "params.yaml").write_text(json.dumps({"teachers": {"t": teacher}, "datasets": {"qa": dataset}}))
    return root


def stage(root: Path, capsys: Any) -> tuple[int, str, str]:
    """The labeling stage as `dvc repro` runs it (kd.stage.run: a KdError is one line and exit 2), in this process."""
    from kd.elicit.build import build_dataset
    from kd.elicit.labeling import label
    from kd.stage import run

    code = 0
    try:
        run(lambda: build_dataset("qa", "labeling", label, root))
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


ROWS = [{"id": "a", "instruction": "Name a colour."}, {"id": "b", "instruction": "Name a fruit."},
        {"id": "c", "instruction": "Name a tree."}, {"id": "d", "instruction": "Name a river."}]


@pytest.mark.parametrize("template", ["{{ 1/0 }}", "{{ 9**5000 }}", "{{ instruction ~ joiner() }}",
                                      "{% for i in range(40) recursive %}{{ loop(range(40)) }}{% endfor %}"])
def test_a_failing_template_stops_the_stage_in_one_line(tmp_path, capsys, template):
    # regression: {{ 1/0 }} and {{ 9**5000 }} ended a stage in a traceback (exit 1)
    with FakeOpenAI() as server:
        code, _, err = stage(labeling(tmp_path, server, template, ROWS), capsys)
        assert server.received == 0
    assert code == 2 and err.count("\n") == 1 and err.startswith("kd: error: prompts/t.jinja: "), err
    assert "(request 1 of the stage)" in err and not (tmp_path / "data/qa").exists()


def test_a_seed_row_over_the_message_bound_is_a_too_long_rejection(tmp_path, capsys):
    # regression: one seed row over 8M characters failed the whole stage (a 5 MB row was a `too_long` rejection)
    rows = [*ROWS[:2], {"id": "huge", "instruction": "y" * (MAX_TEXT + 10)}]
    with FakeOpenAI() as server:
        root = labeling(tmp_path, server, "Answer: {{ instruction }}", rows)
        code, out, err = stage(root, capsys)
        assert code == 0, err
        assert server.received == 2
    rejected = [json.loads(line) for line in (root / "data/qa/rejected.jsonl").read_text().splitlines()]
    assert [(r["input"]["id"], r["reason"]) for r in rejected] == [("huge", "too_long")]
    assert json.loads((root / "data/qa/manifest.json").read_text())["records"] == 2


def test_an_over_long_seed_row_is_a_too_long_rejection_in_methods_that_ask_in_rounds_too(tmp_path, capsys):
    # regression: only labeling (streamed) rejected an over-long row; curation, expansion, feedback and
    # self-knowledge render through Asker.call, where the same row stopped the whole stage
    from kd.elicit.build import build_dataset
    from kd.elicit.curation import curate
    from kd.stage import run

    (tmp_path / "prompts").mkdir()
    (tmp_path / "seeds").mkdir()
    (tmp_path / "prompts/q.jinja").write_text("{# vars: topic #}{% block user %}Ask about {{ topic }}.{% endblock %}")
    (tmp_path / "prompts/a.jinja").write_text("{# vars: question #}{% block user %}{{ question }}{% endblock %}")
    topics = [{"id": "short", "topic": "rivers"}, {"id": "huge", "topic": "y" * (MAX_TEXT + 10)}]
    (tmp_path / "seeds/topics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in topics))
    (tmp_path / "seeds/attributes.jsonl").write_text(json.dumps({"attribute": "short"}) + "\n")
    with FakeOpenAI() as server:
        teacher = {"backend": "openai", "base_url": server.url, "model": "fake", "api_key_env": None,
                   "concurrency": 1, "timeout_s": 5, "max_attempts": 1}
        dataset = {"method": "curation", "teacher": "t", "topics": "seeds/topics.jsonl", "count": 2,
                   "attributes": "seeds/attributes.jsonl", "question_template": "prompts/q.jinja",
                   "answer_template": "prompts/a.jinja"}
        (tmp_path / "params.yaml").write_text(json.dumps({"teachers": {"t": teacher}, "datasets": {"qa": dataset}}))
        code = 0
        try:
            run(lambda: build_dataset("qa", "curation", curate, tmp_path))
        except SystemExit as e:
            code = e.code
        assert code == 0, capsys.readouterr().err
        assert server.received == 2  # the short topic's question and its answer; the huge row reached nobody
    rejected = [json.loads(line) for line in (tmp_path / "data/qa/rejected.jsonl").read_text().splitlines()]
    assert [(r["reason"], r["seeds"][0]["id"], r["template"]) for r in rejected] == [("too_long", "huge", "prompts/q.jinja")]
    assert json.loads((tmp_path / "data/qa/manifest.json").read_text())["records"] == 1


# ------------------------------------------------------------------------------------------ the render memo

def memo_table(db: sqlite3.Connection) -> str:
    return "memo" if db.execute("SELECT 1 FROM sqlite_master WHERE name = 'memo'").fetchone() else "renders"


def test_a_swapped_or_damaged_memo_row_is_a_miss_never_another_records_answer(tmp_path, capsys):
    # regression: swapping two rows of the render memo swapped two records' answers on the next build, and
    # `kd cache verify` still said OK
    from kd.cli.main import main as kd_main

    with FakeOpenAI() as server:
        root = labeling(tmp_path, server, "Answer: {{ instruction }}", ROWS)
        assert stage(root, capsys)[0] == 0
        first = (root / "data/qa/records.jsonl").read_bytes()
        db = sqlite3.connect(root / ".kd/cache/renders.sqlite3")
        table = memo_table(db)
        (m1, k1), (m2, k2), (m3, k3) = db.execute(f"SELECT memo, key FROM {table} ORDER BY memo LIMIT 3").fetchall()
        with db:
            db.execute(f"UPDATE {table} SET key = ? WHERE memo = ?", (k2, m1))  # swapped
            db.execute(f"UPDATE {table} SET key = ? WHERE memo = ?", (k1, m2))
            db.execute(f"UPDATE {table} SET key = ? WHERE memo = ?", (bytes(32), m3))  # damaged
        db.close()
        with pytest.raises(SystemExit) as e:
            kd_main(["--root", str(root), "cache", "verify"])
        out = capsys.readouterr().out
        assert e.value.code == 1 and out.count("damaged render memo row") == 3, out
        code, out, err = stage(root, capsys)
        assert code == 0 and server.received == 4, err  # nothing asked again: the three rows were rendered again
    assert (root / "data/qa/records.jsonl").read_bytes() == first
    with pytest.raises(SystemExit) as e:  # the misses rewrote their rows
        kd_main(["--root", str(root), "cache", "verify"])
    assert e.value.code == 0 and "render memo: 4 rows, 0 damaged" in capsys.readouterr().out


def test_kd_cache_verify_fix_removes_bad_memo_rows(tmp_path, capsys):
    from kd.cache.renders import verify

    with FakeOpenAI() as server:
        root = labeling(tmp_path, server, "{{ instruction }}", ROWS[:2])
        assert stage(root, capsys)[0] == 0
    db = sqlite3.connect(root / ".kd/cache/renders.sqlite3")
    (memo,) = db.execute("SELECT memo FROM memo ORDER BY memo LIMIT 1").fetchone()
    with db:
        db.execute("UPDATE memo SET key = zeroblob(32) WHERE memo = ?", (memo,))
    db.close()
    assert verify(root / ".kd/cache") == (2, [memo.hex()])
    assert verify(root / ".kd/cache", fix=True) == (2, [memo.hex()])
    assert verify(root / ".kd/cache") == (1, [])
