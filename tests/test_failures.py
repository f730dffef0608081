"""Per-record failures, SIGTERM and killed runs: a request refused for its own sake is one rejection, not a failed
stage; SIGTERM ends a stage like Ctrl-C; a run whose process was killed is closed by the next run of its stage."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from fake_openai import FakeOpenAI

from kd.config import LocalTeacher as LocalConfig
from kd.errors import TeacherError
from kd.runtime.local import LocalTeacher
from kd.runtime.openai import about_the_request

REPO = Path(__file__).resolve().parents[1]
FILES = ("records.jsonl", "rejected.jsonl", "manifest.json")


def labeling_project(root: Path, teacher: dict[str, Any], seeds: str = "seeds/instructions.jsonl", limit: int = 4,
                     max_tokens: int = 32) -> Path:
    for d in ("prompts", "seeds"):
        shutil.copytree(REPO / d, root / d, dirs_exist_ok=True)
    dataset = {"method": "labeling", "teacher": "t", "inputs": [{"seeds": seeds, "limit": limit}],
               "template": "prompts/labeling/answer.jinja", "sampling": {"max_tokens": max_tokens},
               "allow_truncated": True}  # a tiny random model rarely stops by itself
    (root / "params.yaml").write_text(json.dumps({"teachers": {"t": teacher}, "datasets": {"qa": dataset}}))
    return root


def openai_teacher(server: FakeOpenAI) -> dict[str, Any]:
    return {"backend": "openai", "base_url": server.url, "model": "fake", "api_key_env": None, "concurrency": 1,
            "timeout_s": 2, "max_attempts": 2, "backoff_s": 0.01}


def build(root: Path) -> str:
    from kd.elicit.build import build_dataset
    from kd.elicit.labeling import label

    return build_dataset("qa", "labeling", label, root)


def outputs(root: Path) -> dict[str, bytes]:
    return {f: (root / "data/qa" / f).read_bytes() for f in FILES}


# ------------------------------------------------------------------------------------------ server refusals


# Regression: one over-long input (HTTP 400 context_length_exceeded) aborted the whole stage on every rerun.
def test_server_refusals_become_rejections_and_the_stage_goes_on(tmp_path: Path) -> None:
    root = labeling_project(tmp_path, {})
    with FakeOpenAI(faults=["context", "filter"]) as server:
        labeling_project(root, openai_teacher(server))
        line = build(root)
    assert server.received == 4
    assert line.startswith("qa: 2 records (0 cached, 2 new, 2 rejected)")
    manifest = json.loads((root / "data/qa/manifest.json").read_text())
    assert manifest["records"] == 2 and manifest["rejected"] == {"too_long": 1, "refused_by_server": 1}
    rejected = {r["reason"]: r for r in map(json.loads, (root / "data/qa/rejected.jsonl").read_text().splitlines())}
    assert "context_length_exceeded" in rejected["too_long"]["error"]
    assert "HTTP 400" in rejected["refused_by_server"]["error"] and "content_filter" in rejected["refused_by_server"]["error"]
    first = outputs(root)
    # a refusal is never cached as an answer: the rerun asks exactly the two refused requests again, and the
    # same refusals give the same bytes
    with FakeOpenAI(faults=["context", "filter"]) as server:
        labeling_project(root, openai_teacher(server))
        line = build(root)
    assert server.received == 2
    assert line.startswith("qa: 2 records (2 cached, 0 new, 2 rejected)")
    assert outputs(root) == first


# Regression: auth, unknown-model and exhausted-retry failures must still stop the stage (they are not about a record).
@pytest.mark.parametrize("fault", ["401", "403", "404", "500"])
def test_failures_of_the_teacher_still_stop_the_stage(tmp_path: Path, fault: str) -> None:
    with FakeOpenAI(faults=["ok", fault, fault, fault, fault]) as server:
        root = labeling_project(tmp_path, openai_teacher(server))
        with pytest.raises(TeacherError) as err:
            build(root)
    assert "\n" not in str(err.value) and "'t'" in str(err.value)
    assert not (root / "data/qa").exists()


@pytest.mark.parametrize(("status", "body", "reason"), [
    (400, '{"error": {"code": "context_length_exceeded", "message": "too many"}}', "too_long"),  # OpenAI
    (400, "This model's maximum context length is 2048 tokens. However, you requested 3000", "too_long"),  # vLLM
    (400, '{"error": {"message": "the request exceeds the available context size"}}', "too_long"),  # llama.cpp
    (413, "Payload Too Large", "too_long"),
    (400, '{"error": {"code": "content_filter"}}', "refused_by_server"),
    (422, '{"detail": "invalid value for messages"}', "refused_by_server"),
    (400, '{"error": {"message": "The model `gpt-9` does not exist"}}', None),  # about the teacher: fail
    # about what kd sends with every request: every record would be refused, so the stage fails
    (400, '{"error": {"message": "Unsupported parameter: \'max_tokens\' is not supported with this model.", '
          '"code": "unsupported_parameter"}}', None),
    (400, '{"error": {"message": "Unrecognized request argument supplied: seed"}}', None),
    (401, "context length", None), (403, "", None), (404, "", None), (402, "", None), (429, "", None),
])
def test_which_client_errors_are_about_the_request(status: int, body: str, reason: str | None) -> None:
    assert about_the_request(status, body) == reason


# ------------------------------------------------------------------------------------------ local teacher


def local_items(teacher: LocalTeacher, texts: list[str], max_tokens: int) -> list[tuple[str, dict]]:
    from kd.cache.store import request_key

    out = []
    for text in texts:
        r = {"backend": "local", "teacher": teacher.identity, "messages": [{"role": "user", "content": text}],
             "sampling": {"temperature": 0.0, "top_p": 1.0, "max_tokens": max_tokens, "stop": []},
             "sample_index": 0, "response_format": None}
        out.append((request_key(r), r))
    return out


# Regression: a 1 MB seed row was generated for 5 minutes against a local teacher with an 8k context.
def test_a_megabyte_prompt_is_too_long_in_well_under_a_second_without_loading_weights(tiny_model_dir: Path) -> None:
    teacher = LocalTeacher("tiny", LocalConfig(backend="local", path=str(tiny_model_dir), dtype="float32"), Path("."))
    teacher.tokenizer()
    pairs = local_items(teacher, ["word " * 200_000], max_tokens=8)
    answers: dict[str, dict] = {}
    start = time.perf_counter()
    teacher.generate(pairs, answers.__setitem__)
    seconds = time.perf_counter() - start
    [response] = answers.values()
    assert response["finish_reason"] == "too_long" and response["text"] == ""
    assert "at least" in response["error"] and "context 512" in response["error"]
    assert teacher._model is None  # no weights loaded for a prompt that cannot fit
    assert seconds < 0.5, f"{seconds:.2f} s"


# Regression: the context must hold the prompt *and* max_tokens (counted exactly when the bytes do not decide).
def test_prompt_plus_max_tokens_must_fit_the_context(tiny_model_dir: Path) -> None:
    teacher = LocalTeacher("tiny", LocalConfig(backend="local", path=str(tiny_model_dir), dtype="float32"), Path("."))
    answers: dict[str, dict] = {}
    [(ok, _)], [(long, _)] = local_items(teacher, ["hello"], 4), local_items(teacher, ["hello"], 510)
    teacher.generate(local_items(teacher, ["hello"], 4) + local_items(teacher, ["hello"], 510), answers.__setitem__)
    assert answers[ok]["finish_reason"] in ("stop", "length")
    assert answers[long]["finish_reason"] == "too_long" and "at least" not in answers[long]["error"]


# Regression: the same 1 MB row through a whole build: one `too_long` rejection, the stage goes on, and a rerun
# (which recomputes the verdict: it is not cached) writes the same bytes.
def test_a_megabyte_seed_row_is_a_too_long_rejection_in_the_dataset(tmp_path: Path, tiny_model_dir: Path) -> None:
    rows = [{"id": "huge", "instruction": "summarise: " + "word " * 200_000}, {"id": "small", "instruction": "Hi?"}]
    teacher = {"backend": "local", "path": str(tiny_model_dir), "dtype": "float32"}
    root = labeling_project(tmp_path, teacher, "seeds/mixed.jsonl", limit=2, max_tokens=4)
    (root / "seeds/mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # the small row is answered (the tiny random model's answer may well be rejected as empty: not the point)
    assert "(0 cached, 1 new, " in build(root)
    rejected = {r["input"]["id"]: r for r in map(json.loads, (root / "data/qa/rejected.jsonl").read_text().splitlines())}
    assert rejected["huge"]["reason"] == "too_long" and "tokens exceeds" in rejected["huge"]["error"]
    assert json.loads((root / "data/qa/manifest.json").read_text())["rejected"]["too_long"] == 1
    first = outputs(root)
    assert "(1 cached, 0 new, " in build(root)
    assert outputs(root) == first


# ------------------------------------------------------------------------------------------ SIGTERM, kill -9

VICTIM = """
import sys, time
from pathlib import Path
from kd import stage, tracking

def main():
    run = tracking.start_run(Path(sys.argv[1]), "kd-test", sys.argv[2], {"victim": 1}, [])
    print(run.run_id, flush=True)
    with run.failing():
        time.sleep(120)

stage.run(main)
"""


def start_victim(tmp_path: Path, stage: str) -> tuple[subprocess.Popen, str]:
    script = tmp_path / "victim.py"
    script.write_text(VICTIM)
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path), stage], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    run_id = proc.stdout.readline().strip()
    assert run_id, proc.communicate(timeout=60)
    return proc, run_id


BUILD = """
import sys
from pathlib import Path
from kd import stage
from kd.elicit.build import build_dataset
from kd.elicit.labeling import label

stage.run(lambda: build_dataset("qa", "labeling", label, Path(sys.argv[1])))
"""


# Regression: SIGTERM killed a generation stage outright; like Ctrl-C it must keep the answers so far and exit 143.
def test_sigterm_during_generation_keeps_the_answers_so_far(tmp_path: Path) -> None:
    root = tmp_path / "p"
    script = tmp_path / "build.py"
    script.write_text(BUILD)
    with FakeOpenAI(latency_s=0.3) as server:
        labeling_project(root, openai_teacher(server), limit=8)
        proc = subprocess.Popen([sys.executable, str(script), str(root)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        deadline = time.monotonic() + 60
        while server.answered < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        answered = server.answered
    assert proc.returncode == 143, err
    assert "kd: terminated (SIGTERM)" in err and "Traceback" not in err
    assert not (root / "data/qa").exists()
    with FakeOpenAI() as server:
        labeling_project(root, openai_teacher(server), limit=8)
        line = build(root)
    cached = int(re.search(r"\((\d+) cached, ", line).group(1))
    # every answer the client received is cached (the last one sent may still have been on the wire)
    assert answered - 1 <= cached <= answered and cached >= 1
    assert f"({cached} cached, {8 - cached} new" in line and server.received == 8 - cached


def status(uri: str, run_id: str) -> str:
    import mlflow

    return mlflow.MlflowClient(uri).get_run(run_id).info.status


# Regression: SIGTERM (what `timeout` and schedulers send) left the MLflow run RUNNING forever.
def test_sigterm_ends_the_stage_like_ctrl_c(tmp_path: Path, tracking: str) -> None:
    proc, run_id = start_victim(tmp_path, "victim-term")
    assert status(tracking, run_id) == "RUNNING"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143
    assert "terminated" in err and "Traceback" not in err
    assert status(tracking, run_id) == "KILLED"


# Regression: after `kill -9` the run stayed RUNNING forever; the next run of the stage must close it, and only it.
def test_next_run_closes_the_runs_of_killed_processes_only(tmp_path: Path, tracking: str) -> None:
    import mlflow
    from mlflow.entities import RunTag

    from kd import tracking as kd_tracking

    client = mlflow.MlflowClient(tracking)
    proc, killed = start_victim(tmp_path, "victim-kill")
    live = kd_tracking.start_run(tmp_path, "kd-test", "victim-kill", {"victim": 1}, [])  # this process: alive
    experiment = client.get_run(killed).info.experiment_id
    elsewhere = client.create_run(experiment, run_name="victim-kill").info.run_id  # another host's run
    client.log_batch(elsewhere, tags=[RunTag("dvc_stage", "victim-kill"), RunTag("kd.host", "another-host"),
                                      RunTag("kd.process", "999999:1")])
    proc.kill()
    proc.wait(timeout=60)
    assert status(tracking, killed) == "RUNNING"
    again = kd_tracking.start_run(tmp_path, "kd-test", "victim-kill", {"victim": 1}, [])
    assert status(tracking, killed) == "KILLED"
    assert status(tracking, live.run_id) == "RUNNING" and status(tracking, elsewhere) == "RUNNING"
    for run in (live, again):
        run.end()
    client.set_terminated(elsewhere)


# Regression guard: a killed training run continued from its checkpoint is taken over, not closed as an orphan.
def test_a_killed_run_continued_from_its_checkpoint_is_not_closed(tmp_path: Path, tracking: str) -> None:
    import mlflow

    from kd import tracking as kd_tracking

    proc, killed = start_victim(tmp_path, "victim-resume")
    proc.kill()
    proc.wait(timeout=60)
    resumed = kd_tracking.start_run(tmp_path, "kd-test", "victim-resume", {"victim": 1}, [], run_id=killed)
    assert resumed.run_id == killed and status(tracking, killed) == "RUNNING"
    tags = mlflow.MlflowClient(tracking).get_run(killed).data.tags
    assert "kd.ended" not in tags and tags["kd.process"] == kd_tracking.process_tag(os.getpid())
    resumed.end()
