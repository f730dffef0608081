"""kd's own training loop under `accelerate launch`: N processes (gloo on CPU here) train the step an
N-times-larger grad_accum trains in one process, only the main process writes, the world size is recorded,
and one process is byte-for-byte the loop it was."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from studentproject import make_student_project, student

from kd.config.students import Training
from kd.distill.loop import STOP_ENV, step_batches
from kd.distill.students import train_student
from kd.pipeline.spec import launcher

REPO = Path(__file__).resolve().parent.parent
KD = {"logits": "sft_logits", "kd": {"divergence": "jsd", "beta": 0.5, "ce_weight": 0.5}}
# Two records a micro-batch, four a step: six records make 1.5 steps an epoch (steps cross epoch boundaries);
# a checkpoint at step 2 of 4 (written by the main process alone).
TRAINING = {"max_steps": 4, "batch_size": 2, "checkpoint_every": 2, "warmup_ratio": 0.25, "lr": 5e-3}
# sha256 of models/s/model.safetensors from the one-process KD student below as kd's loop trained it before
# multi-process training existed (same tiny model, same torch): the default build must not move by a bit.


def _losses(root: Path) -> list[float]:
    lines = (root / "plots" / "s.csv").read_text().splitlines()
    col = lines[0].split(",").index("loss")
    return [float(line.split(",")[col]) for line in lines[1:]]


def _info(root: Path) -> dict:
    return json.loads((root / "models" / "s" / "kd_model.json").read_text())


# Guards: the KD loop ran on one device only; two gloo processes must give one process's loss curve
# for the same global batch (batch_size 2 × grad_accum 1 × 2 processes = 2 × 2 × 1), and with
# training.processes 1 (the default) two runs give byte-identical weights.
def test_two_processes_match_one(tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv(STOP_ENV, raising=False)
    one = make_student_project(tmp_path / "one", tiny_model_dir,
                               {"s": student("kd", **KD, training={**TRAINING, "grad_accum": 2})})
    monkeypatch.chdir(one)
    train_student("s", one)
    expected = _losses(one)
    # one process is deterministic: the same params trained again side by side give the same bytes (a pinned digest
    # held on one CPU kind only: AMX, AVX2 and AVX-512 kernels round differently)
    again = make_student_project(tmp_path / "again", tiny_model_dir,
                                 {"s": student("kd", **KD, training={**TRAINING, "grad_accum": 2})})
    monkeypatch.chdir(again)
    train_student("s", again)
    digests = {hashlib.sha256((p / "models" / "s" / "model.safetensors").read_bytes()).hexdigest() for p in (one, again)}
    assert len(digests) == 1
    assert _info(one)["world_size"] == 1

    two = make_student_project(tmp_path / "two", tiny_model_dir, {"s": student(
        "kd", **KD, training={**TRAINING, "grad_accum": 1, "processes": 2, "device": "cpu"})})
    cmd = launcher(Training(processes=2, device="cpu")).split()
    assert cmd[:4] == ["accelerate", "launch", "--multi_gpu", "--num_processes"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow2.db'}"}
    argv = [sys.executable, "-m", "accelerate.commands.launch", *cmd[2:], str(REPO / "stages" / "student.py"), "s"]
    # killed during step 4 (the last checkpoint, step 2, written by the main process), then resumed
    killed = subprocess.run(argv, cwd=two, env={**env, STOP_ENV: "3"}, capture_output=True, text=True, timeout=300)
    assert killed.returncode != 0 and "TrainingStopped" in killed.stderr, killed.stderr[-3000:]
    assert not (two / "models" / "s").exists()
    proc = subprocess.run(argv, cwd=two, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed at step 2" in proc.stdout
    got = _losses(two)
    assert len(got) == len(expected) == 4
    assert got == pytest.approx(expected, rel=1e-5)
    with capsys.disabled():
        print("\nmax relative loss difference, 2 vs 1 processes:",
              max(abs(g - e) / abs(e) for g, e in zip(got, expected, strict=True)))
    assert _info(two)["world_size"] == 2
    assert not (two / ".kd" / "checkpoints" / "s").exists()  # cleared once, by the main process

    # the same params in one process: a smaller global batch than they describe, and a warning says so
    capsys.readouterr()
    monkeypatch.chdir(two)
    train_student("s", two)
    assert "students.s.training.processes is 2 but 1 processes run" in capsys.readouterr().err


# Guards: the micro-batches of a step are the same examples whatever the world size; each process takes its share.
def test_step_examples_independent_of_world_size() -> None:
    one = Training(batch_size=2, grad_accum=4, seed=3)
    two = Training(batch_size=2, grad_accum=2, seed=3)
    for step in range(4):
        assert step_batches(step, 7, one) == step_batches(step, 7, two, world=2)
    assert launcher(Training()) == "python"


# Guards: nothing tested that the TRL objectives run under `accelerate launch` with kd's envelope writing once.
# A global batch that divides the data: at an epoch's end accelerate's sampler repeats examples to even out
# the processes' batches, which one process does not (kd's own loop has no such tail; see docs/gpu.md).
@pytest.mark.parametrize("objective,datasets,batch_size", [("sft", ["sft"], 3), ("dpo", ["prefs"], 2)])
def test_trl_two_processes_match_one(objective: str, datasets: list[str], batch_size: int, tmp_path: Path,
                                     tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv(STOP_ENV, raising=False)
    training = {"max_steps": 2, "batch_size": batch_size, "warmup_ratio": 0.0, "lr": 5e-3, "device": "cpu"}
    one = make_student_project(tmp_path / "one", tiny_model_dir, {"s": student(
        objective, datasets=datasets, training={**training, "grad_accum": 2})}, logits=False)
    monkeypatch.chdir(one)
    train_student("s", one)
    two = make_student_project(tmp_path / "two", tiny_model_dir, {"s": student(
        objective, datasets=datasets, training={**training, "grad_accum": 1, "processes": 2})}, logits=False)
    cmd = launcher(Training(processes=2)).split()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow2.db'}"}
    argv = [sys.executable, "-m", "accelerate.commands.launch", *cmd[2:], str(REPO / "stages" / "student.py"), "s"]
    proc = subprocess.run(argv, cwd=two, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(_losses(two)) == 2
    assert _losses(two) == pytest.approx(_losses(one), rel=1e-5)
    assert _info(two)["world_size"] == 2


# Guards: `processes` on a reward model (whose stage runs one process) would be silently ignored.
def test_reward_model_refuses_processes() -> None:
    from pydantic import ValidationError

    from kd.config.students import RewardModel

    with pytest.raises(ValidationError, match="training.processes"):
        RewardModel(init={"kind": "from_pretrained", "path": "models/s"}, datasets=["prefs"],
                    training={"processes": 2})


# Guards: FSDP and DeepSpeed had no way in: the shipped accelerate configs must load as what they say, reach the
# stage command with params' process count, rebuild the student when edited, and be refused where kd's own loop runs.
def test_sharded_training_configs_reach_the_stage_command(tmp_path: Path, tiny_model_dir: Path) -> None:
    from accelerate.commands.config.config_args import load_config_from_file
    from pydantic import ValidationError

    from kd.config import load_params
    from kd.config.students import Student
    from kd.pipeline.spec import student_stage

    kinds = {"fsdp.yaml": "FSDP", "deepspeed_zero2.yaml": "DEEPSPEED"}
    for name, kind in kinds.items():
        assert load_config_from_file(str(REPO / "profiles/accelerate" / name)).distributed_type.name == kind
    config = "profiles/accelerate/fsdp.yaml"
    root = make_student_project(tmp_path / "p", tiny_model_dir, {"s": student(
        "sft", training={"processes": 4, "accelerate_config": config})}, logits=False)
    params = load_params(root)
    stage = student_stage("s", params.students["s"], params, root)
    assert stage.cmd.startswith(f"accelerate launch --config_file {config} --num_processes 4 --num_machines 1 ")
    assert config in stage.deps
    for bad, match in ((student("kd", logits="x", training={"processes": 2, "accelerate_config": config}),
                        "runs kd's own loop"),
                       (student("sft", training={"accelerate_config": config}), "needs training.processes > 1")):
        with pytest.raises(ValidationError, match=match):
            Student.model_validate(bad)
