"""`kd cache push/pull`: a teammate's clone rebuilds from the shared cache without asking the teacher."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import torch
from fake_openai import FakeOpenAI
from kdproject import commit, kd, labeling, make_project, repro, sh

from kd.cache.features import FeatureCache, Item, entry_problem, feature_key
from kd.cache.share import push
from kd.cache.store import RequestCache, request_key
from kd.paths import CACHE_DIR
from kd.records import canonical_json, sha256_text

N = 8


def remote_objects(remote: Path) -> list[Path]:
    return sorted((remote / "kd-cache" / "v1").glob("*/*.json"))


def test_push_clone_pull_rebuilds_with_zero_teacher_requests_and_rejects_corrupt_objects(tmp_path):
    remote = tmp_path / "remote"
    with FakeOpenAI() as server:
        a = make_project(tmp_path / "a", server.url, {"qa": labeling(N)})
        sh(a, "dvc", "remote", "add", "-d", "store", str(remote))
        repro(a)
        commit(a, "build qa")
        assert server.received == N
        assert kd(a, "cache", "push") == (0, f"kd cache push (to remote 'store'): requests: {N} pushed, 0 already "
                                             f"there, 0 skipped as damaged; features: 0 pushed, 0 already there, 0 "
                                             f"skipped as damaged\n")
        assert len(remote_objects(remote)) == N
        code, out = kd(a, "cache", "push")  # incremental: nothing new
        assert code == 0 and f"requests: 0 pushed, {N} already there" in out

        b = tmp_path / "b"
        sh(tmp_path, "git", "clone", "-q", str(a), str(b))
        code, out = kd(b, "cache", "pull")
        assert code == 0 and f"from remote 'store'): requests: {N} installed" in out
        rebuilt = repro(b)
        assert server.received == N, "the clone must not ask the teacher again"
        assert f"qa: {N} records ({N} cached, 0 new" in rebuilt.stdout
        assert (b / "data/qa/records.jsonl").read_bytes() == (a / "data/qa/records.jsonl").read_bytes()

    # two teammates pushing the same entries at once to a new remote: every object lands whole, once
    shared = tmp_path / "shared"
    for root in (a, b):
        sh(root, "dvc", "remote", "add", "shared", str(shared))
    threads = [threading.Thread(target=push, args=(root, "shared")) for root in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(remote_objects(shared)) == N and not [p for p in shared.rglob("*") if p.is_file() and p.suffix != ".json"]
    assert all(json.loads(p.read_text())["key"] == p.stem for p in remote_objects(shared))

    # a flipped answer (checksum mismatch) and an entry stored under another key's name are both refused
    objects = remote_objects(remote)
    entry = json.loads(objects[0].read_text())
    entry["response"]["text"] = "tampered"
    objects[0].write_text(json.dumps(entry))
    objects[1].write_bytes(objects[2].read_bytes())
    c = tmp_path / "c"
    sh(tmp_path, "git", "clone", "-q", str(a), str(c))
    code, out = kd(c, "cache", "pull")
    assert code == 1
    assert f"requests: {N - 2} installed, 0 already present, 2 skipped as bad" in out
    assert "checksum mismatch" in out and "does not match its file name" in out
    installed = {p.name for p in (c / ".kd" / "cache").glob("*/*.json")}
    assert objects[0].name not in installed and objects[1].name not in installed and len(installed) == N - 2

    # a damaged local entry is reported and never uploaded
    damaged = next((a / ".kd" / "cache").glob("*/*.json"))
    damaged.write_bytes(damaged.read_bytes()[:20])
    (shared / "kd-cache" / "v1" / damaged.parent.name / damaged.name).unlink()
    code, out = kd(a, "cache", "push", "-r", "shared")
    assert code == 1 and "local entry damaged" in out and "requests: 0 pushed" in out


def dvc_project(root: Path, remote: Path) -> Path:
    """A bare git + DVC project with a default remote: all `kd cache` needs (no build)."""
    root.mkdir(parents=True)
    for cmd in (("git", "init", "-q"), ("dvc", "init", "-q"), ("dvc", "remote", "add", "-d", "store", str(remote))):
        sh(root, *cmd)
    return root


def answer(i: int) -> tuple[str, dict, dict]:
    req = {"backend": "local", "teacher": {"backend": "local", "digest": "d"},
           "messages": [{"role": "user", "content": f"question {i}"}], "sampling": {"temperature": 0.0},
           "sample_index": 0, "response_format": None}
    return request_key(req), req, {"text": f"answer {i}", "finish_reason": "stop", "score": 0.5,
                                   "usage": {"prompt_tokens": 3, "completion_tokens": 2}}


def features(i: int, k: int = 4) -> tuple[Item, dict]:
    ids = list(range(1, 6 + i))
    item = Item({}, ids, 2, feature_key({"backend": "local", "digest": "d"}, ids, k))
    c = len(ids) - 2
    g = torch.Generator().manual_seed(i)
    return item, {"input_ids": torch.tensor(ids, dtype=torch.int32),
                  "topk_ids": torch.arange(c * k, dtype=torch.int32).reshape(c, k),
                  "topk_logprobs": -torch.rand(c, k, generator=g).half(),
                  "tail_logprob": -torch.rand(c, generator=g).half()}


def fill(root: Path, good: int) -> tuple[RequestCache, FeatureCache, list[Item]]:
    """`good` request entries and `good` feature entries, plus the damage seen in the wild: a request entry with NaN,
    one without usage, a feature entry with NaN log-probabilities."""
    requests, feats = RequestCache(root / CACHE_DIR), FeatureCache.within(root / CACHE_DIR)
    for i in range(good + 2):
        key, req, resp = answer(i)
        requests.put(key, req, resp)
    nan, no_usage = requests.path(answer(good)[0]), requests.path(answer(good + 1)[0])
    nan.write_bytes(nan.read_bytes().replace(b'"score":0.5', b'"score":NaN'))
    entry = json.loads(no_usage.read_text())
    del entry["response"]["usage"]
    entry["checksum"] = sha256_text(canonical_json({"request": entry["request"], "response": entry["response"]}))
    no_usage.write_text(json.dumps(entry))
    items = []
    for i in range(good + 1):
        item, tensors = features(i)
        if i == good:
            tensors["topk_logprobs"][0, 0] = float("nan")
        feats.put(item, tensors)
        items.append(item)
    return requests, feats, items


# bugs: a NaN entry or one without usage crashed verify, --fix, push and pull with a traceback; a remote object with
# NaN aborted pull midway with no summary; and the feature (top-k logits) cache was neither verified nor shared
def test_verify_push_pull_report_bad_entries_go_on_and_carry_the_feature_cache(tmp_path):
    remote = tmp_path / "remote"
    a = dvc_project(tmp_path / "a", remote)
    _, feats, items = fill(a, good=3)

    code, out = kd(a, "cache", "verify")
    assert code == 1, out
    assert out.count("damaged request entry") == 2 and out.count("damaged feature entry") == 1
    assert "NaN" in out and "no usage" in out and "non-finite log-probabilities" in out
    assert out.endswith("kd cache verify: requests: 5 entries, 2 damaged; features: 4 entries, 1 damaged\n")

    code, out = kd(a, "cache", "push")
    assert code == 1 and out.count("local entry damaged") == 3, out
    assert ("kd cache push (to remote 'store'): requests: 3 pushed, 0 already there, 2 skipped as damaged; "
            "features: 3 pushed, 0 already there, 1 skipped as damaged") in out
    assert len(remote_objects(remote)) == 3
    assert len(list((remote / "kd-cache" / "v1" / "features").glob("*/*.safetensors"))) == 3

    code, out = kd(a, "cache", "verify", "--fix")
    assert code == 0 and "(3 removed)" in out, out
    assert kd(a, "cache", "verify") == (0, "kd cache verify: requests: 3 entries, 0 damaged; features: 3 entries, "
                                           "0 damaged\n")
    code, out = kd(a, "cache", "push")  # incremental, both kinds
    assert code == 0 and "requests: 0 pushed, 3 already there" in out and "features: 0 pushed, 3 already there" in out

    # on the remote: one object with NaN, one feature object with a flipped bit; the others still install
    key, req, resp = answer(9)
    RequestCache(tmp_path / "elsewhere").put(key, req, resp)
    bad = remote / "kd-cache" / "v1" / key[:2] / f"{key}.json"
    bad.parent.mkdir(parents=True, exist_ok=True)
    bad.write_bytes((tmp_path / "elsewhere" / key[:2] / f"{key}.json").read_bytes().replace(b"0.5", b"NaN"))
    flipped = feats.path(items[0].key)
    remote_flipped = remote / "kd-cache" / "v1" / "features" / flipped.parent.name / flipped.name
    raw = bytearray(remote_flipped.read_bytes())
    raw[-1] ^= 0x01
    remote_flipped.write_bytes(bytes(raw))

    b = dvc_project(tmp_path / "b", remote)
    code, out = kd(b, "cache", "pull")
    assert code == 1, out
    assert ("kd cache pull (from remote 'store'): requests: 3 installed, 0 already present, 1 skipped as bad; "
            "features: 2 installed, 0 already present, 1 skipped as bad") in out
    assert "holds NaN, which JSON does not allow" in out and "checksum mismatch" in out
    assert not (b / CACHE_DIR / key[:2] / f"{key}.json").exists()
    for i in range(3):
        k = answer(i)[0]
        assert RequestCache(b / CACHE_DIR).get(k) == answer(i)[2]
    fb = FeatureCache.within(b / CACHE_DIR)
    assert not fb.path(items[0].key).exists()
    for i in (1, 2):  # byte-identical, and served to the feature stage as the same tensors
        assert fb.path(items[i].key).read_bytes() == feats.path(items[i].key).read_bytes()
        got, want = fb.get(items[i], 4), features(i)[1]
        assert all(torch.equal(got[n], want[n]) for n in want)
    code, out = kd(b, "cache", "pull")  # again: only the bad objects are still missing, and still refused
    assert code == 1 and "requests: 0 installed, 3 already present, 1 skipped as bad" in out


# bug: entries were judged only when read for a record, so a truncated or tampered feature file could travel
def test_feature_entry_is_judged_on_its_own(tmp_path):
    feats = FeatureCache(tmp_path)
    item, tensors = features(0)
    feats.put(item, tensors)
    raw = feats.path(item.key).read_bytes()
    assert entry_problem(raw, item.key) is None and entry_problem(raw, item.key, item, 4) is None
    assert entry_problem(raw, "0" * 64) == "its key or format does not match"
    assert entry_problem(raw, item.key, item, 8) == "holds top-4, expected top-8"
    assert entry_problem(raw[: len(raw) // 2], item.key).startswith("unreadable safetensors")
    assert entry_problem(b"\xff" * 8, item.key).startswith("unreadable safetensors")
    assert entry_problem(raw[:-2] + bytes([raw[-2] ^ 1, raw[-1]]), item.key) == "checksum mismatch"
