"""`kd status` and the stage's own forecast: predicted teacher requests equal what the run then sends."""

from __future__ import annotations

import json
import shutil
from typing import Any

import pytest
from fake_openai import FakeOpenAI
from kdproject import (
    ANSWER,
    commit,
    curation,
    edit_template,
    kd,
    kd_json,
    labeling,
    make_project,
    math_seeds,
    records,
    repro,
)

PRICE = {"input_per_mtok": 1.0, "output_per_mtok": 4.0}


@pytest.fixture(scope="module")
def server() -> FakeOpenAI:
    with FakeOpenAI() as s:
        yield s


def forecasts(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["stage"]: row["forecast"] for row in report["stages"] if "forecast" in row}


def test_forecast_before_build_then_after_a_template_edit(server, tmp_path):
    root = make_project(tmp_path / "p", server.url, {"qa": labeling(16), "topics": curation(4)}, price=PRICE)
    before = forecasts(kd_json(root, "status"))
    qa, topics = before["qa"], before["topics"]
    assert (qa["new"], qa["cached"], qa["estimated"], qa["approximate"]) == (16, 0, 0, False)
    # curation: 4 questions are known exactly; their answers depend on questions nobody has asked yet
    assert (topics["new"], topics["estimated"], topics["approximate"]) == (8, 4, True)
    assert qa["cost"] == pytest.approx((qa["prompt_tokens"] * 1.0 + qa["completion_tokens"] * 4.0) / 1e6)
    assert qa["prompt_tokens"] > 0 and qa["completion_tokens"] == 16 * 32  # no answers yet: max_tokens / 2
    code, text = kd(root, "status")
    assert "≈8" in text and "qa" in text
    assert server.received == 0 and not (root / ".kd" / "cache").exists()  # a forecast asks and writes nothing

    first = repro(root)
    assert server.received == 16 + 8
    assert "qa: forecast 16 new teacher requests (0 cached)" in first.stdout
    assert "qa: 16 records (0 cached, 16 new, 0 rejected)" in first.stdout and "paid for 16 requests" in first.stdout
    # deterministic totals in metrics: every request that built the dataset, priced from params
    metrics = json.loads((root / "metrics/qa.json").read_text())
    usage = [r["usage"] for rec in records(root, "qa") for r in rec["provenance"]["requests"]]
    assert metrics["prompt_tokens"] == sum(u["prompt_tokens"] for u in usage)
    assert metrics["completion_tokens"] == sum(u["completion_tokens"] for u in usage)
    assert metrics["cost"] == pytest.approx((metrics["prompt_tokens"] + 4 * metrics["completion_tokens"]) / 1e6)
    commit(root, "v1")

    edit_template(root)
    after = kd_json(root, "status")
    assert [row["stage"] for row in after["stages"]] == ["qa"]  # curation does not use the template
    predicted = forecasts(after)["qa"]
    assert predicted["approximate"] is False and predicted["cached"] == 16 - math_seeds(16)
    sent = server.received
    second = repro(root)
    assert server.received - sent == predicted["new"] == math_seeds(16)
    assert f"qa: forecast {predicted['new']} new teacher requests ({predicted['cached']} cached)" in second.stdout
    commit(root, "v2")
    code, text = kd(root, "status")
    assert code == 0 and "up to date" in text


def set_params(root, edit) -> None:
    """Edit params.yaml with `edit(params)`, regenerate dvc.yaml, commit."""
    import yaml

    from kd.config import load_params
    from kd.pipeline.spec import dvc_yaml

    params = yaml.safe_load((root / "params.yaml").read_text())
    edit(params)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / "dvc.yaml").write_text(dvc_yaml(load_params(root), root))
    commit(root, "params")


LOCAL = {"backend": "local", "path": "models/teacher", "dtype": "float32", "device": "cpu"}


class _Answers:
    """A teacher that answers every request with a short text: fills the cache as a real build would."""

    name = "answers"

    def __init__(self, identity: dict[str, Any]) -> None:
        self.identity = identity

    def generate(self, items, on_result) -> None:
        for key, _ in items:
            on_result(key, {"text": "An answer.", "finish_reason": "stop",
                            "usage": {"prompt_tokens": 30, "completion_tokens": 3}})


def test_fresh_clone_forecasts_without_the_local_teacher(server, tmp_path, monkeypatch):
    # guards: `kd status` exited 2 on "teachers.local.path: models/teacher does not exist" in a fresh clone
    from kd.cache.store import RequestCache
    from kd.config import load_params
    from kd.pipeline.status import method
    from kd.prompts import load_prompt
    from kd.runtime.ask import Asker
    from kd.runtime.local import LocalTeacher

    monkeypatch.chdir(tmp_path)  # the digest memo lives under the working directory
    root = make_project(tmp_path / "p", server.url, {"qa": labeling(8)})
    received = server.received

    def local_teacher(p):
        p["teachers"]["local"] = LOCAL
        p["datasets"]["qa"]["teacher"] = "local"
    set_params(root, local_teacher)

    code, text = kd(root, "status")
    assert code == 0, text
    qa = forecasts(kd_json(root, "status"))["qa"]
    # no cache: every request is new, said so, and marked approximate; tokens estimated from characters
    assert (qa["new"], qa["cached"], qa["approximate"]) == (8, 0, True)
    assert qa["prompt_tokens"] > 0 and qa["completion_tokens"] == 8 * 32
    assert any("models/teacher is not built yet" in n for n in qa["notes"])
    assert any("built by stage `teacher`" in n for n in qa["notes"])
    assert "≈8" in text

    # the answers arrive through `kd cache pull` (here: a build against the model, whose directory then goes)
    model = root / "models" / "teacher"
    model.mkdir(parents=True)
    (model / "config.json").write_text('{"model_type": "llama"}')
    params = load_params(root)
    identity = LocalTeacher("local", params.teachers["local"], root).identity
    asker = Asker(_Answers(identity), RequestCache(root / ".kd" / "cache"), "qa")
    stream, cfg = method("labeling"), params.datasets["qa"]
    prompt = load_prompt(root, cfg.template, stream.variables)
    asker.ask([stream.render(asker, prompt, cfg, item) for item in stream.items(cfg, root, root / "data")])
    assert asker.new == 8
    built = forecasts(kd_json(root, "status"))["qa"]
    assert (built["new"], built["cached"]) == (0, 8)  # ≈ still: the `teacher` stage is stale and upstream
    assert not any("not built yet" in n for n in built["notes"])
    shutil.rmtree(model)

    pulled = forecasts(kd_json(root, "status"))["qa"]
    assert (pulled["new"], pulled["cached"], pulled["approximate"]) == (0, 8, True)
    assert any(identity["digest"][:12] in n for n in pulled["notes"])
    assert server.received == received  # nothing was asked


def test_partly_built_project_forecasts_every_stage_it_can(server, tmp_path, monkeypatch):
    # guards: a missing models/<student> or data/<dataset> stopped `kd status` (exit 2) with a hint naming
    # the `teacher` stage, and the forecasts it could compute were lost
    monkeypatch.chdir(tmp_path)
    root = make_project(tmp_path / "p", server.url, {"qa": labeling(4), "derived": labeling(0, ANSWER, source="qa")})

    def student_generator(p):
        p["teachers"]["local"] = LOCAL
        p["teachers"]["s1gen"] = {**LOCAL, "path": "models/s1"}
        p["students"] = {"s1": {"init": {"kind": "from_teacher", "teacher": "local", "layers": [0]},
                                "objective": "sft", "datasets": ["qa"]}}
        p["datasets"]["selfgen"] = {**labeling(3), "teacher": "s1gen"}
    set_params(root, student_generator)

    code, text = kd(root, "status")
    assert code == 0, text
    rows = {row["stage"]: row for row in kd_json(root, "status")["stages"]}
    qa = rows["qa"]["forecast"]
    assert (qa["new"], qa["cached"], qa["approximate"]) == (4, 0, False)
    assert "forecast" not in rows["derived"]
    assert rows["derived"]["error"] == "cannot forecast yet: needs data/qa (built by stage `qa`, not run yet)"
    selfgen = rows["selfgen"]["forecast"]
    assert (selfgen["new"], selfgen["approximate"]) == (3, True)
    assert any("models/s1 (built by stage `s1`, not run yet)" in n for n in selfgen["notes"])
    assert "dvc repro teacher" not in text and "cannot forecast yet: needs data/qa" in text


def test_exit_code_only_when_nothing_could_be_forecast():
    # guards: the documented exit status of `kd status` (1 only when every stage that would run failed)
    from kd.pipeline.status import forecast_failed

    assert not forecast_failed({"stages": []})
    assert not forecast_failed({"stages": [{"stage": "a", "error": "x"}, {"stage": "b", "forecast": {}}]})
    assert forecast_failed({"stages": [{"stage": "a", "error": "x"}, {"stage": "t", "why": []}]})


def test_stale_stage_downstream_of_a_stale_one_is_approximate(server, tmp_path):
    # guards: `_downstream()` skipped stages already stale, so `derived` was forecast exact (`1 new`), then asked more
    root = make_project(tmp_path / "p", server.url, {"qa": labeling(16), "derived": labeling(0, ANSWER, source="qa")})
    repro(root)
    commit(root, "v1")
    edit_template(root)  # qa: its math answers change, so derived's inputs change
    answer = root / ANSWER
    answer.write_text(answer.read_text().replace("{{ instruction }}", "Briefly: {{ instruction }}"))
    derived = forecasts(kd_json(root, "status"))["derived"]
    assert derived["approximate"] is True
    assert any("upstream qa will change them" in n for n in derived["notes"])


def test_completion_estimate_is_capped_and_agrees_with_the_stage(tmp_path):
    # guards: after max_tokens 64 -> 32, `kd status` estimated 1.9k completion tokens for 48 requests (cap 1,536)
    # from the last build's answers, while the stage's own forecast of the same change said 768
    with FakeOpenAI(answer=lambda messages: "word " * 50) as long:
        root = make_project(tmp_path / "p", long.url, {"qa": labeling(16)})
        repro(root)
        commit(root, "v1")

        def shorter(p):
            p["datasets"]["qa"]["sampling"]["max_tokens"] = 32
        set_params(root, shorter)
        qa = forecasts(kd_json(root, "status"))["qa"]
        assert qa["new"] == 16 and qa["completion_tokens"] <= 16 * 32
        run = repro(root)
    from kd.provenance.forecast import Forecast

    assert Forecast(**qa).line() in run.stdout.splitlines()  # one function: the same line, word for word


def test_status_counts_exact_after_editing_a_few_shot_demo_seed(server, tmp_path):
    # guards the "done when": edit a seed row used as a demo in several Self-Instruct prompts; the exact
    # new/cached counts of `kd status` are what the build then asks
    ideas = {"method": "expansion", "teacher": "fake", "seeds": "seeds/instructions.jsonl",
             "template": "prompts/expansion/self_instruct.jinja", "target": 12, "per_round": 12, "max_rounds": 1,
             "demos": 3, "generated_demos": 0, "sampling": {"temperature": 0.0, "max_tokens": 64}}
    root = make_project(tmp_path / "p", server.url, {"ideas": ideas, "qa": labeling(40)})
    repro(root)
    commit(root, "v1")
    seeds = root / "seeds" / "instructions.jsonl"
    rows = [json.loads(line) for line in seeds.read_text().splitlines()]
    prompts = [json.dumps(b["messages"]) for b in server.bodies[-(12 + 40):]]
    uses = [sum(json.dumps(r["instruction"])[1:-1] in p for p in prompts) for r in rows]
    demo = max(range(len(rows)), key=uses.__getitem__)
    assert uses[demo] >= 3  # a demo of at least two Self-Instruct prompts, and its own labeling request
    rows[demo]["instruction"] += " Explain briefly."
    seeds.write_text("".join(json.dumps(r) + "\n" for r in rows))

    predicted = forecasts(kd_json(root, "status"))
    sent = server.received
    run = repro(root)
    asked = server.received - sent
    assert all(not f["approximate"] and f["estimated"] == 0 for f in predicted.values())
    assert predicted["ideas"]["new"] == uses[demo] - 1 and predicted["qa"]["new"] == 1
    assert predicted["ideas"]["new"] + predicted["qa"]["new"] == asked
    assert predicted["ideas"]["cached"] == 12 - predicted["ideas"]["new"] and predicted["qa"]["cached"] == 39
    for name in ("ideas", "qa"):
        f = predicted[name]
        assert f"{name}: forecast {f['new']} new teacher requests ({f['cached']} cached)" in run.stdout
