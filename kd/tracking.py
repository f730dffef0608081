"""MLflow tracking: one run per training or evaluation stage, linked to the exact dataset versions.

`import mlflow` costs about a second, so it happens only when a run starts. The tracking URI defaults to
`sqlite:///mlflow.db` at the project root (MLflow 3's file store is in maintenance mode) and
`MLFLOW_TRACKING_URI` overrides it. Datasets are logged as inputs by their manifest fingerprint, never by
loading rows (MLflow #13020: minutes for 69k rows); their source is the directory (MLflow's `local` source, which
the UI shows as a path and `mlflow.data.get_source(...).load()` resolves) plus the DVC path and git revision that
`dvc get <repo> <path> --rev <rev>` resolves anywhere else.

A training run logs its model directory as artifacts under `model/` (`tracking.log_models`) and may register it
(`tracking.register_models`); the evaluation run has one child run per model with the same metric names, which
is what MLflow's compare view and charts line up side by side.

A run is tagged with the host and process that runs it. Ctrl-C and SIGTERM end it KILLED (kd.stage); a process
killed outright (`kill -9`, the OOM killer) cannot, so the next `start_run` of the same stage closes the RUNNING
runs whose process is gone as KILLED (`close_orphans`); runs of live processes and of other hosts are left alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from kd import __version__
from kd.paths import METRICS_DIR, PLOTS_DIR, REPORTS_DIR
from kd.secrets import REDACTED, is_secret_key, looks_secret, scrub_known

MAX_PARAM_CHARS = 6000  # MLflow truncates longer values with a warning; we cut them ourselves, visibly
MAX_DIGEST_CHARS = 36  # MLflow rejects longer dataset digests
MODEL_ARTIFACTS = "model"  # where a run's model directory goes among its artifacts
DIRTY_SUFFIX = "+dirty"  # after a commit: the worktree's tracked inputs differed from it (git_modified)
DVC_LOCK = "dvc.lock"
BUILD_WRITES = tuple(f"{d}/" for d in (METRICS_DIR, PLOTS_DIR, REPORTS_DIR))  # git-tracked outs of the stages


def tracking_uri(root: Path) -> str:
    """`MLFLOW_TRACKING_URI`, else the sqlite store `mlflow.db` at the project root."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(Path(root) / 'mlflow.db').resolve()}"


def configured_uri() -> str:
    """The tracking URI as the user configured it (relative to the project root), for model cards."""
    return os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"


def git_commit(root: Path) -> str:
    """`git rev-parse HEAD` of the project, with DIRTY_SUFFIX when a tracked input differs from it (git_modified);
    "unknown" outside a git checkout. A dirty commit is not what the model learned from: edit -> `dvc repro` ->
    commit would otherwise name the commit before the edit."""
    head = _git(root, "rev-parse", "HEAD").strip()
    if not head:
        return "unknown"
    return head + DIRTY_SUFFIX if git_modified(root) else head


def git_modified(root: Path) -> list[str]:
    """Tracked files that differ from HEAD (staged or not), leaving out what a build itself rewrites: dvc.lock,
    .gitignore files DVC keeps, and the git-tracked metrics, plots and reports of the stages."""
    out = _git(root, "diff", "--name-only", "--relative", "-z", "HEAD")  # paths relative to the project root
    paths = [p for p in out.split("\0") if p]
    paths = [p for p in paths if p != DVC_LOCK and Path(p).name != ".gitignore" and not p.startswith(BUILD_WRITES)]
    return sorted(paths)


def _git(root: Path, *args: str) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout if out.returncode == 0 else ""


def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """Nested dicts and lists -> {"a.b.0.c": "value"}; MLflow stores params as flat strings."""
    flat: dict[str, str] = {}
    if isinstance(data, dict) and data:
        for k, v in data.items():
            flat.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(data, list) and data and any(isinstance(v, dict) for v in data):  # lists of scalars stay JSON
        for i, v in enumerate(data):
            flat.update(flatten(v, f"{prefix}.{i}" if prefix else str(i)))
    else:
        value = data if isinstance(data, str) else json.dumps(data, sort_keys=True)
        flat[prefix] = value if len(value) <= MAX_PARAM_CHARS else value[:MAX_PARAM_CHARS - 3] + "..."
    return flat


def redact(flat: dict[str, str]) -> dict[str, str]:
    """Replace values whose key names a secret, that look like a key themselves, or that hold a key kd knows in any
    encoding (kd.secrets.scrub_known), by `***`."""
    return {k: REDACTED if is_secret_key(k.rsplit(".", 1)[-1]) or looks_secret(v) or scrub_known(v) != v else v
            for k, v in flat.items()}


def loggable_params(params: dict[str, Any]) -> dict[str, str]:
    """What `start_run` logs: flattened with dots, each value ≤ 6000 characters, secrets redacted."""
    return redact(flatten(params))


class Run:
    """An active MLflow run: step metrics go to it; `end` closes it (FAILED when training raised).

    Everything goes through an MlflowClient bound to this run's tracking URI: kd never sets MLflow's global
    tracking URI or active run, which would redirect the logging of whatever else runs in the process.
    """

    def __init__(self, run_id: str, uri: str) -> None:
        self.run_id, self.tracking_uri = run_id, uri

    def _client(self) -> Any:
        import mlflow

        return mlflow.MlflowClient(self.tracking_uri)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._client().log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def end(self, status: str = "FINISHED") -> None:
        self._client().set_terminated(self.run_id, status=status)

    def log_model_dir(self, model_dir: Path) -> str:
        """Every file of a model directory under the run's `model/` artifacts; returns its `runs:/` URI."""
        self._client().log_artifacts(self.run_id, str(model_dir), artifact_path=MODEL_ARTIFACTS)
        return f"runs:/{self.run_id}/{MODEL_ARTIFACTS}"

    def register(self, name: str, source: str, tags: dict[str, str]) -> str:
        """A new version of registered model `name` (created on first use) from `source`; its version number."""
        import mlflow

        client = self._client()
        try:
            client.create_registered_model(name)
        except mlflow.exceptions.MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        return client.create_model_version(name, source, run_id=self.run_id, tags=redact(tags)).version

    def child(self, name: str, metrics: dict[str, float], tags: dict[str, str]) -> str:
        """A finished child run (MLflow nests it under this one) holding `metrics` at step 0; its id."""
        from mlflow.entities import Metric, RunTag

        client = self._client()
        experiment_id = client.get_run(self.run_id).info.experiment_id
        child = client.create_run(experiment_id, run_name=name, tags={"mlflow.parentRunId": self.run_id})
        now = int(time.time() * 1000)
        client.log_batch(child.info.run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
                         tags=[RunTag(k, v) for k, v in redact(tags).items()])
        client.set_terminated(child.info.run_id)
        return child.info.run_id

    @contextlib.contextmanager
    def failing(self) -> Iterator[None]:
        """Around training: an error ends the run FAILED, an interrupt KILLED (its checkpoint resumes it); on
        success the run stays open for the final metrics, and the caller ends it."""
        try:
            yield
        except Exception:
            self.end("FAILED")
            raise
        except BaseException:  # KeyboardInterrupt, SystemExit
            self.end("KILLED")
            raise


def process_tag(pid: int) -> str:
    """`<pid>:<start time>`: a pid the system later reuses for another process does not pass for this one."""
    return f"{pid}:{_start_time(pid) or ''}"


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks (Linux /proc), "Z" for a zombie, None where unknown or gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return "Z" if stat[0] == "Z" else stat[19]


def _alive(tag: str) -> bool:
    pid_text, _, started = tag.partition(":")
    try:
        pid = int(pid_text)
        os.kill(pid, 0)
    except ValueError:
        return True  # not a tag kd wrote: not ours to judge
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, another user's
    now = _start_time(pid)
    return now != "Z" and (not started or now is None or now == started)


def close_orphans(client: Any, experiment_id: str, stage: str, keep: str | None = None) -> list[str]:
    """End as KILLED the RUNNING runs of `stage` started on this host by a process that is gone, except `keep`
    (a killed training run about to be continued from its checkpoint); their ids."""
    host = socket.gethostname()
    quoted = stage.replace("'", "\\'")
    runs = client.search_runs([experiment_id], f"tags.dvc_stage = '{quoted}' and attributes.status = 'RUNNING'")
    closed = []
    for r in runs:
        tags = r.data.tags
        if r.info.run_id != keep and tags.get("kd.host") == host and "kd.process" in tags and not _alive(tags["kd.process"]):
            client.set_tag(r.info.run_id, "kd.ended", "process gone (killed); closed by the next run of the stage")
            client.set_terminated(r.info.run_id, status="KILLED")
            closed.append(r.info.run_id)
    return closed


def dataset_source(root: Path, path: str, commit: str) -> dict[str, str]:
    """A dataset input's source: `uri` (the directory, which MLflow's `local` source loads and its UI shows), and
    where DVC finds the same version on another machine: `dvc_path` in the repository `repo` (its `origin` remote,
    else this checkout) at git revision `rev` (the commit the run names; `+dirty` when it was not clean)."""
    where = Path(path).resolve()
    try:
        rel = where.relative_to(Path(root).resolve()).as_posix()
    except ValueError:  # outside the project (a test's or a user's absolute path): no DVC path to give
        return {"uri": str(where)}
    repo = _without_credentials(_git(root, "remote", "get-url", "origin").strip()) or str(Path(root).resolve())
    return {"uri": str(where), "dvc_path": rel, "repo": repo, "rev": commit}


def _without_credentials(url: str) -> str:
    """A remote URL without the `user:token@` some users put in https remotes: never a secret in MLflow."""
    parts = urlsplit(url)
    if parts.scheme and "@" in parts.netloc:
        return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))
    return url


def model_version_tags(git: str, datasets: list[dict[str, str]]) -> dict[str, str]:
    """The tags of a registered model version: what it learned from (`dataset.<name>` = fingerprint), the git
    commit and the kd version, so the registry answers "which data and code" without opening the run."""
    return {"git_commit": git, "kd_version": __version__, **{f"dataset.{d['name']}": d["fingerprint"] for d in datasets}}


def environment_tags(env: dict[str, Any]) -> dict[str, str]:
    """An environment (kd.runtime.environment) as run tags: `kd.env.<library>`, `kd.env.device`, `kd.env.cpu`…,
    so runs can be searched and compared by it (tags, not params: a resumed run may log them again)."""
    libs = {f"kd.env.{k}": str(v) for k, v in (env.get("libraries") or {}).items() if v}
    return {**libs, **{f"kd.env.{k}": str(v) for k, v in env.items() if k != "libraries" and v is not None}}


def start_run(root: Path, project: str, stage: str, params: dict[str, Any],
              datasets: list[dict[str, str]], context: str = "training", run_id: str | None = None,
              tags: dict[str, str] | None = None) -> Run:
    """Open one run for a stage in the experiment named after the project.

    Args:
        params: nested params of this stage (flattened, truncated and redacted here).
        datasets: [{"name", "path", "fingerprint"}] logged as inputs by fingerprint, without reading rows.
        run_id: a run to continue (a resumed training stage). Its params must be identical — MLflow raises on
            a changed value — so callers pass the run id only when the params hash matches; if that run is
            gone (another tracking URI, deleted), a new run starts.
        tags: more run tags (e.g. `environment_tags`).

    Returns:
        The open run; call `end()` when the stage finishes.
    """
    import logging

    import mlflow
    from mlflow.entities import Dataset, DatasetInput, InputTag, Param, RunTag

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # no "created experiment"/"run started" chatter
    uri = tracking_uri(root)
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name(project)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(project)
    if run_id is not None:
        try:
            if client.get_run(run_id).info.experiment_id != experiment_id:
                run_id = None
        except mlflow.exceptions.MlflowException:
            run_id = None
    close_orphans(client, experiment_id, stage, keep=run_id)
    if run_id is None:
        run_id = client.create_run(experiment_id, run_name=stage).info.run_id
    else:
        client.update_run(run_id, status="RUNNING")
    tags = {"git_commit": git_commit(root), "dvc_stage": stage, "kd.context": context,
            "kd.host": socket.gethostname(), "kd.process": process_tag(os.getpid()), **(tags or {})}
    client.log_batch(run_id, params=[Param(k, v) for k, v in loggable_params(params).items()],
                     tags=[RunTag(k, v) for k, v in tags.items()])
    inputs = [DatasetInput(Dataset(name=ds["name"], digest=ds["fingerprint"][:MAX_DIGEST_CHARS], source_type="local",
                                   source=json.dumps(dataset_source(root, ds["path"], tags["git_commit"]))),
                           tags=[InputTag("mlflow.data.context", context), InputTag("fingerprint", ds["fingerprint"])])
              for ds in datasets]
    if inputs:
        client.log_inputs(run_id, datasets=inputs)
    return Run(run_id, uri)
