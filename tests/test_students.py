"""Students: initialisation from params, each objective training a tiny model, and the model directory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from studentproject import make_student_project, student

from kd.config import load_params
from kd.config.students import FromConfig, FromPretrained, FromTeacher
from kd.errors import KdError
from kd.runtime.init import init_student, kept_layers
from kd.runtime.models import read_info


def test_kept_layers() -> None:
    assert kept_layers(30, 5, None) == [0, 5, 10, 15, 20, 25, 29]  # the last layer is always kept
    assert kept_layers(30, 10, None) == [0, 10, 20, 29]
    assert kept_layers(4, 3, None) == [0, 3]
    assert kept_layers(30, 5, [0, 29]) == [0, 29]
    with pytest.raises(KdError, match=r"init.layers: \[30\] out of range"):
        kept_layers(30, 5, [0, 30])
    with pytest.raises(KdError, match="strictly increasing"):
        kept_layers(30, 5, [3, 1])


def _params(root: Path):
    return load_params(root)


def test_from_teacher_copies_the_kept_layers(tmp_path: Path, tiny_model_dir: Path, monkeypatch) -> None:
    from transformers import AutoModelForCausalLM

    root = make_student_project(tmp_path, tiny_model_dir, {}, logits=False)
    monkeypatch.chdir(root)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model, tok = init_student(FromTeacher(kind="from_teacher", teacher="tiny", layers=[1]), _params(root), root)
    assert model.config.num_hidden_layers == 1 and len(tok) == len(teacher.get_input_embeddings().weight)
    t_state, s_state = teacher.state_dict(), model.state_dict()
    for key, value in s_state.items():
        source = key.replace("layers.0.", "layers.1.")  # student layer 0 is teacher layer 1
        assert torch.equal(value, t_state[source]), key
    ids = torch.tensor([[1, 2, 3, 4]])
    model2, _ = init_student(FromTeacher(kind="from_teacher", teacher="tiny", every=1), _params(root), root)
    assert torch.equal(model2(ids).logits, teacher(ids).logits)  # keeping every layer is the teacher itself


def test_from_config_uses_the_teacher_vocabulary_and_is_seeded(tmp_path: Path, tiny_model_dir: Path, monkeypatch) -> None:
    root = make_student_project(tmp_path, tiny_model_dir, {}, logits=False)
    monkeypatch.chdir(root)
    cfg = FromConfig(kind="from_config", teacher="tiny", hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                     intermediate_size=64)
    a, tok = init_student(cfg, _params(root), root, seed=3)
    b, _ = init_student(cfg, _params(root), root, seed=3)
    c, _ = init_student(cfg, _params(root), root, seed=4)
    assert a.config.vocab_size == json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    assert tok.get_vocab() == __import__("transformers").AutoTokenizer.from_pretrained(tiny_model_dir).get_vocab()
    assert a.config.hidden_size == 32 and a.config.num_hidden_layers == 1
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)


def test_from_pretrained_loads_a_local_directory(tmp_path: Path, tiny_model_dir: Path, monkeypatch) -> None:
    root = make_student_project(tmp_path, tiny_model_dir, {}, logits=False)
    monkeypatch.chdir(root)
    model, _ = init_student(FromPretrained(kind="from_pretrained", path=str(tiny_model_dir)), _params(root), root)
    assert model.config.num_hidden_layers == 2
    with pytest.raises(KdError, match="students.x.init.path: cannot load"):
        init_student(FromPretrained(kind="from_pretrained", path=str(tmp_path / "nowhere")), _params(root), root,
                     key="students.x.init")


def _train(root: Path, name: str) -> str:
    from kd.distill.students import train_student

    return train_student(name, root)


def _losses(root: Path, name: str) -> list[float]:
    lines = (root / "plots" / f"{name}.csv").read_text().splitlines()
    col = lines[0].split(",").index("loss")
    return [float(line.split(",")[col]) for line in lines[1:]]


@pytest.mark.parametrize("objective,extra", [
    # The tiny random teacher is near-uniform, so its KL to any near-uniform student is ~1e-5: only the CE part
    # of the loss can fall measurably in four steps; test_losses pins the divergences themselves.
    ("kd", {"logits": "sft_logits", "kd": {"divergence": "forward_kl", "ce_weight": 0.5}}),
    ("kd", {"logits": "sft_logits", "kd": {"divergence": "jsd", "beta": 0.5, "ce_weight": 0.3},
            "hidden": {"teacher": "tiny", "pairs": [[0, 1]], "loss": "cosine", "weight": 0.5}}),
    ("sft", {}),
    ("sft", {"hidden": {"teacher": "tiny", "pairs": [[0, 1]], "loss": "l2"}}),
])
def test_objective_trains_and_loss_falls(objective, extra, tmp_path: Path, tiny_model_dir: Path, monkeypatch,
                                         tracking: str) -> None:
    root = make_student_project(tmp_path, tiny_model_dir, {"s": student(objective, **extra)},
                                logits=objective == "kd")
    monkeypatch.chdir(root)
    line = _train(root, "s")
    losses = _losses(root, "s")
    assert len(losses) == 4 and all(map(torch.isfinite, torch.tensor(losses)))
    assert losses[-1] < losses[0], losses  # every step sees the same six records
    assert line.startswith("s: 4 steps, loss ") and "mlflow run" in line
    metrics = json.loads((root / "metrics" / "s.json").read_text())
    assert metrics["steps"] == 4 and metrics["tokens"] > 0 and "seconds" not in json.dumps(metrics)


def test_on_policy_trains_with_gkd(tmp_path: Path, tiny_model_dir: Path, monkeypatch, tracking: str) -> None:
    extra = {"on_policy": {"teacher": "tiny", "lmbda": 0.5, "beta": 0.5, "max_new_tokens": 4},
             "training": {"max_steps": 2, "batch_size": 3}}
    root = make_student_project(tmp_path, tiny_model_dir, {"s": student("on_policy", **extra)}, logits=False)
    monkeypatch.chdir(root)
    _train(root, "s")
    losses = _losses(root, "s")
    assert len(losses) == 2 and all(map(torch.isfinite, torch.tensor(losses)))
    assert (root / "models" / "s" / "model.safetensors").is_file()


def test_model_dir_names_fingerprints_and_mlflow_run(tmp_path: Path, tiny_model_dir: Path, monkeypatch,
                                                     tracking: str) -> None:
    import mlflow

    root = make_student_project(tmp_path, tiny_model_dir, {"s": student("kd", logits="sft_logits")})
    monkeypatch.chdir(root)
    _train(root, "s")
    out = root / "models" / "s"
    assert {"model.safetensors", "tokenizer.json", "config.json", "kd_model.json", "README.md"} <= {
        p.name for p in out.iterdir()}
    info, card = read_info(out).model_dump(), (out / "README.md").read_text()
    fingerprints = {n: json.loads((root / "data" / n / "manifest.json").read_text())["fingerprint"]
                    for n in ("sft", "sft_logits")}
    assert info["datasets"] == [{"name": "sft", "fingerprint": fingerprints["sft"]}]
    assert info["logits"] == {"name": "sft_logits", "fingerprint": fingerprints["sft_logits"]}
    run_id = info["mlflow"]["run_id"]
    for text in (fingerprints["sft"], fingerprints["sft_logits"], run_id, info["git_commit"], "forward_kl"):
        assert text in card
    run = mlflow.MlflowClient(tracking).get_run(run_id)  # exists in the sqlite store
    assert run.info.status == "FINISHED" and run.data.tags["dvc_stage"] == "s"
    inputs = {i.dataset.name: {t.key: t.value for t in i.tags} for i in run.inputs.dataset_inputs}
    assert inputs["sft"]["fingerprint"] == fingerprints["sft"]
    assert inputs["sft_logits"]["fingerprint"] == fingerprints["sft_logits"]
    assert run.data.params["student.kd.divergence"] == "forward_kl"
    assert len(mlflow.MlflowClient(tracking).get_metric_history(run_id, "loss")) == 4
    assert not (root / ".kd" / "checkpoints" / "s").exists()  # dropped once the model is written


def test_logits_from_another_tokenizer_are_refused(tmp_path: Path, tiny_model_dir: Path, monkeypatch,
                                                   tracking: str) -> None:
    from transformers import AutoTokenizer

    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["<only_in_the_student>"])  # ids would mean other tokens
    tok.save_pretrained(other)
    spec = student("kd", logits="sft_logits")
    spec["init"] = {"kind": "from_pretrained", "path": str(other)}
    root = make_student_project(tmp_path / "p", tiny_model_dir, {"s": spec})
    monkeypatch.chdir(root)
    with pytest.raises(KdError, match=r"students\.s\.logits: .*tokenizer"):
        _train(root, "s")
    assert not (root / "models" / "s").exists()


def test_dvc_stage_lists_what_the_student_reads(tmp_path: Path, tiny_model_dir: Path) -> None:
    from kd.pipeline.spec import student_stage

    spec = student("kd", logits="sft_logits", hidden={"teacher": "tiny", "pairs": [[0, 1]]})
    root = make_student_project(tmp_path, tiny_model_dir, {"s": spec}, logits=False)
    params = load_params(root)
    stage = student_stage("s", params.students["s"], params, root).as_dvc()
    assert stage["cmd"] == "python stages/student.py s"
    assert {"stages/student.py", "data/sft", "data/sft_logits", str(tiny_model_dir)} <= set(stage["deps"])
    # a teacher's batch_size or device does not change the student: only its path (and dtype when run online)
    assert stage["params"] == ["students.s", "teachers.tiny.path", "teachers.tiny.dtype"]
    assert stage["outs"] == ["models/s"]


def test_sft_on_kds_loop_differs_from_kd_only_in_its_loss(tmp_path: Path, tiny_model_dir: Path, monkeypatch,
                                                          tracking: str) -> None:
    # the default recipe's comparison: `loop: kd` runs SFT in the KD objective's own loop, so an SFT student and
    # a KD student whose loss is all cross-entropy (ce_weight 1) are the same model, bit for bit
    from safetensors.torch import load_file

    students = {"sft_student": student("sft", loop="kd"),  # not "sft": a dataset of that name owns the stage
                "kd_ce": student("kd", logits="sft_logits", kd={"divergence": "forward_kl", "ce_weight": 1.0}),
                "kd": student("kd", logits="sft_logits")}
    root = make_student_project(tmp_path, tiny_model_dir, students)
    monkeypatch.chdir(root)
    for name in students:
        _train(root, name)
    weights = {n: load_file(root / "models" / n / "model.safetensors") for n in students}
    assert all(torch.equal(v, weights["kd_ce"][k]) for k, v in weights["sft_student"].items())
    assert any(not torch.equal(v, weights["kd"][k]) for k, v in weights["sft_student"].items())  # the soft targets matter


def test_frozen_layers_and_embeddings_stay_the_teachers(tmp_path: Path, tiny_model_dir: Path, monkeypatch,
                                                         tracking: str) -> None:
    from safetensors.torch import load_file

    spec = student("kd", logits="sft_logits", init={"kind": "from_teacher", "teacher": "tiny", "layers": [0, 1]},
                   training={"freeze_layers": 1})
    root = make_student_project(tmp_path, tiny_model_dir, {"s": spec})
    monkeypatch.chdir(root)
    _train(root, "s")
    teacher, trained = load_file(tiny_model_dir / "model.safetensors"), load_file(root / "models/s/model.safetensors")
    for key, value in trained.items():
        frozen = key.startswith(("model.embed_tokens", "model.layers.0.", "lm_head"))
        assert torch.equal(value, teacher[key]) == frozen, key
    bad = make_student_project(tmp_path / "bad", tiny_model_dir, {"s": student("kd", logits="sft_logits",
                                                                                training={"freeze_layers": 5})})
    with pytest.raises(KdError, match=r"students\.s\.training\.freeze_layers: 5 is more layers than the model has"):
        _train(bad, "s")
