"""A throwaway project for student tests: the tiny model as a local teacher, six prompt/completion records,
their top-k logits, and whatever students a test declares.

    root = make_student_project(tmp_path / "p", tiny_model_dir, {"s": student("kd", logits="sft_logits")})
    line = train_student("s", root)
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from kd.records import write_dataset


def conv(i: int, answer: str) -> dict[str, Any]:
    return {"prompt": [{"role": "system", "content": "Be brief."},
                       {"role": "user", "content": f"Question {i}: what is {i} + {i}?"}],
            "completion": [{"role": "assistant", "content": answer}], "category": ""}


RECORDS = [conv(1, "It is 2."), conv(2, "Four, because two and two make four."), conv(3, "Six. " * 30),
           conv(4, "Eight, since 4 + 4 = 8."), conv(5, "Ten."), conv(6, "Twelve, as six doubled is twelve.")]

def pref(i: int, good: str, bad: str, worse: str) -> dict[str, Any]:
    """A feedback record as `kd.elicit.feedback` writes it: best and worst of three ranked candidates."""
    prompt = conv(i, "")["prompt"]
    ranked = [(good, -0.5), (bad, -1.5), (worse, -3.0)]
    return {"prompt": prompt, "chosen": [{"role": "assistant", "content": good}],
            "rejected": [{"role": "assistant", "content": worse}], "score_chosen": -0.5, "score_rejected": -3.0,
            "rationale": "", "category": "",
            "candidates": [{"completion": [{"role": "assistant", "content": t}], "score": s} for t, s in ranked]}


# Chosen answers are right and short, rejected ones wrong and rambling: a model can learn the difference.
PREFS = [pref(i, f"It is {2 * i}.", f"It is {2 * i + 1}.", f"No idea, maybe {3 * i + 7} or so, hard to say.")
         for i in range(1, 9)]

TRAINING = {"max_steps": 4, "batch_size": 6, "lr": 1.0e-2, "max_length": 64, "checkpoint_every": 2,
            "warmup_ratio": 0.0, "seed": 0}


def student(objective: str, **extra: Any) -> dict[str, Any]:
    """A one-layer student of the two-layer tiny teacher; every step sees all six records (loss must fall)."""
    training = {**TRAINING, **extra.pop("training", {})}
    return {"init": {"kind": "from_teacher", "teacher": "tiny", "layers": [0]}, "objective": objective,
            "datasets": ["sft"], **extra, "training": training}


def make_student_project(root: Path, teacher_dir: Path, students: dict[str, Any], logits: bool = True,
                         reward_models: dict[str, Any] | None = None) -> Path:
    """params.yaml + data/sft, data/prefs (eight preference records) (+ data/sft_logits elicited from the tiny
    teacher). Run with cwd = root."""
    from kd.config import Feature
    from kd.config import LocalTeacher as LocalConfig
    from kd.elicit.feature import elicit_features
    from kd.runtime.local import LocalTeacher

    (root / "seeds").mkdir(parents=True)
    (root / "seeds" / "q.jsonl").write_text("")
    (root / "t.jinja").write_text("")
    teacher = {"backend": "local", "path": str(teacher_dir), "dtype": "float32"}
    params = {
        "project": "kd-test",
        "teachers": {"tiny": teacher},
        "datasets": {
            "sft": {"method": "labeling", "teacher": "tiny", "inputs": [{"seeds": "seeds/q.jsonl"}], "template": "t.jinja"},
            "sft_logits": {"method": "feature", "teacher": "tiny", "dataset": "sft", "top_k": 8, "max_length": 64},
            "prefs": {"method": "feedback", "generator": "tiny", "inputs": [{"seeds": "seeds/q.jsonl"}],
                      "template": "t.jinja", "judge": {"teacher": "tiny", "kind": "likelihood"}},
        },
        "students": copy.deepcopy(students),
        "reward_models": copy.deepcopy(reward_models or {}),
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    write_dataset(root / "data" / "sft", "sft", "labeling", RECORDS, [], {}, None)
    write_dataset(root / "data" / "prefs", "prefs", "feedback", PREFS, [], {}, None)
    if logits:
        cfg = Feature(**params["datasets"]["sft_logits"])
        elicit_features("sft_logits", cfg, LocalTeacher("tiny", LocalConfig(**teacher), root), root / "data",
                        root / ".kd" / "cache" / "features")
    return root
