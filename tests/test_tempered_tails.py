"""Top-k + tail at T ≠ 1 is the exact tempered teacher distribution restricted to k + 1 outcomes: the feature stage
stores the teacher's tail at every temperature its students train at, and the losses use it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from test_feature import RECORDS, write_source

from kd.config import Feature, Params
from kd.config import LocalTeacher as LocalConfig
from kd.config.students import tail_temperatures
from kd.distill.losses import full_divergence, topk_divergence
from kd.elicit.feature import elicit_features
from kd.errors import KdError
from kd.pipeline.spec import dataset_reads
from kd.runtime.local import LocalTeacher
from kd.runtime.logits import load_logits

ROOT = Path(__file__).resolve().parents[1]
TEMPERATURES = (0.5, 2.0)
K = 20


def build(tmp_path: Path, model_dir: Path, temperatures: tuple[float, ...]) -> dict:
    cfg = Feature(method="feature", teacher="tiny", dataset="src", top_k=K, max_length=96, batch_size=2)
    teacher = LocalTeacher("tiny", LocalConfig(backend="local", path=str(model_dir), dtype="float32"), tmp_path)
    return elicit_features("logits", cfg, teacher, tmp_path / "data", tmp_path / "cache", temperatures=temperatures)


def restricted(probs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """A full distribution folded into the k ids and one tail bucket."""
    top = probs.gather(-1, ids)
    return torch.cat([top, 1 - top.sum(-1, keepdim=True)], -1)


def test_flat_tail_at_t2() -> None:
    # regression: the tail bucket was tempered as one token, (Σp)^{1/T}: 0.13 instead of 0.95 on this row at T = 2
    logits = torch.zeros(1, 16001, dtype=torch.float64)
    logits[0, 0] = 13.48  # one likely token (p = 0.978), 16000 unlikely ones
    t = 2.0
    want = torch.softmax(logits / t, -1)[0, 1:].sum().item()
    assert abs(want - 0.95) < 0.005
    logq = torch.log_softmax(logits, -1)
    tail_t = torch.logsumexp(logq[:, 1:] / t, -1)  # what the feature stage stores for T = 2
    # A student equal to the teacher everywhere but on the tail's split scores 0 only with the exact tail.
    s = logits.clone()
    assert topk_divergence(s, torch.tensor([[0]]), logq[:, :1], tail_t, "forward_kl", temperature=t).abs().item() < 1e-9
    old = torch.log_softmax(torch.cat([logq[:, :1], torch.logsumexp(logq[:, 1:], -1)[:, None]], -1) / t, -1)
    assert abs(old[0, 1].exp().item() - 0.13) < 0.005


def test_stored_tails_equal_exact_tempered_distribution(tmp_path: Path, tiny_model_dir: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForCausalLM

    monkeypatch.chdir(tmp_path)
    write_source(tmp_path / "data", RECORDS)
    assert build(tmp_path, tiny_model_dir, TEMPERATURES)["new"] == 4
    store = load_logits(tmp_path / "data" / "logits")
    assert store.temperatures == (1.0, *TEMPERATURES)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64).eval()
    g = torch.Generator().manual_seed(0)
    for rec in store.records:
        row = store.get(rec["source_id"])
        with torch.no_grad():
            full = model(row.input_ids[None]).logits[0, row.completion_start - 1:-1]  # float64 reference logits
        student = full + 2 * torch.randn(full.shape, generator=g, dtype=torch.float64)
        for t in (0.5, 1.0, 2.0):
            # The stored buckets at T: softmax over [top-k log-probs / T, tail at T] ...
            got = torch.softmax(torch.cat([row.topk_logprobs.double() / t, row.tail(t).double()[:, None]], -1), -1)
            want = restricted(torch.softmax(full / t, -1), row.topk_ids)  # ... = the tempered one restricted
            torch.testing.assert_close(got, want, atol=2e-3, rtol=1e-2)
            # and the loss from stored features equals the float64 loss between the restricted distributions
            p, q = restricted(torch.softmax(student / t, -1), row.topk_ids), want
            ref = (q * (q.log() - p.log())).sum(-1) * t * t
            loss = topk_divergence(student, row.topk_ids, row.topk_logprobs, row.tail(t), "forward_kl", temperature=t)
            torch.testing.assert_close(loss, ref, atol=5e-3, rtol=1e-2)
            if t != 1.0:  # and this is not the old rule's answer, nor the full-vocabulary loss
                assert (loss - full_divergence(student, full, "forward_kl", temperature=t)).abs().max() > 1e-3


def test_temperatures_in_key_and_missing_temperature_is_one_line(tmp_path: Path, tiny_model_dir: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write_source(tmp_path / "data", RECORDS[:2])
    assert build(tmp_path, tiny_model_dir, ())["new"] == 2
    store = load_logits(tmp_path / "data" / "logits")
    assert store.temperatures == (1.0,) and "tail_temperatures" not in store.manifest
    with pytest.raises(KdError) as e:
        store.check_temperature(2.0, "students.s.kd.temperature")
    assert len(str(e.value).splitlines()) == 1 and "students.s.kd.temperature: 2" in str(e.value)
    again = build(tmp_path, tiny_model_dir, (2.0,))  # other temperatures: other entries, the teacher runs again
    assert (again["cached"], again["new"]) == (0, 2)
    assert (build(tmp_path, tiny_model_dir, (2.0,))["cached"]) == 2


def test_feature_stage_declares_its_students_temperatures() -> None:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["students"]["student_fkl"]["kd"]["temperature"] = 2.0
    raw["students"]["student_t05"] = {**raw["students"]["student_fkl"], "kd": {"temperature": 0.5}}
    params = Params.model_validate(raw)
    assert tail_temperatures(params.students, "sft_logits") == (0.5, 2.0)
    reads = dataset_reads("sft_logits", params.datasets["sft_logits"], params, ROOT)
    assert {"students.student_fkl.kd.temperature", "students.student_t05.kd.temperature"} <= set(reads["params"])


def test_served_teacher_cannot_give_tails_at_other_temperatures(tmp_path: Path, tiny_model_dir: Path) -> None:
    # a server returns top-k log-probs only: the tail at T ≠ 1 is unknown, said in one line before any request
    from test_feature_served import served

    from kd.runtime.served import ServedFeatures

    cfg = Feature(method="feature", teacher="tiny", dataset="src", top_k=K, max_length=96)
    teacher = ServedFeatures("tiny", served("http://127.0.0.1:9", tiny_model_dir), tmp_path)
    with pytest.raises(KdError) as e:
        elicit_features("logits", cfg, teacher, tmp_path / "data", tmp_path / "cache", temperatures=(2.0,))
    assert str(e.value).startswith("datasets.logits: students train on it at temperature 2") and "\n" not in str(e.value)
