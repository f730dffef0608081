"""Hostile input against the tools people read output from (issue 19, items 8, 9, 12, 15): terminal escapes in
teacher answers, seed rows and remote key lists are shown, never sent; a gzip-bomb pack is refused in one line;
`kd view` answers on [::1], turns out-of-range numbers into 400 pages, shows no absolute path, stays responsive
while a status forecast spins, and stops on SIGTERM."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
import urllib.request
from pathlib import Path

import pytest
from fsspec.implementations.local import LocalFileSystem
from kdproject import kd, sh
from starlette.testclient import TestClient
from viewproject import shared_view_project

from kd.cache import packs
from kd.cache.store import RequestCache, make_entry, request_key
from kd.paths import CACHE_DIR
from kd.records import finalize, write_dataset
from kd.view.app import create_app

TESTS = Path(__file__).resolve().parent

# what a terminal acts on: C0 but newline/tab, DEL, C1, bidi controls
RAW = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
KD_STYLE = re.compile(r"\x1b\[(?:0|1|2|31|32|33|36)m")  # kd's own colours (kd/cli/term.py Style)
SEQUENCES = ["\x1b[2J\x1b[H", "\x1b]52;c;ZWNobyBwd25lZA==\x07", "\x1b]0;pwned\x1b\\", "\x9b2J", "\x9d0;t\x9c",
             "\x07", "\x7f", "\u202e", "\u2066", "\x00", "\x08", "\r", "\x1bP+q\x1b\\", "\x1b[31m"]


def hostile(rng: random.Random, n: int = 6) -> str:
    """Words with generated escape sequences between them: known attacks and random control characters."""
    parts = []
    for _ in range(n):
        parts.append(rng.choice(["answer", "seed", "x", "<b>"]))
        parts.append(rng.choice(SEQUENCES) if rng.random() < 0.6 else
                     chr(rng.choice([*range(0, 9), *range(11, 32), *range(127, 160), 0x202A, 0x2067])))
    return "".join(parts)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_view_project(tmp_path_factory)


def assert_clean(out: str, colour: bool, what: str) -> None:
    rest = KD_STYLE.sub("", out) if colour else out
    assert not RAW.search(rest), (what, RAW.findall(rest)[:5], out[:400])
    assert re.search(r"\\x[0-9a-f]{2}|\\u[0-9a-f]{4}", out), (what, "the data was not printed", out[:400])


# bug: terminal escapes (clear screen, title, OSC 52 clipboard write) in teacher answers and seed text reached the
# terminal raw through kd show, kd audit, kd diff and kd status; kd's own colours must still work
def test_escapes_in_data_are_shown_not_sent_by_every_printer(project, tmp_path, monkeypatch):
    root = tmp_path / "p"
    shutil.copytree(project, root, symlinks=True)
    rng = random.Random(19)
    seeds = [{"id": f"h-{i}", "instruction": hostile(rng)} for i in range(4)]
    (root / "seeds/hostile.jsonl").write_text("".join(json.dumps(s) + "\n" for s in seeds))

    def records(tag: str) -> list[dict]:
        return [finalize({"prompt": [{"role": "user", "content": s["instruction"]}],
                          "completion": [{"role": "assistant", "content": hostile(rng) + tag}], "category": "x",
                          "provenance": {"method": "labeling", "stage": "hostile", "requests": [], "parents": [],
                                         "seeds": [{"file": "seeds/hostile.jsonl", "id": s["id"]}], "filters": []}})
                for s in seeds]

    rejected = [{"reason": "length", "text": hostile(rng), "template": "t.jinja", "request_key": "0" * 64}]
    old = records("")
    write_dataset(root / "data/hostile", "hostile", "labeling", old, rejected, {}, {"model": hostile(rng, 1)})
    write_dataset(tmp_path / "old/hostile", "hostile", "labeling", records(" v1"), [], {}, {"model": "fake"})
    runs = {"show": ["show", "hostile", "-n", "4"], "show --rejected": ["show", "hostile", "--rejected"],
            "error": ["audit", "hostile:" + hostile(rng, 2)]}
    for colour in ("never", "always"):
        runs |= {f"audit {colour}": ["audit", f"hostile:{old[0]['id'][:12]}", "--color", colour],
                 f"diff {colour}": ["diff", str(tmp_path / "old/hostile"), str(root / "data/hostile"), "-n", "4",
                                    "--color", colour],
                 f"status {colour}": ["status", "--color", colour]}
    for fmt in ("audit", "diff", "status"):
        runs[f"{fmt} json"] = [*runs[f"{fmt} never"][:-2], "--json"]

    from kd.cli import main as cli

    real_status = cli.status

    def status_with_hostile_text(r: Path) -> dict:  # a forecast whose messages quote a seed row
        report = real_status(r)
        for row in report["stages"]:
            row["why"] = [*row.get("why", []), seeds[0]["instruction"]]
        return report

    monkeypatch.setattr(cli, "status", status_with_hostile_text)
    for what, argv in runs.items():
        code, out = kd(root, *argv)
        assert code in (0, 1, 2), (what, code, out[:400])
        assert_clean(out, "always" in argv, what)
        if what.endswith("json"):  # still JSON, and the data in it unchanged
            assert json.loads(out)
    # the helper itself (imported here: the other tests of this file also run against code without it): a lone
    # surrogate (would be a UnicodeEncodeError traceback) and nested reports
    from kd.cli.term import printable

    assert printable({"k\x1b": ["\ud800", ("\u202e",)]}) == {"k\\x1b": ["\\ud800", ("\\u202e",)]}
    assert printable("tab\tand\nnewline kept") == "tab\tand\nnewline kept"


def dvc_project(root: Path, remote: Path) -> Path:
    """A git + DVC project with a default remote, as `dvc init` and `dvc remote add -d` write it (seconds sooner)."""
    (root / ".dvc").mkdir(parents=True)
    sh(root, "git", "init", "-q")
    (root / ".dvc/config").write_text(f"[core]\n    analytics = false\n    remote = store\n"
                                      f"['remote \"store\"']\n    url = {remote}\n")
    return root


def entry(i: int) -> tuple[str, bytes]:
    req = {"backend": "local", "teacher": {"backend": "local", "digest": "d"}, "sampling": {"temperature": 0.0},
           "messages": [{"role": "user", "content": f"question {i}"}], "sample_index": 0, "response_format": None}
    key = request_key(req)
    return key, make_entry(key, req, {"text": f"answer {i}", "finish_reason": "stop",
                                      "usage": {"prompt_tokens": 3, "completion_tokens": 2}})


def put_pack(remote: Path, name: str, keys: list[str], body: bytes) -> None:
    packs = remote / "kd-cache" / "packs"
    packs.mkdir(parents=True, exist_ok=True)
    (packs / f"{name}.jsonl.gz").write_bytes(body)
    (packs / f"{name}.keys").write_text("".join(f"{k}\n" for k in keys))


# bug: `kd cache pull` of a 1.9 MB gzip-bomb pack grew to 4.0 GB (the whole pack was decompressed at once); and
# remote key text was printed raw
def test_gzip_bomb_packs_are_refused_in_one_line_and_the_others_install(tmp_path, monkeypatch):
    remote = tmp_path / "remote"
    good = [entry(i) for i in range(3)]
    name, body, keys = packs.pack(good)
    put_pack(remote, name, keys.decode().split(), body)
    fake = [f"{i:064x}" for i in range(4)]
    zeros = gzip.compress(b"\0" * (10 << 20), compresslevel=9)  # one 10 MB line: past the entry limit
    lines = gzip.compress((b"0" * 1023 + b"\n") * (10 << 10), compresslevel=9)  # 10 MB of lines, ~1000x: ratio
    big = gzip.compress(b"".join(os.urandom(512).hex().encode() + b"\n" for _ in range(4 << 10)), compresslevel=1)
    for n, bomb in ((1, zeros), (2, lines), (3, big)):  # `big`: 4 MB at ~2x, past the size limit below
        put_pack(remote, f"{n}" * 64, fake, bomb)
    put_pack(remote, "4" * 64, ["\x1b]52;c;cHduZWQ=\x07" + "a" * 40], gzip.compress(b"{}\n"))
    monkeypatch.setattr(packs, "ENTRY_MAX_BYTES", 1 << 20)
    monkeypatch.setattr(packs, "RATIO_FROM", 1 << 20)
    monkeypatch.setattr(packs, "PACK_MAX_BYTES", 3 << 20)
    root = dvc_project(tmp_path / "b", remote)
    code, out = kd(root, "cache", "pull")
    assert code == 1 and "requests: 3 installed, 0 already present, 4 skipped as bad" in out, out
    assert all(RequestCache(root / CACHE_DIR).get(k) for k, _ in good)
    for n, why in ((1, "holds an entry over 1 MB"), (2, "decompresses past 200x its size"),
                   (3, "decompresses past 3 MB")):
        assert len([line for line in out.splitlines() if f"{str(n) * 64}.jsonl.gz refused: {why}" in line]) == 1, out
    assert "\\x1b]52;c;cHduZ" in out and not RAW.search(out), out  # remote key text shown, not sent
    for n in (1, 2):  # read a line at a time: memory stays near the entry limit, not near the bomb's size
        tracemalloc.start()
        try:
            with pytest.raises(packs.PackRefused):
                for _ in packs.pack_lines(LocalFileSystem(), str(remote / "kd-cache/packs" / f"{str(n) * 64}.jsonl.gz")):
                    pass
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 4 << 20, f"peak {peak >> 20} MB reading a 10 MB bomb"


@pytest.fixture(scope="module")
def client(project: Path) -> TestClient:
    return TestClient(create_app(project), base_url="http://127.0.0.1", raise_server_exceptions=False)


# bug: `kd view --host ::1` answered every request 400 "Invalid host header" (the Host header is `[::1]:port`)
def test_ipv6_loopback_host_is_served(project):
    for base in ("http://[::1]:8765", "http://[::1]", "http://localhost:8765"):
        assert TestClient(create_app(project), base_url=base).get("/data/qa").status_code == 200, base
    assert TestClient(create_app(project), base_url="http://[::2]:8765").get("/data/qa").status_code == 400


# bug: `?offset=99999999999999999999` was a 500 (SQLite overflow), and error pages showed the project's absolute path
@pytest.mark.parametrize("url", ["/data/qa?offset=99999999999999999999", "/data/qa?offset=-1", "/data/qa?offset=abc",
                                 "/data/qa?offset=%C2%B2", "/data/qa?offset=1e3",
                                 "/data/qa/rejected?offset=18446744073709551616",
                                 "/diff?dataset=qa&a=HEAD~1&n=99999999999999999999999"])
def test_out_of_range_numbers_are_400_pages(project, client, url):
    r = client.get(url)
    assert r.status_code == 400 and "expected a whole number" in r.text and "Traceback" not in r.text, r.text[:300]


def test_no_page_shows_the_absolute_project_path(project, client):
    metrics = project / "reports/metrics.json"
    kept = metrics.read_bytes()
    metrics.write_text("{not json")  # a 400 page naming the file
    try:
        for url in ("/models", "/diff?dataset=qa&a=nosuchrev", "/data/nope", "/data/qa?offset=x", "/seed?file=x",
                    "/data/qa"):
            r = client.get(url)
            assert str(project) not in r.text and str(project.resolve()) not in r.text, (url, r.text[:500])
        assert "reports/metrics.json: not readable JSON" in client.get("/models").text
    finally:
        metrics.write_bytes(kept)


def slow_pipeline(root: Path) -> dict:
    """A status forecast stuck in C, as a template squaring an int is: one multiplication of a huge int holds the
    GIL for minutes (measured: a thread doing this stalled the main thread for 178 s), so a thread would not do."""
    with open(os.environ["KD_TEST_MARKS"], "a") as f:
        f.write(f"{os.getpid()}\n")
    x = 3
    for _ in range(28):  # 53 MB at the end, minutes before that: the worker is killed long before
        x = x * x
    return {}


def get(url: str, timeout: float = 10) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read().decode()


# bug: `GET /` ran kd status on the event loop: one slow template froze every page (5 loads of / delayed a dataset
# page to 10.6 s), and the viewer then ignored SIGTERM
def test_view_stays_responsive_and_stops_on_sigterm_while_status_spins(project, tmp_path):
    marks = tmp_path / "marks"
    marks.touch()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = ("import sys; from kd.view import pages; import test_hostile_view as t; pages.pipeline = t.slow_pipeline; "
              f"from kd.cli.main import main; main(['--root', {str(project)!r}, 'view', '--port', '{port}'])")
    env = {**os.environ, "KD_TEST_MARKS": str(marks),
           "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS), os.environ.get("PYTHONPATH", "")])}
    server = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, server.communicate()[0]
                time.sleep(0.1)
        assert get(base + "/data/qa")[0] == 200  # the index is built once, before the clock starts
        answers: list[tuple[int, str]] = []

        def load() -> None:
            with contextlib.suppress(OSError):  # the server stopped first (SIGTERM below)
                answers.append(get(base + "/"))

        loads = [threading.Thread(target=load) for _ in range(5)]
        for t in loads:
            t.start()
        while not marks.read_text() and time.monotonic() < deadline + 30:  # the computation has started
            time.sleep(0.05)
        start = time.monotonic()
        status, page = get(base + "/data/qa", timeout=5)
        took = time.monotonic() - start
        assert status == 200 and "Dataset qa" in page and took <= 1.0, took
        time.sleep(0.5)  # the five loads of / are waiting on the one computation
        start = time.monotonic()
        server.send_signal(signal.SIGTERM)
        server.wait(10)
        stopped = time.monotonic() - start
        for t in loads:
            t.join(10)
        assert stopped <= 2.5, stopped
        pids = marks.read_text().split()
        assert len(pids) == 1, pids  # five loads of /, one computation
        time.sleep(0.2)
        state = Path(f"/proc/{pids[0]}/stat")
        assert not state.exists() or state.read_text().split(") ")[1][0] == "Z", "the worker outlived the server"
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        for pid in marks.read_text().split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
