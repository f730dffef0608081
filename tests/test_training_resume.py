"""Resume equals uninterrupted: a training stage killed after step N resumes from its last checkpoint and
logs exactly the per-step losses an uninterrupted run logs (torchtune's test_training_state_on_resume)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from studentproject import make_student_project, student

from kd.distill.loop import STOP_ENV, TrainingStopped, step_batches
from kd.distill.students import train_student

# Two records a micro-batch, two micro-batches a step: six records make 1.5 steps an epoch, so the run
# crosses epoch boundaries mid-step and resumes mid-epoch; checkpoints at steps 2 and 4 of 6.
TRAINING = {"max_steps": 6, "batch_size": 2, "grad_accum": 2, "checkpoint_every": 2, "warmup_ratio": 0.2, "lr": 5e-3}


def _history(root: Path, name: str) -> list[dict[str, str]]:
    lines = (root / "plots" / f"{name}.csv").read_text().splitlines()
    keys = lines[0].split(",")
    return [dict(zip(keys, line.split(","), strict=True)) for line in lines[1:]]


@pytest.mark.parametrize("objective,extra", [
    ("kd", {"logits": "sft_logits", "kd": {"divergence": "jsd", "beta": 0.5, "ce_weight": 0.5}}),
    ("sft", {}),
])
def test_resume_equals_uninterrupted(objective, extra, tmp_path: Path, tiny_model_dir: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    spec = student(objective, **extra, training=TRAINING)
    root = make_student_project(tmp_path / "p", tiny_model_dir, {"s": spec}, logits=objective == "kd")
    monkeypatch.chdir(root)
    monkeypatch.delenv(STOP_ENV, raising=False)
    train_student("s", root)
    uninterrupted = _history(root, "s")
    model_bytes = (root / "models" / "s" / "model.safetensors").read_bytes()
    first_run = json.loads((root / "models" / "s" / "kd_model.json").read_text())["mlflow"]["run_id"]

    monkeypatch.setenv(STOP_ENV, "3")  # dies during step 4: steps 1-3 done, the last checkpoint is step 2
    with pytest.raises(TrainingStopped):
        train_student("s", root)
    names = [p.name for p in (root / ".kd" / "checkpoints" / "s").glob("*/*")]
    assert [n for n in names if re.fullmatch(r"(step|checkpoint)-0*2", n)], f"no step-2 checkpoint in {names}"
    (killed_run,) = [json.loads(p.read_text())["run_id"] for p in (root / ".kd" / "checkpoints" / "s").glob("*/run.json")]
    monkeypatch.delenv(STOP_ENV)
    line = train_student("s", root)

    assert "resumed at step 2" in line
    resumed = _history(root, "s")
    assert [h["step"] for h in resumed] == ["1", "2", "3", "4", "5", "6"]
    assert [h["loss"] for h in resumed] == [h["loss"] for h in uninterrupted]  # repr of each float: bit-exact
    assert (root / "models" / "s" / "model.safetensors").read_bytes() == model_bytes  # bit-identical weights
    info = json.loads((root / "models" / "s" / "kd_model.json").read_text())
    # the killed run is continued (same params, so MLflow accepts them again), not the finished first one
    assert info["mlflow"]["run_id"] == killed_run != first_run
    assert not (root / ".kd" / "checkpoints" / "s").exists()


def test_data_order_is_a_function_of_seed_and_step() -> None:
    from kd.config.students import Training

    t = Training(batch_size=2, grad_accum=2, seed=1)
    steps = [step_batches(s, 6, t) for s in range(3)]  # 12 examples: two epochs of six
    flat = [i for s in steps for b in s for i in b]
    assert sorted(flat[:6]) == list(range(6)) and sorted(flat[6:]) == list(range(6))
    assert steps == [step_batches(s, 6, t) for s in range(3)]
    assert steps != [step_batches(s, 6, Training(batch_size=2, grad_accum=2, seed=2)) for s in range(3)]
