"""`kd cache push/pull`: a teammate's clone rebuilds from the shared cache without asking the teacher."""

from __future__ import annotations

import gzip
import json
import threading
from pathlib import Path

import torch
from fake_openai import FakeOpenAI
from kdproject import commit, damage, kd, labeling, make_project, repro, sh, store_raw

from kd.cache.features import FeatureCache, Item, entry_problem, feature_key
from kd.cache.share import push
from kd.cache.store import RequestCache, check_entry, make_entry, request_key
from kd.paths import CACHE_DIR
from kd.records import canonical_json, sha256_text

N = 8


def remote_objects(remote: Path) -> list[Path]:
    """Request entries in the one-file-per-entry layout (pushed before packs existed)."""
    return sorted((remote / "kd-cache" / "v1").glob("*/*.json"))


def remote_packs(remote: Path) -> dict[str, list[str]]:
    """pack name -> its keys, for every complete pack (key list present) on the remote."""
    return {p.name[:-5]: p.read_text().split() for p in sorted((remote / "kd-cache" / "packs").glob("*.keys"))}


def pack_lines(remote: Path, name: str) -> list[bytes]:
    return gzip.decompress((remote / "kd-cache" / "packs" / f"{name}.jsonl.gz").read_bytes()).split(b"\n")[:-1]


def write_pack(remote: Path, name: str, lines: list[bytes]) -> None:
    (remote / "kd-cache" / "packs" / f"{name}.jsonl.gz").write_bytes(gzip.compress(b"".join(x + b"\n" for x in lines)))


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
        packs = remote_packs(remote)
        assert len(packs) == 1 and len(next(iter(packs.values()))) == N and remote_objects(remote) == []
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
    packs = remote_packs(shared)  # the same entries make the same pack: one name, whole
    assert len(packs) == 1 and not list(shared.rglob("*.tmp"))
    name, keys = next(iter(packs.items()))
    assert [check_entry(line, key) for line, key in zip(pack_lines(shared, name), keys, strict=True)] == [None] * N

    # in a pack: a flipped answer (checksum mismatch) and an entry under another key's line are both refused,
    # the rest install
    name, keys = next(iter(remote_packs(remote).items()))
    lines = pack_lines(remote, name)
    entry = json.loads(lines[0])
    entry["response"]["text"] = "tampered"
    lines[0] = json.dumps(entry).encode()
    lines[1] = lines[2]
    write_pack(remote, name, lines)
    c = tmp_path / "c"
    sh(tmp_path, "git", "clone", "-q", str(a), str(c))
    code, out = kd(c, "cache", "pull")
    assert code == 1
    assert f"requests: {N - 2} installed, 0 already present, 2 skipped as bad" in out
    assert "checksum mismatch" in out and "does not match its file name" in out
    installed = RequestCache(c / CACHE_DIR)
    assert installed.count() == N - 2 and installed.raw(keys[0]) is None and installed.raw(keys[1]) is None

    # a damaged local entry is reported and never uploaded
    sh(a, "dvc", "remote", "add", "third", str(tmp_path / "third"))
    damage(RequestCache(a / CACHE_DIR), keys[3], lambda b: b[:20])
    code, out = kd(a, "cache", "push", "-r", "third")
    assert code == 1 and "local entry damaged" in out and f"requests: {N - 1} pushed" in out
    assert keys[3] not in next(iter(remote_packs(tmp_path / "third").values()))


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
    nan, no_usage = answer(good)[0], answer(good + 1)[0]
    damage(requests, nan, lambda b: b.replace(b'"score":0.5', b'"score":NaN'))
    entry = json.loads(requests.raw(no_usage))
    del entry["response"]["usage"]
    entry["checksum"] = sha256_text(canonical_json({"request": entry["request"], "response": entry["response"]}))
    store_raw(requests, no_usage, json.dumps(entry).encode())
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
    assert [len(keys) for keys in remote_packs(remote).values()] == [3] and remote_objects(remote) == []
    assert len(list((remote / "kd-cache" / "v1" / "features").glob("*/*.safetensors"))) == 3

    code, out = kd(a, "cache", "verify", "--fix")
    assert code == 0 and "(3 removed)" in out, out
    assert kd(a, "cache", "verify") == (0, "kd cache verify: requests: 3 entries, 0 damaged; features: 3 entries, "
                                           "0 damaged\n")
    code, out = kd(a, "cache", "push")  # incremental, both kinds
    assert code == 0 and "requests: 0 pushed, 3 already there" in out and "features: 0 pushed, 3 already there" in out

    # on the remote: one object in the old one-file layout with NaN, one feature object with a flipped bit; the
    # others still install
    key, req, resp = answer(9)
    bad = remote / "kd-cache" / "v1" / key[:2] / f"{key}.json"
    bad.parent.mkdir(parents=True, exist_ok=True)
    bad.write_bytes(make_entry(key, req, resp).replace(b"0.5", b"NaN"))
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
    assert RequestCache(b / CACHE_DIR).raw(key) is None
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


# push and pull move packs of only what the other side lacks; a second push or pull reads no key list again (the
# cache remembers which packs it has seen)
def test_packs_round_trip_and_a_second_transfer_moves_and_reads_nothing(tmp_path):
    remote = tmp_path / "remote"
    a = dvc_project(tmp_path / "a", remote)
    cache = RequestCache(a / CACHE_DIR)
    for i in range(5):
        cache.put(*answer(i))
    assert kd(a, "cache", "push")[1].startswith("kd cache push (to remote 'store'): requests: 5 pushed, 0 already")
    for i in range(5, 8):
        cache.put(*answer(i))
    code, out = kd(a, "cache", "push")
    assert code == 0 and "requests: 3 pushed, 5 already there" in out
    packs = remote_packs(remote)
    assert sorted(len(k) for k in packs.values()) == [3, 5] and len({k for ks in packs.values() for k in ks}) == 8
    for name in packs:  # a key list no longer needed is not read again (garbage here would be refused if it were)
        (remote / "kd-cache" / "packs" / f"{name}.keys").write_text("garbage\n")
    assert kd(a, "cache", "push")[1].startswith("kd cache push (to remote 'store'): requests: 0 pushed, 8 already")

    for name, keys in packs.items():
        (remote / "kd-cache" / "packs" / f"{name}.keys").write_text("".join(f"{k}\n" for k in keys))
    b = dvc_project(tmp_path / "b", remote)
    RequestCache(b / CACHE_DIR).put(*answer(0))
    code, out = kd(b, "cache", "pull")
    assert code == 0 and "requests: 7 installed, 1 already present, 0 skipped as bad" in out, out
    assert all(RequestCache(b / CACHE_DIR).get(answer(i)[0]) == answer(i)[2] for i in range(8))
    for name in packs:
        (remote / "kd-cache" / "packs" / f"{name}.keys").write_text("garbage\n")
    code, out = kd(b, "cache", "pull")
    assert code == 0 and "requests: 0 installed" in out, out
    code, out = kd(b, "cache", "push")
    assert code == 0 and "requests: 0 pushed, 8 already there" in out

    # an entry removed as damaged takes along what packs held it: a new entry in its row is still pushed
    damage(cache, answer(7)[0], lambda raw: raw[:40])
    assert kd(a, "cache", "verify", "--fix")[0] == 0
    cache.put(*answer(8))
    code, out = kd(a, "cache", "push")
    assert code == 0 and "requests: 1 pushed, 7 already there" in out, out


# a teammate's older push (one file per entry under kd-cache/v1) still pulls, and counts as on the remote for push
def test_pull_of_a_remote_in_the_one_file_layout(tmp_path):
    remote = tmp_path / "remote"
    for i in range(3):
        key, req, resp = answer(i)
        (remote / "kd-cache" / "v1" / key[:2]).mkdir(parents=True, exist_ok=True)
        (remote / "kd-cache" / "v1" / key[:2] / f"{key}.json").write_bytes(make_entry(key, req, resp))
    b = dvc_project(tmp_path / "b", remote)
    code, out = kd(b, "cache", "pull")
    assert code == 0 and "requests: 3 installed, 0 already present, 0 skipped as bad" in out, out
    assert all(RequestCache(b / CACHE_DIR).get(answer(i)[0]) == answer(i)[2] for i in range(3))
    assert "requests: 0 installed, 3 already present" in kd(b, "cache", "pull")[1]
    RequestCache(b / CACHE_DIR).put(*answer(3))
    code, out = kd(b, "cache", "push")
    assert code == 0 and "requests: 1 pushed, 3 already there" in out
    assert list(remote_packs(remote).values()) == [[answer(3)[0]]]

    # a pack whose bytes are not gzip: its entries are refused with why, the rest of the pull goes on
    name = "f" * 64
    (remote / "kd-cache" / "packs" / f"{name}.jsonl.gz").write_bytes(b"not gzip")
    (remote / "kd-cache" / "packs" / f"{name}.keys").write_text(f"{answer(4)[0]}\n")
    c = dvc_project(tmp_path / "c", remote)
    code, out = kd(c, "cache", "pull")
    assert code == 1 and "requests: 4 installed, 0 already present, 1 skipped as bad" in out, out
    assert f"packs/{name}.jsonl.gz unreadable (BadGzipFile)" in out
