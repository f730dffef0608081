"""Request cache: keys cover exactly what determines an answer; damage is detected, never served."""

from __future__ import annotations

import json
import threading

from kd.cache.store import RequestCache, request_key


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
    path = cache.path(key)
    for damage in (lambda b: b[: len(b) // 2],  # truncated write
                   lambda b: b.replace(b"hello", b"jello"),  # edited answer: checksum mismatch
                   lambda b: b"\x00" * 10):
        cache.put(key, request(), RESPONSE)
        path.write_bytes(damage(path.read_bytes()))
        assert cache.get(key) is None
        assert not path.exists()
    assert len(cache.stats.corrupted) == 3
    assert "damaged" in capsys.readouterr().err


def test_entry_under_wrong_key_is_rejected(tmp_path):
    cache = RequestCache(tmp_path)
    k1, k2 = request_key(request()), request_key(request(sample_index=1))
    cache.put(k1, request(), RESPONSE)
    cache.path(k2).parent.mkdir(parents=True, exist_ok=True)
    entry = json.loads(cache.path(k1).read_text())
    entry["key"] = k2
    cache.path(k2).write_text(json.dumps(entry))
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
