"""The local backend on a tiny random model: batching never changes an answer; finish reasons and usage."""

from __future__ import annotations

from pathlib import Path

import pytest

from kd.cache.store import request_key
from kd.config import LocalTeacher as LocalConfig
from kd.runtime.local import LocalTeacher
from kd.runtime.models import directory_digest


def items(teacher: LocalTeacher, texts: list[str], temperature: float = 1.0, max_tokens: int = 6,
          stop: list[str] | None = None) -> list[tuple[str, dict]]:
    out = []
    for i, text in enumerate(texts):
        r = {"backend": "local", "teacher": teacher.identity, "messages": [{"role": "user", "content": text}],
             "sampling": {"temperature": temperature, "top_p": 0.9, "max_tokens": max_tokens, "stop": stop or []},
             "sample_index": i, "response_format": None}
        out.append((request_key(r), r))
    return out


@pytest.fixture(scope="module")
def teacher(tiny_model_dir: Path) -> LocalTeacher:
    return LocalTeacher("tiny", LocalConfig(backend="local", path=str(tiny_model_dir), dtype="float32", batch_size=4),
                        Path("."))


def answers(teacher: LocalTeacher, batch: list[tuple[str, dict]]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    teacher.generate(batch, lambda k, r: out.__setitem__(k, r))
    return out


def test_sampled_answer_does_not_depend_on_batch_or_order(teacher):
    batch = items(teacher, ["short", "a much longer prompt with many words in it", "mid length prompt", "x"])
    together = answers(teacher, batch)
    alone = {k: v for kr in reversed(batch) for k, v in answers(teacher, [kr]).items()}
    assert together == alone
    assert len({r["text"] for r in together.values()}) > 1


def test_greedy_is_deterministic_and_sample_index_draws_anew(teacher):
    a = answers(teacher, items(teacher, ["same", "same"], temperature=1.0))
    assert len({r["text"] for r in a.values()}) == 2  # different sample index -> different draw
    g1 = answers(teacher, items(teacher, ["same"], temperature=0.0))
    g2 = answers(teacher, items(teacher, ["same"], temperature=0.0))
    assert g1 == g2


def test_length_finish_and_usage(teacher):
    batch = items(teacher, ["count the tokens"], max_tokens=5)
    (r,) = answers(teacher, batch).values()
    assert r["finish_reason"] == "length" and r["usage"]["completion_tokens"] == 5
    prompt_ids = teacher._tok.apply_chat_template(batch[0][1]["messages"], add_generation_prompt=True)["input_ids"]
    assert r["usage"]["prompt_tokens"] == len(prompt_ids)


def test_identity_digest_follows_weights(tiny_model_dir, tmp_path, monkeypatch):
    import shutil

    monkeypatch.chdir(tmp_path)  # the digest memo lives under .kd/ of the working directory
    copy = tmp_path / "m"
    shutil.copytree(tiny_model_dir, copy)
    d1 = directory_digest(copy)
    assert directory_digest(copy) == d1
    # kd's provenance (a student's card and kd_model.json name its commit and MLflow run) is not its identity:
    # the same weights rebuilt in another clone must draw the same samples when the student generates
    rebuilt = shutil.copytree(copy, tmp_path / "rebuilt")  # another path: no memoised digest to return
    (rebuilt / "kd_model.json").write_text('{"mlflow_run_id": "another run"}')
    (rebuilt / "README.md").write_text("# another card")
    assert directory_digest(rebuilt) == d1
    with (copy / "model.safetensors").open("r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    assert directory_digest(copy) != d1
