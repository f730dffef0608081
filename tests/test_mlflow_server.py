"""MLflow as its users see it: through the REST API of a `mlflow server` (sqlite store, proxied artifacts) on
loopback, after a kd training stage and an evaluation logged to it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from studentproject import make_student_project, student

from kd.evaluation.results import ModelResult, Run, Scores

STARTUP_S = 60
TOKEN = "ghp_" + "t" * 36


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")  # session: started before the session's tiny model is built, not after it
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One server, started as `mlflow server` (seconds: the tiny model and the project are built meanwhile); its
    URL once it answers (`ready`)."""
    tmp = tmp_path_factory.mktemp("mlflow_server")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # its job runner starts 8 more processes we do not use
    log = open(tmp / "server.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}", "--artifacts-destination", str(tmp / "artifacts")],
        cwd=tmp, env=env, stdout=subprocess.DEVNULL, stderr=log)
    url = f"http://127.0.0.1:{port}"

    def ready() -> str:
        deadline = time.monotonic() + STARTUP_S
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        return url
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not start: {(tmp / 'server.log').read_text()[-2000:]}")
            time.sleep(0.3)

    try:
        yield ready
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()


def _get(url: str, endpoint: str, **query: Any) -> dict[str, Any]:
    from urllib.parse import urlencode

    with urllib.request.urlopen(f"{url}/api/2.0/mlflow/{endpoint}?{urlencode(query)}", timeout=10) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def trained(server: Callable[[], str], tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Any]:
    """A student trained by kd with `tracking.register_models: true`, logging to the server."""
    from kd.distill.students import train_student

    root = make_student_project(tmp_path_factory.mktemp("p"), tiny_model_dir,
                                {"s": student("sft", training={"max_steps": 1})}, logits=False)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["tracking"] = {"log_models": True, "register_models": True}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # a user's https remote with a token in it: the dataset source names the repository, never the token
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run(["git", "remote", "add", "origin", f"https://user:{TOKEN}@git.example/kd.git"], cwd=root, check=True)
    url = server()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", url)
        line = train_student("s", root)
    info = json.loads((root / "models/s/kd_model.json").read_text())
    return {"root": root, "line": line, "run_id": info["mlflow"]["run_id"], "info": info, "url": url}


# The model's files are artifacts of its training run, so `mlflow ui` shows and downloads the model.
def test_training_run_lists_the_model_files(trained):
    server = trained["url"]
    listed = _get(server, "artifacts/list", run_id=trained["run_id"], path="model")
    names = {Path(f["path"]).name for f in listed["files"]}
    assert {"model.safetensors", "config.json", "tokenizer.json", "kd_model.json", "README.md"} <= names
    size = next(int(f["file_size"]) for f in listed["files"] if f["path"].endswith("model.safetensors"))
    assert size == (trained["root"] / "models/s/model.safetensors").stat().st_size


# tracking.register_models: a registered version named after the student, tagged with data, code and kd version.
def test_registered_version_names_datasets_commit_and_kd_version(trained, monkeypatch):
    server = trained["url"]
    from kd import __version__

    versions = _get(server, "model-versions/search", filter="name='s'")["model_versions"]
    (v,) = versions
    assert v["run_id"] == trained["run_id"] and v["source"].endswith("/model") and ", model v1)" in trained["line"]
    tags = {t["key"]: t["value"] for t in v["tags"]}
    fp = json.loads((trained["root"] / "data/sft/manifest.json").read_text())["fingerprint"]
    assert tags == {"dataset.sft": fp, "git_commit": trained["info"]["git_commit"], "kd_version": __version__}
    import mlflow  # the version resolves to the model's files: `models:/s/1` downloads a loadable directory

    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    got = Path(mlflow.artifacts.download_artifacts("models:/s/1", dst_path=str(trained["root"] / "dl")))
    assert (got / "model.safetensors").read_bytes() == (trained["root"] / "models/s/model.safetensors").read_bytes()


# A dataset input's source resolves: MLflow's own source API loads the directory of that fingerprint, and the DVC
# path and git revision name it for `dvc get` on another machine.
def test_dataset_input_source_resolves(trained):
    server = trained["url"]
    import mlflow
    from mlflow.entities import Dataset

    run = _get(server, "runs/get", run_id=trained["run_id"])["run"]
    (inp,) = run["inputs"]["dataset_inputs"]
    ds = inp["dataset"]
    source = json.loads(ds["source"])
    assert ds["source_type"] == "local" and source["dvc_path"] == "data/sft" and source["rev"] == "unknown"
    assert source["repo"] == "https://git.example/kd.git"
    loaded = mlflow.data.get_source(Dataset(ds["name"], ds["digest"], ds["source_type"], ds["source"])).load(
        dst_path=str(trained["root"] / "loaded"))
    manifest = json.loads((Path(loaded) / "manifest.json").read_text())
    assert {t["key"]: t["value"] for t in inp["tags"]}["fingerprint"] == manifest["fingerprint"]


# No secret reaches MLflow: the token in the git remote's URL is in neither the run nor the model version.
def test_nothing_secret_on_the_server(trained):
    server = trained["url"]
    seen = json.dumps(_get(server, "runs/get", run_id=trained["run_id"]))
    seen += json.dumps(_get(server, "model-versions/search", filter="name='s'"))
    assert "git.example" in seen and TOKEN not in seen


def _row(name: str, kind: str, rouge: list[float], run_id: str | None = None) -> ModelResult:
    about = {"mlflow": {"run_id": run_id}, "git_commit": "abc"} if run_id else {}
    return ModelResult(name, kind, about, None, [Scores(rouge=r, stopped=True, length=4, longest_run=1)
                                                 for r in rouge])


# The evaluation run holds one child run per model with the same metric names: MLflow compares them side by side.
def test_evaluation_metrics_per_model(trained, monkeypatch):
    server = trained["url"]
    from kd.evaluation.outputs import log_mlflow

    root = trained["root"]
    run = Run(prompts=[], prompts_path="seeds/q.jsonl", prompts_sha256="ef" * 32, template=None, max_new_tokens=4,
              teacher="tiny", results=[_row("teacher", "teacher", [1.0, 1.0, 1.0]),
                                       _row("s", "student", [0.2, 0.4, 0.6], trained["run_id"])])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    parent = log_mlflow(run, root, "kd-test", {"max_new_tokens": 4})
    exp = _get(server, "runs/get", run_id=parent)["run"]["info"]["experiment_id"]
    with urllib.request.urlopen(urllib.request.Request(
            f"{server}/api/2.0/mlflow/runs/search", method="POST", headers={"Content-Type": "application/json"},
            data=json.dumps({"experiment_ids": [exp], "filter": f"tags.mlflow.parentRunId = '{parent}'"}).encode()),
            timeout=10) as r:
        children = json.loads(r.read())["runs"]
    by_model = {c["info"]["run_name"]: c for c in children}
    assert set(by_model) == {"teacher", "s"}
    metrics = {m: {x["key"]: x["value"] for x in c["data"]["metrics"]} for m, c in by_model.items()}
    assert metrics["s"]["rouge_l"] == pytest.approx(0.4) and metrics["teacher"]["rouge_l"] == pytest.approx(1.0)
    assert "rouge_l_lo" in metrics["s"]  # the interval travels with the value
    tags = {x["key"]: x["value"] for x in by_model["s"]["data"]["tags"]}
    assert tags["kd.training_run"] == trained["run_id"]
