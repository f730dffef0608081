"""`kd cache push/pull`: a teammate's clone rebuilds from the shared cache without asking the teacher."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from fake_openai import FakeOpenAI
from kdproject import commit, kd, labeling, make_project, repro, sh

from kd.cache.share import push

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
        assert kd(a, "cache", "push") == (0, f"kd cache push: {N} entries pushed to remote 'store', 0 already there, "
                                             f"0 rejected\n")
        assert len(remote_objects(remote)) == N
        code, out = kd(a, "cache", "push")  # incremental: nothing new
        assert code == 0 and f"0 entries pushed to remote 'store', {N} already there" in out

        b = tmp_path / "b"
        sh(tmp_path, "git", "clone", "-q", str(a), str(b))
        code, out = kd(b, "cache", "pull")
        assert code == 0 and f"{N} entries pulled from remote 'store'" in out
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
    assert f"{N - 2} entries pulled" in out and "2 rejected" in out
    assert "checksum mismatch" in out and "does not match its file name" in out
    installed = {p.name for p in (c / ".kd" / "cache").glob("*/*.json")}
    assert objects[0].name not in installed and objects[1].name not in installed and len(installed) == N - 2

    # a damaged local entry is reported and never uploaded
    damaged = next((a / ".kd" / "cache").glob("*/*.json"))
    damaged.write_bytes(damaged.read_bytes()[:20])
    (shared / "kd-cache" / "v1" / damaged.parent.name / damaged.name).unlink()
    code, out = kd(a, "cache", "push", "-r", "shared")
    assert code == 1 and "local entry damaged" in out and "0 entries pushed" in out
