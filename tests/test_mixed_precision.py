"""Mixed precision that trains: `training.dtype: bfloat16` / `float16` keep float32 master weights and optimizer
state and run the passes under autocast, so small updates are not rounded away; the loss follows float32's.

Weights: the tiny random-init model of tests/conftest.py (tied embeddings, so every row gets a gradient), not the
embedded teacher's trained weights (too slow for the suite); bf16 autocast on the CPU."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from studentproject import make_student_project, student

from kd.config.students import Training
from kd.distill import loop
from kd.distill.loop import STOP_ENV, TrainingStopped
from kd.distill.students import train_student
from kd.distill.trl_runs import trainer_args

STEPS = 20
# bf16-autocast run against the float32 run (same data, seed, schedule): each step's loss within 0.1%, and the
# loss decrease over the 20 steps within 10% of float32's (measured: 2.5e-5 and 1%, on an AMX CPU).
STEP_TOLERANCE, DECREASE_TOLERANCE = 1e-3, 0.10


def _losses(root: Path, name: str) -> list[float]:
    with (root / "plots" / f"{name}.csv").open() as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def test_bf16_training_moves_the_weights_and_follows_fp32(tmp_path: Path, tiny_model_dir: Path, tracking: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # regression: `training.dtype: bfloat16` ran AdamW on bf16 weights; at lr 1e-5 an update is below half an ulp
    # of most weights, and only ~2% of them moved at all in 20 steps
    training = {"max_steps": STEPS, "lr": 1e-5, "warmup_ratio": 0.1, "checkpoint_every": 100}
    students = {n: student("sft", loop="kd", training={**training, "dtype": d})
                for n, d in (("f32", "float32"), ("b16", "bfloat16"))}
    root = make_student_project(tmp_path / "p", tiny_model_dir, students, logits=False)
    monkeypatch.chdir(root)
    moved: list[float] = []
    train = loop.train

    def watched(model, *args, **kw):  # the trainable parameters as the stage loads and trains them
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        out = train(model, *args, **kw)
        after = dict(model.named_parameters())
        changed = sum(int((after[n].detach() != b).sum()) for n, b in before.items())
        moved.append(changed / sum(b.numel() for b in before.values()))
        return out

    monkeypatch.setattr(loop, "train", watched)
    for name in students:
        train_student(name, root)
    assert moved[1] >= 0.99, f"bf16 run: only {moved[1]:.1%} of the trainable weights moved"
    f32, b16 = _losses(root, "f32"), _losses(root, "b16")
    assert len(f32) == len(b16) == STEPS and f32[-1] < f32[0] - 0.01  # every step sees all six records
    assert max(abs(b - f) / f for f, b in zip(f32, b16, strict=True)) <= STEP_TOLERANCE
    assert abs((b16[0] - b16[-1]) - (f32[0] - f32[-1])) <= DECREASE_TOLERANCE * (f32[0] - f32[-1])
    with safe_open(str(root / "models" / "b16" / "model.safetensors"), "pt") as f:  # saved as declared
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}  # noqa: SIM118 (not a dict)


def test_fp16_scales_the_loss_and_resumes_exactly(tmp_path: Path, tiny_model_dir: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # float16 runs with a GradScaler whose state is checkpointed: a resumed run equals an uninterrupted one
    from transformers import AutoModelForCausalLM

    monkeypatch.delenv(STOP_ENV, raising=False)
    t = Training(max_steps=4, checkpoint_every=2, batch_size=2, lr=1e-3, warmup_ratio=0.0, dtype="float16")
    g = torch.Generator().manual_seed(0)
    examples = [loop.Example(torch.randint(0, 1000, (12,), generator=g).tolist(), 6) for _ in range(4)]

    def run(ckpt: Path) -> list[float]:
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        objective = loop.token_objective(model, None, None, 0, 1)
        return [h["loss"] for h in loop.train(model, examples, t, objective, ckpt, lambda m: None).history]

    uninterrupted = run(tmp_path / "a")
    monkeypatch.setenv(STOP_ENV, "3")
    with pytest.raises(TrainingStopped):
        run(tmp_path / "b")
    state = torch.load(next((tmp_path / "b").glob("step-*/state.pt")), weights_only=True)
    assert state["extra"]["scaler"]["scale"] > 1  # the loss was scaled, and the scale is part of the checkpoint
    monkeypatch.delenv(STOP_ENV)
    assert run(tmp_path / "b") == uninterrupted


def test_trl_runs_get_the_trainers_mixed_precision() -> None:
    # regression: TRL objectives got bf16=False whatever training.dtype said (and bf16 weights)
    flags = {d: {k: trainer_args(Training(dtype=d), Path("x"), "cpu")[k] for k in ("bf16", "fp16")}
             for d in ("float32", "bfloat16", "float16")}
    assert flags == {"float32": {"bf16": False, "fp16": False}, "bfloat16": {"bf16": True, "fp16": False},
                     "float16": {"bf16": False, "fp16": True}}
