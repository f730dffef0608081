"""Request cache: keys cover exactly what determines an answer; damage is detected, never served."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
import threading
from contextlib import closing
from pathlib import Path

import pytest
from kdproject import damage, store_raw

from kd.cache.store import CACHE_FORMAT, RequestCache, check_entry, make_entry, request_key
from kd.errors import KdError
from kd.paths import CACHE_DIR
from kd.records import canonical_json, sha256_text
from kd.runtime.ask import Asker, Call


def request(**over) -> dict:
    base = {"backend": "local", "teacher": {"backend": "local", "digest": "d"},
            "messages": [{"role": "user", "content": "hi"}],
            "sampling": {"temperature": 0.0, "top_p": 1.0, "max_tokens": 8, "stop": []},
            "sample_index": 0, "response_format": None}
    return {**base, **over}


RESPONSE = {"text": "hello", "finish_reason": "stop", "usage": {"prompt_tokens": 3, "completion_tokens": 1}}


def test_key_changes_with_everything_that_changes_the_answer():
    keys = {request_key(request()),
            request_key(request(messages=[{"role": "user", "content": "hi!"}])),
            request_key(request(sampling={"temperature": 0.5, "top_p": 1.0, "max_tokens": 8, "stop": []})),
            request_key(request(sample_index=1)),
            request_key(request(teacher={"backend": "local", "digest": "e"})),
            request_key(request(response_format={"type": "json_object"}))}
    assert len(keys) == 6
    assert request_key(request()) == request_key(dict(reversed(list(request().items()))))


def test_put_get_roundtrip_and_stats(tmp_path):
    cache = RequestCache(tmp_path)
    key = request_key(request())
    assert cache.get(key) is None
    cache.put(key, request(), RESPONSE)
    assert cache.get(key) == RESPONSE
    assert (cache.stats.hits, cache.stats.misses, cache.stats.written) == (1, 1, 1)
    assert list(tmp_path.rglob("*.tmp")) == []


def test_damaged_entries_are_reported_removed_and_missed(tmp_path, capsys):
    cache = RequestCache(tmp_path)
    key = request_key(request())
    for how in (lambda b: b[: len(b) // 2],  # truncated write
                lambda b: b.replace(b"hello", b"jello"),  # edited answer: checksum mismatch
                lambda b: b"\x00" * 10):
        cache.put(key, request(), RESPONSE)
        damage(cache, key, how)
        assert cache.get(key) is None
        assert cache.raw(key) is None  # removed
    assert len(cache.stats.corrupted) == 3
    assert "damaged" in capsys.readouterr().err


# a row whose bytes were cut short inside the database is reported by `kd cache verify`, removed by --fix, never served
def test_truncated_row_is_listed_by_verify_fixed_and_never_served(tmp_path, capsys):
    from kdproject import kd

    cache = RequestCache(tmp_path / CACHE_DIR)
    keys = [request_key(request(sample_index=i)) for i in range(3)]
    for i, key in enumerate(keys):
        cache.put(key, request(sample_index=i), RESPONSE)
    with closing(sqlite3.connect(cache.db, isolation_level=None)) as db:
        db.execute("UPDATE entries SET entry = substr(entry, 1, 50) WHERE key = ?", (keys[1],))
    code, out = kd(tmp_path, "cache", "verify")
    assert code == 1 and f"damaged request entry: {cache.db}:{keys[1]} (not valid JSON" in out
    assert out.endswith("kd cache verify: requests: 3 entries, 1 damaged; features: 0 entries, 0 damaged\n")
    assert RequestCache(tmp_path / CACHE_DIR).get_entry(keys[1]) is None
    code, out = kd(tmp_path, "cache", "verify", "--fix")
    assert code == 0 and "(1 removed)" in out
    assert kd(tmp_path, "cache", "verify")[0] == 0
    fresh = RequestCache(tmp_path / CACHE_DIR)
    assert fresh.get(keys[1]) is None and fresh.get(keys[0]) == RESPONSE and fresh.count() == 2


# a damaged database FILE (garbage over its header) stops a reader, a stage and verify with one line naming the file
# and how to recover, not a traceback
def test_damaged_database_file_is_one_line_naming_it(tmp_path):
    from kdproject import kd

    cache = RequestCache(tmp_path / CACHE_DIR)
    cache.put(request_key(request()), request(), RESPONSE)
    cache.close()
    with open(cache.db, "r+b") as f:
        f.write(b"garbage " * 64)
    fresh = RequestCache(tmp_path / CACHE_DIR)
    with pytest.raises(KdError, match=f"^{re.escape(str(cache.db))}: the request cache database is damaged .*"
                                      f"move it away .*kd cache pull"):
        fresh.get(request_key(request()))
    with pytest.raises(KdError, match="database is damaged"):
        Asker(CountingTeacher(), fresh, "qa").ask([Call(request_key(request()), request(), None)])
    code, out = kd(tmp_path, "cache", "verify")
    assert code != 0 and "Traceback" not in out and f"{cache.db}: the request cache database is damaged" in out


# present() and teachers() answer a forecast from the columns, without reading entries
def test_present_and_teachers_come_from_the_columns(tmp_path):
    cache = RequestCache(tmp_path)
    other = request(teacher={"backend": "local", "digest": "e"}, messages=[{"role": "user", "content": "hello"}, {"role": "system"}])
    for req in (request(), other):
        cache.put(request_key(req), req, RESPONSE)
    assert cache.present([request_key(request()), request_key(other), "0" * 64]) == {
        request_key(request()): (2, 3, 1), request_key(other): (5, 3, 1)}
    assert cache.teachers() == [{"backend": "local", "digest": "d"}, {"backend": "local", "digest": "e"}]
    keys = [request_key(request(sample_index=i)) for i in range(1200)]  # more keys than one query takes
    assert len(RequestCache(tmp_path / "none").present(keys)) == 0 and not (tmp_path / "none").exists()
    cache.insert([(k, b"{}", {"request": request(sample_index=i), "response": RESPONSE}) for i, k in enumerate(keys)])
    assert len(cache.present(keys)) == 1200


def test_entry_under_wrong_key_is_rejected(tmp_path):
    cache = RequestCache(tmp_path)
    k1, k2 = request_key(request()), request_key(request(sample_index=1))
    cache.put(k1, request(), RESPONSE)
    entry = json.loads(cache.raw(k1))
    entry["key"] = k2
    store_raw(cache, k2, json.dumps(entry).encode())
    assert cache.get(k2) is None


def test_concurrent_writers_leave_whole_entries(tmp_path):
    cache = RequestCache(tmp_path)
    keys = [request_key(request(sample_index=i)) for i in range(50)]

    def writer() -> None:
        for i, k in enumerate(keys):
            cache.put(k, request(sample_index=i), RESPONSE)

    threads = [threading.Thread(target=writer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    fresh = RequestCache(tmp_path)
    assert all(fresh.get(k) == RESPONSE for k in keys) and not fresh.stats.corrupted


WRITER = """
import sys
from kd.cache.store import RequestCache, request_key
sys.path.insert(0, sys.argv[3])
from test_cache import RESPONSE, request
cache = RequestCache(sys.argv[1])
start = int(sys.argv[2])
for i in range(start, start + 200):
    cache.put(request_key(request(sample_index=i)), request(sample_index=i), RESPONSE)
"""


# two processes writing at once (SQLite's locks, busy timeout) both land every entry whole
def test_two_processes_writing_at_once_leave_every_entry(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(start), str(Path(__file__).parent)],
                              env=env) for start in (0, 200)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    cache = RequestCache(tmp_path)
    assert cache.count() == 400
    assert all(check_entry(raw, key) is None for key, raw in cache.entries())
    assert all(cache.get(request_key(request(sample_index=i))) == RESPONSE for i in range(400))


# a directory in the one-file-per-request layout is moved into the database once (a damaged file reported and left
# out), and serves the same answers
def test_legacy_files_are_moved_in_once(tmp_path, capsys):
    keys = [request_key(request(sample_index=i)) for i in range(4)]
    for i, key in enumerate(keys):
        raw = make_entry(key, request(sample_index=i), RESPONSE)
        (tmp_path / key[:2]).mkdir(exist_ok=True)
        (tmp_path / key[:2] / f"{key}.json").write_bytes(raw[:30] if i == 3 else raw)
    (tmp_path / "features").mkdir()  # the feature cache stays where it is
    (tmp_path / "features" / "keep.safetensors").write_bytes(b"x")
    cache = RequestCache(tmp_path)
    assert cache.get(keys[0]) == RESPONSE
    err = capsys.readouterr().err
    assert f"kd: moved 3 request cache entries (3 new) from one file each into {cache.db}; 1 damaged left out" in err
    assert f"{keys[3]}.json is damaged (not valid JSON" in err
    assert not list(tmp_path.glob("*/*.json")) and cache.count() == 3
    assert (tmp_path / "features" / "keep.safetensors").exists()
    assert [RequestCache(tmp_path).get(k) for k in keys] == [RESPONSE] * 3 + [None]
    assert "moved" not in capsys.readouterr().err  # once


def write_entry(cache: RequestCache, key: str, body: dict) -> None:
    """An entry with a correct checksum over whatever `body` holds (what a buggy or older writer could leave)."""
    entry = {"cache_format": CACHE_FORMAT, "key": key, "checksum": sha256_text(canonical_json(body)), **body}
    store_raw(cache, key, canonical_json(entry).encode())


class CountingTeacher:
    """A Teacher (kd.runtime.teachers protocol) that answers RESPONSE and counts what it was asked."""

    identity = request()["teacher"]

    def __init__(self) -> None:
        self.asked: list[str] = []

    def generate(self, items, on_result) -> None:
        for key, _ in items:
            self.asked.append(key)
            on_result(key, RESPONSE)


def damaged_entries(cache: RequestCache) -> dict[str, str]:
    """sample index -> how its entry is damaged, written into `cache`: every way an entry was seen to crash a reader."""
    kinds = {}
    for i, how in enumerate(("nan", "infinity", "no usage", "usage not counts", "not utf-8")):
        key = request_key(request(sample_index=i))
        if how in ("nan", "infinity"):
            cache.put(key, request(sample_index=i), {**RESPONSE, "score": 0.5})
            bad = b'"score":NaN' if how == "nan" else b'"score":-Infinity'
            damage(cache, key, lambda b, bad=bad: b.replace(b'"score":0.5', bad))
        elif how == "no usage":
            write_entry(cache, key, {"request": request(sample_index=i),
                                     "response": {"text": "hi", "finish_reason": "stop"}})
        elif how == "usage not counts":
            write_entry(cache, key, {"request": request(sample_index=i),
                                     "response": {**RESPONSE, "usage": {"prompt_tokens": "3", "completion_tokens": 1}}})
        else:
            cache.put(key, request(sample_index=i), {**RESPONSE, "text": "héllo"})
            damage(cache, key, lambda b: b.replace("é".encode(), b"\xe9"))
        kinds[key] = how
    return kinds


# bug: an entry holding NaN/Infinity (or not UTF-8) made check_entry raise (canonical_json refuses NaN) and one
# lacking usage passed it, so every stage reading either crashed with a traceback; now misses, asked again, counted
def test_nan_missing_usage_and_unreadable_entries_are_misses_asked_again(tmp_path, capsys):
    cache = RequestCache(tmp_path)
    damaged = damaged_entries(cache)
    for key, how in damaged.items():
        assert check_entry(cache.raw(key), key), how
        assert cache.get_entry(key) is None, how
    teacher = CountingTeacher()
    asker = Asker(teacher, cache, "qa")
    calls = [Call(request_key(request(sample_index=i)), request(sample_index=i), None) for i in range(len(damaged) + 1)]
    answers = asker.ask(calls)
    assert all(a == RESPONSE for a in answers.values()) and len(answers) == len(damaged) + 1
    assert sorted(teacher.asked) == sorted(c.key for c in calls)  # every damaged entry asked again, plus one new
    assert sorted(cache.stats.corrupted) == sorted(damaged)
    assert cache.stats.note() == f"; {len(damaged)} damaged cache entries asked again"
    err = capsys.readouterr().err
    for why in ("holds NaN", "holds -Infinity", "not UTF-8", "no usage", "usage holds"):
        assert why in err
    assert all(RequestCache(tmp_path).get(k) == RESPONSE for k in damaged)  # and replaced by good answers


# bug: an unreadable cache (permission denied) raised out of every reader; now one line naming the database
@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_database_without_read_permission_is_one_line(tmp_path):
    cache = RequestCache(tmp_path)
    key = request_key(request())
    cache.put(key, request(), RESPONSE)
    cache.close()
    cache.db.chmod(0)
    try:
        with pytest.raises(KdError, match=f"^{re.escape(str(cache.db))}: "):
            RequestCache(tmp_path).get(key)
    finally:
        cache.db.chmod(0o644)


# bug: a read-only .kd/cache let the stage send its requests and then crash on the first put, losing paid answers
@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_cache_stops_before_any_request(tmp_path):
    cache = RequestCache(tmp_path / "cache")
    cache.put(request_key(request()), request(), RESPONSE)
    cache.close()
    for d in (cache.dir, *cache.dir.iterdir()):
        d.chmod(0o555)
    cache = RequestCache(cache.dir)
    try:
        teacher = CountingTeacher()
        asker = Asker(teacher, cache, "qa")
        with pytest.raises(KdError, match=f"^{re.escape(str(cache.dir))}: the request cache directory is not writable"):
            asker.ask([Call(request_key(request(sample_index=1)), request(sample_index=1), None)])
        assert teacher.asked == []
        # everything cached: a read-only (shared) cache still serves a build that asks nothing
        assert asker.ask([Call(request_key(request()), request(), None)]) and teacher.asked == []
    finally:
        for d in (cache.dir, *cache.dir.iterdir()):
            d.chmod(0o755)


# bug: an unusable cache directory (here a file in its place; read-only above) surfaced as a traceback after answers
# came back; it must be one line naming the directory before any request (runs as root too)
def test_unusable_cache_dir_stops_before_any_request(tmp_path):
    (tmp_path / "cache").write_text("not a directory")
    cache = RequestCache(tmp_path / "cache")
    teacher = CountingTeacher()
    assert cache.get(request_key(request())) is None  # reading through it is a plain miss
    with pytest.raises(KdError, match="cache: the request cache is a file, not a directory"):
        Asker(teacher, cache, "qa").ask([Call(request_key(request()), request(), None)])
    assert teacher.asked == []


# bug: a read-only (or otherwise unusable) .kd/cache under `dvc repro` sent every request, then died with a traceback
# on the first write, losing the paid answers (now one line naming the directory, before any request); and a NaN entry
# crashed the stage
def test_stage_with_unwritable_cache_fails_in_one_line_before_asking(tmp_path):
    from fake_openai import FakeOpenAI
    from kdproject import labeling, make_project, repro, sh

    with FakeOpenAI() as server:
        root = make_project(tmp_path / "p", server.url, {"qa": labeling(4)})
        cache = root / ".kd" / "cache"
        cache.parent.mkdir()
        if os.geteuid() == 0:  # root writes into read-only directories: a file in its place is unusable to anyone
            cache.write_text("")
        else:
            cache.mkdir()
            cache.chmod(0o555)
        r = sh(root, "dvc", "repro", check=False)
        assert r.returncode != 0 and server.received == 0
        assert r.stderr.startswith("kd: error: .kd/cache: the request cache "), r.stderr
        assert "Traceback" not in r.stderr + r.stdout and "damaged" not in r.stderr
        cache.unlink() if cache.is_file() else cache.chmod(0o755)
        assert "qa: 4 records (0 cached, 4 new" in repro(root).stdout and server.received == 4
        # and a NaN in an entry, under dvc repro: asked again and counted in the summary, no traceback
        requests = RequestCache(cache)
        damage(requests, next(requests.entries())[0], lambda b: b.replace(b'"prompt_tokens":', b'"prompt_tokens":NaN,"x":'))
        rerun = sh(root, "dvc", "repro", "-f")
        assert "qa: 4 records (3 cached, 1 new" in rerun.stdout and server.received == 5
        assert "; 1 damaged cache entry asked again" in rerun.stdout and "Traceback" not in rerun.stderr


# bug: the feature stage computed a batch of teacher forward passes before finding the feature cache unwritable
def test_feature_stage_with_unwritable_cache_fails_before_the_teacher_runs(tmp_path, tiny_model_dir, monkeypatch):
    from kd.cache.features import FeatureCache
    from kd.config import Feature
    from kd.config import LocalTeacher as LocalConfig
    from kd.elicit.feature import elicit_features
    from kd.records import write_dataset
    from kd.runtime.local import LocalTeacher

    monkeypatch.chdir(tmp_path)  # the teacher digest memo lives under the working directory
    rec = {"prompt": [{"role": "user", "content": "What is 1 + 1?"}],
           "completion": [{"role": "assistant", "content": "Two."}], "category": ""}
    write_dataset(tmp_path / "data" / "src", "src", "labeling", [rec], [], {}, None)
    cfg = Feature(method="feature", teacher="tiny", dataset="src", top_k=4, max_length=64, batch_size=2)
    teacher = LocalTeacher("tiny", LocalConfig(backend="local", path=str(tiny_model_dir), dtype="float32"), tmp_path)
    monkeypatch.setattr(LocalTeacher, "loaded", lambda self: pytest.fail("the teacher ran"))
    (tmp_path / "cache").write_text("")
    with pytest.raises(KdError, match="cache: the feature cache is a file, not a directory"):
        elicit_features("logits", cfg, teacher, tmp_path / "data", FeatureCache(tmp_path / "cache").dir)
    assert not (tmp_path / "data" / "logits").exists()
