"""MLflow tracking: flat params, redacted secrets, datasets as inputs by fingerprint, resumable runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from kd.tracking import (
    MAX_PARAM_CHARS,
    REDACTED,
    flatten,
    git_commit,
    loggable_params,
    redact,
    start_run,
    tracking_uri,
)


def test_flatten_nested_params_with_dots() -> None:
    flat = flatten({"training": {"lr": 0.001, "seed": 0}, "datasets": ["sft", "qa"], "hidden": None,
                    "pairs": [[0, 1]], "init": {"layers": [{"a": 1}]}, "name": "s", "on": True})
    assert flat == {"training.lr": "0.001", "training.seed": "0", "datasets": '["sft", "qa"]', "hidden": "null",
                    "pairs": "[[0, 1]]", "init.layers.0.a": "1", "name": "s", "on": "true"}
    assert all(isinstance(v, str) for v in flat.values())
    assert len(flatten({"long": "x" * 10_000})["long"]) == MAX_PARAM_CHARS  # MLflow's limit, cut visibly


def test_secrets_are_redacted() -> None:
    flat = loggable_params({"teacher": {"api_key": "abc", "api_key_env": "OPENAI_API_KEY", "hf_token": "x",
                                        "password": "p", "client_secret": "s", "max_tokens": 64,
                                        "max_new_tokens": 8, "note": "sk-" + "a" * 30,
                                        "header": "Bearer " + "b" * 20}})
    assert flat["teacher.api_key"] == flat["teacher.hf_token"] == flat["teacher.password"] == REDACTED
    assert flat["teacher.client_secret"] == flat["teacher.note"] == flat["teacher.header"] == REDACTED
    # the NAME of the variable holding a key is not a secret, and token counts are not tokens
    assert flat["teacher.api_key_env"] == "OPENAI_API_KEY"
    assert flat["teacher.max_tokens"] == "64" and flat["teacher.max_new_tokens"] == "8"
    assert redact({"a.b": "plain"}) == {"a.b": "plain"}


def test_tracking_uri_default_and_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")
    assert tracking_uri(tmp_path) == "sqlite:///elsewhere.db"
    assert git_commit(tmp_path) == "unknown"  # not a git checkout


def test_run_logs_params_tags_inputs_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    fp = "ab" * 32
    data = [{"name": "sft", "path": str(tmp_path / "data" / "sft"), "fingerprint": fp}]
    params = {"student": {"kd": {"beta": 0.5}, "api_key": "secret-value"}}
    run = start_run(tmp_path, "proj", "student_x", params, data)
    run.log_metrics({"loss": 2.0}, step=1)
    # a killed run continues in the same MLflow run: identical params may be logged again
    again = start_run(tmp_path, "proj", "student_x", params, data, run_id=run.run_id)
    assert again.run_id == run.run_id
    again.log_metrics({"loss": 1.5}, step=2)
    again.end()
    client = mlflow.MlflowClient(uri)
    got = client.get_run(run.run_id)
    assert got.info.status == "FINISHED"
    assert client.get_experiment(got.info.experiment_id).name == "proj"
    assert got.data.params == {"student.kd.beta": "0.5", "student.api_key": REDACTED}
    assert got.data.tags["dvc_stage"] == "student_x" and got.data.tags["git_commit"] == "unknown"
    (ds,) = got.inputs.dataset_inputs
    assert ds.dataset.name == "sft" and ds.dataset.digest == fp[:36]  # MLflow rejects digests over 36 chars
    assert {t.key: t.value for t in ds.tags} == {"fingerprint": fp, "mlflow.data.context": "training"}
    assert [m.value for m in client.get_metric_history(run.run_id, "loss")] == [2.0, 1.5]
    # a run id the store does not know (another tracking URI) starts a new run instead of failing
    fresh = start_run(tmp_path, "proj", "student_x", params, data, run_id="0" * 32)
    assert fresh.run_id != run.run_id
    fresh.end()


def test_a_run_ends_failed_on_an_error_and_killed_on_an_interrupt(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    statuses = []
    for raised in (ValueError("bad data"), KeyboardInterrupt()):
        run = start_run(tmp_path, "proj", "student_x", {"lr": 1}, [])
        with pytest.raises(type(raised)), run.failing():
            raise raised
        statuses.append(mlflow.MlflowClient(uri).get_run(run.run_id).info.status)
    run = start_run(tmp_path, "proj", "student_x", {"lr": 1}, [])
    with run.failing():
        pass  # success leaves the run open for the final metrics
    assert statuses == ["FAILED", "KILLED"]
    assert mlflow.MlflowClient(uri).get_run(run.run_id).info.status == "RUNNING"
    run.end()


# A dataset input's source names the DVC path, the git revision and the repository, never a token in its URL.
def test_dataset_source_names_dvc_path_revision_and_a_clean_remote(tmp_path: Path) -> None:
    import subprocess

    from kd.tracking import dataset_source

    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run(["git", "remote", "add", "origin", "https://me:ghp_secret123@example.com/p.git"], cwd=tmp_path,
                   check=True)
    src = dataset_source(tmp_path, str(tmp_path / "data" / "sft"), "abc123")
    assert src == {"uri": str((tmp_path / "data" / "sft").resolve()), "dvc_path": "data/sft",
                   "repo": "https://example.com/p.git", "rev": "abc123"}
    assert dataset_source(tmp_path, "/elsewhere/d", "abc123") == {"uri": "/elsewhere/d"}  # outside the project


# tracking.register_models without log_models would register a version pointing at nothing: refused, naming both.
def test_register_without_logging_is_refused(tmp_path: Path) -> None:
    from kd.config import Tracking

    assert Tracking().log_models and not Tracking().register_models
    with pytest.raises(ValueError, match="tracking.register_models: true needs tracking.log_models: true"):
        Tracking(log_models=False, register_models=True)


# tracking.log_models: false logs no model files (and so registers nothing); true logs them, registering on request.
def test_log_models_switch(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from kd.config import Tracking
    from kd.distill.envelope import Job

    calls: list[tuple] = []
    run = SimpleNamespace(log_model_dir=lambda d: calls.append(("log", d.name)) or "runs:/r/model",
                          register=lambda name, src, tags: calls.append(("register", name, src, tags)) or "3")
    data = [{"name": "sft", "path": "data/sft", "fingerprint": "ab" * 32}]

    def job(**switches: bool) -> SimpleNamespace:
        return SimpleNamespace(params=SimpleNamespace(tracking=Tracking(**switches)), root=tmp_path, name="s",
                               datasets=data, logits=None)

    assert Job.log_model(job(log_models=False), run, "c0ffee") == "" and calls == []
    assert Job.log_model(job(), run, "c0ffee") == "" and calls == [("log", "s")]
    calls.clear()
    assert Job.log_model(job(register_models=True), run, "c0ffee") == ", model v3"
    assert calls[1][:3] == ("register", "s", "runs:/r/model") and calls[1][3]["dataset.sft"] == "ab" * 32
