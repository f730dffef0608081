"""Secrets, teacher identity and remote code: credentials are refused and never printed; a local teacher's code
runs only when its digest is pinned; weights are safetensors only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, ValidationError, field_validator

from kd.config import LocalTeacher as LocalConfig
from kd.config import OpenAITeacher as OpenAIConfig
from kd.config import load_params
from kd.config.errors import format_errors
from kd.errors import KdError
from kd.runtime.local import LocalTeacher
from kd.runtime.models import code_digest, directory_digest, load_causal_lm
from kd.secrets import endpoint, looks_like_key, looks_secret, redact

GOOGLE = "AIza" + "Sy0123456789abcdefghijKLMNOPQRSTU"
HEX64 = "deadbeef" * 8


def with_teacher(project: Path, **teacher: Any) -> str:
    """The one-line error `load_params` gives for params with one more (openai) teacher, `remote`."""
    data = yaml.safe_load((project / "params.yaml").read_text())
    data["teachers"]["remote"] = {"backend": "openai", "base_url": "http://x/v1", "model": "m", **teacher}
    (project / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(KdError) as err:
        load_params(project)
    return str(err.value)


# Regression: `base_url: http://admin:Sup3rS3cret@host/v1` and `?key=AIza…` passed validation (and went on to
# dvc.lock and into error messages whole).
@pytest.mark.parametrize(("url", "secret", "shown"), [
    ("http://admin:Sup3rS3cret@llm.internal:8000/v1", "Sup3rS3cret", "http://***@llm.internal:8000/v1"),
    ("https://tok3n-only@llm.internal/v1", "tok3n-only", "https://***@llm.internal/v1"),
    (f"https://llm.internal/v1?key={GOOGLE}", GOOGLE[:12], "https://llm.internal/v1?key=***"),
    ("https://llm.internal/v1?api_key=plainvalue123", "plainvalue123", "?api_key=***"),
    ("https://llm.internal/v1?region=eu&token=abc123xyz", "abc123xyz", "?region=eu&token=***"),
])
def test_credentials_in_base_url_are_refused_and_never_printed(project: Path, url: str, secret: str,
                                                               shown: str) -> None:
    msg = with_teacher(project, base_url=url)
    assert "teachers.remote.base_url" in msg and "credentials in a URL are refused" in msg
    assert shown in msg and secret not in msg


def test_plain_urls_stay_valid() -> None:
    for url in ("https://api.openai.com/v1", "http://localhost:8000/v1", "http://[::1]:8000/v1?foo=bar"):
        assert OpenAIConfig(backend="openai", base_url=url, model="m").base_url == url
    assert endpoint("http://admin:pw@h.example:8000/v1?key=x") == "http://h.example:8000"
    assert endpoint("http://[::1]:8000/v1") == "http://[::1]:8000"


# Regression: a key typed into api_key_env (gsk_…, 64-hex, AIza…) passed the name pattern and was then echoed.
@pytest.mark.parametrize("key", ["gsk_" + "a1B2c3D4" * 7, HEX64, "9f86d081" * 8, GOOGLE, "sk-proj-abcdefghijklmnopqrstuv"])
def test_a_key_in_api_key_env_is_refused_without_echo(project: Path, key: str) -> None:
    msg = with_teacher(project, api_key_env=key)
    assert "teachers.remote.api_key_env: must name an environment variable; the value looks like an API key" in msg
    assert key[:8] not in msg and key[-8:] not in msg


def test_variable_names_are_not_keys() -> None:
    for name in ("OPENAI_API_KEY", "GROQ_API_KEY", "HF_TOKEN", "MY_VERY_LONG_COMPANY_GATEWAY_API_KEY_2"):
        assert not looks_like_key(name) and not looks_secret(name)
    assert looks_like_key(HEX64) and not looks_secret(HEX64)  # a sha256 pin elsewhere in params is no secret


# Regression: nothing stopped a validator's message from quoting a rejected value; pydantic errors are now
# shown by `msg` only and redacted line by line.
def test_validation_messages_are_redacted() -> None:
    class Quoting(BaseModel):
        url: str

        @field_validator("url")
        @classmethod
        def _quote(cls, v: str) -> str:
            raise ValueError(f"cannot reach {v}")

    data = {"url": "http://admin:Sup3rS3cret@h/v1?token=abc"}
    with pytest.raises(ValidationError) as err:
        Quoting.model_validate(data)
    line = format_errors(err.value, data, Quoting)
    assert line == "params.yaml: url: cannot reach http://***@h/v1?token=***"
    assert redact(f"key {GOOGLE} and sk-{'x' * 20}") == "key *** and ***"


# ------------------------------------------------------------------------------------------ remote code


def model_dir(root: Path, *, code: bool = True, weights: str = "model.safetensors") -> Path:
    """A directory shaped like a model with custom code: config naming it, weights, a modelling module that
    would leave a marker file if it ever ran."""
    d = root / "models" / "custom"
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"model_type": "custom", "auto_map": {
        "AutoConfig": "modeling_custom.CustomConfig", "AutoModelForCausalLM": "modeling_custom.CustomModel"}}))
    (d / weights).write_bytes(b"\0" * 64)
    if code:
        marker = root / "CODE_RAN"
        (d / "modeling_custom.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    return d


def local(**cfg: Any) -> LocalConfig:
    return LocalConfig(backend="local", path="models/custom", **cfg)


# Regression: `trust_remote_code: true` with `revision: deadbeef` on a local directory ran that directory's
# Python code; a revision pins nothing there.
def test_remote_code_in_a_local_directory_needs_its_digest_pinned(tmp_path: Path) -> None:
    d = model_dir(tmp_path)
    teacher = LocalTeacher("custom", local(trust_remote_code=True, revision="deadbeef"), tmp_path)
    for load in (teacher.tokenizer, teacher.loaded, teacher.vocab_size):
        with pytest.raises(KdError) as err:
            load()
        assert str(err.value) == (f"teachers.custom.code_digest: trust_remote_code: true runs the Python code in "
                                  f"models/custom; read it, then pin it with `code_digest: {code_digest(d)}`")
    assert not (tmp_path / "CODE_RAN").exists()

    pinned = local(trust_remote_code=True, code_digest=code_digest(d))
    (d / "modeling_custom.py").write_text("import os  # edited after review\n")
    with pytest.raises(KdError) as err:
        LocalTeacher("custom", pinned, tmp_path).tokenizer()
    assert "teachers.custom.code_digest: the code in models/custom is not the code pinned" in str(err.value)
    assert code_digest(d) in str(err.value)
    assert not (tmp_path / "CODE_RAN").exists()


# Regression: the `.py` files were not in a local teacher's digest, so editing them changed no cache key.
def test_code_files_are_part_of_the_teachers_identity(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the digest memo lives under .kd/ of the working directory
    d = model_dir(tmp_path)
    before = LocalTeacher("custom", local(), tmp_path).identity["digest"]
    (d / "modeling_custom.py").write_text("# one byte more or less is another model\n")
    assert LocalTeacher("custom", local(), tmp_path).identity["digest"] != before
    (d / "ops").mkdir()
    digest = directory_digest(d)
    (d / "ops" / "kernel.cu").write_text("// custom kernel\n")
    assert directory_digest(d) != digest


# Regression: a teacher directory with only pickle weights ended in a transformers traceback; a pickle must
# never be loaded at all.
def test_pickle_only_weights_are_refused_in_one_line(tmp_path: Path) -> None:
    d = model_dir(tmp_path, code=False, weights="pytorch_model.bin")
    with pytest.raises(KdError) as err:
        load_causal_lm(d, local(), "teachers.custom")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"teachers.custom.path: {d}: it has only pickle weights")
    assert "pytorch_model.bin" in msg and "safetensors only" in msg


# Regression: unpinned remote code surfaced only when a stage loaded the teacher; `kd check` now says so first.
def test_kd_check_reports_unpinned_remote_code(project: Path) -> None:
    from kd.pipeline.check import check

    d = model_dir(project)
    data = yaml.safe_load((project / "params.yaml").read_text())
    data["teachers"]["custom"] = {"backend": "local", "path": "models/custom", "trust_remote_code": True,
                                  "revision": "deadbeef"}
    (project / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(KdError) as err:
        check(project)
    assert f"teachers.custom.code_digest: trust_remote_code: true runs the Python code in models/custom; read it, " \
           f"then pin it with `code_digest: {code_digest(d)}`" in str(err.value)
    assert not (project / "CODE_RAN").exists()


# ------------------------------------------------------------------------------------------ the canary build


# Issue 11 "done when": a build with a canary key in the environment, after an attempt with canary credentials in
# `base_url` that must be refused, leaves neither canary in any file of the project (data, cache, dvc.lock,
# mlflow.db, model cards, DVC's own files) nor in anything it printed. Before, the URL passed `kd check` and
# went to dvc.lock and into error messages whole.
def test_canary_build_writes_and_prints_no_secret(tmp_path: Path, tiny_model_dir: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import secrets
    import shutil

    from fake_openai import FakeOpenAI
    from kdproject import commit, labeling, make_project, records, sh
    from studentproject import student

    from kd.pipeline.spec import dvc_yaml

    key, password = f"sk-canary-{secrets.token_hex(16)}", f"Pw-canary-{secrets.token_hex(8)}"
    monkeypatch.setenv("CANARY_API_KEY", key)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the build's own mlflow.db, under the project
    printed: list[str] = []

    def run(*cmd: str) -> Any:
        r = sh(root, *cmd, check=False)
        printed.extend([r.stdout, r.stderr])
        return r

    with FakeOpenAI(api_key=key, served_model="fake-served-1") as server:
        root = make_project(tmp_path / "p", server.url, {"qa": labeling(6)})
        shutil.copytree(tiny_model_dir, root / "models" / "tiny")
        params = yaml.safe_load((root / "params.yaml").read_text())
        params["teachers"]["fake"]["api_key_env"] = "CANARY_API_KEY"
        params["teachers"]["tiny"] = {"backend": "local", "path": "models/tiny", "dtype": "float32"}
        params["students"] = {"s": {**student("sft", training={"max_steps": 2, "max_length": 512}), "datasets": ["qa"]}}

        def write(base_url: str) -> None:
            params["teachers"]["fake"]["base_url"] = base_url
            (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

        write(server.url.replace("http://", f"http://admin:{password}@"))
        refused = run("python", "-m", "kd.cli", "check")
        assert refused.returncode == 2 and "teachers.fake.base_url: http://***@127.0.0.1:" in refused.stderr
        assert run("dvc", "repro").returncode != 0  # the stage refuses the params before any request
        assert server.received == 0

        write(server.url)
        (root / "dvc.yaml").write_text(dvc_yaml(load_params(root), root))
        (root / ".gitignore").write_text(".kd/\nmodels/tiny/\n")
        commit(root, "canary project")
        built = run("dvc", "repro")
        assert built.returncode == 0, built.stdout + built.stderr
        assert run("git", "add", "-A").returncode == 0 and run("git", "commit", "-qm", "built").returncode == 0
        audit = run("python", "-m", "kd.cli", "audit", records(root, "qa")[0]["id"][:12])
        assert audit.returncode == 0, audit.stderr
        for r in (run("python", "-m", "kd.cli", "show", "data/qa"), run("python", "-m", "kd.cli", "audit", "models/s")):
            assert r.returncode == 0, r.stderr

    # the key was used, the endpoint and the server's model name are on record, and the audit shows them
    assert server.answered == 6 and all(f"Bearer {key}" in json.dumps(h) for h in server.headers)
    host = server.url.removesuffix("/v1")
    assert records(root, "qa")[0]["provenance"]["requests"][0]["served_by"] == {"endpoint": host, "model": "fake-served-1"}
    assert f"served   by {host}, model fake-served-1 (asked for fake)" in audit.stdout
    for must in ("dvc.lock", "mlflow.db", "models/s/README.md", "models/s/kd_model.json", "data/qa/records.jsonl"):
        assert (root / must).is_file(), must
    for canary in (key, password):
        leaks = [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and canary.encode() in p.read_bytes()]
        assert leaks == [] and not any(canary in text for text in printed), canary


# Regression: MLflow's param redaction (kd.tracking.redact) knew key names and `sk-…` values, not URLs with
# credentials nor gsk_/AIza keys.
def test_mlflow_params_redact_urls_and_every_key_shape() -> None:
    from kd.tracking import redact as redact_params

    flat = {"t.base_url": "http://admin:pw@h/v1", "t.url": f"https://h/v1?key={GOOGLE}", "t.note": "gsk_" + "a1" * 12,
            "t.fine": "https://api.openai.com/v1", "t.api_key_env": "OPENAI_API_KEY"}
    assert redact_params(flat) == {"t.base_url": "***", "t.url": "***", "t.note": "***",
                                   "t.fine": "https://api.openai.com/v1", "t.api_key_env": "OPENAI_API_KEY"}


# Regression: the same hole in a student's `init: {kind: from_pretrained}` on a local directory: `revision: x`
# let the directory's code run.
def test_remote_code_in_a_local_init_directory_needs_its_digest_pinned(tmp_path: Path) -> None:
    from kd.config.students import FromPretrained
    from kd.runtime.init import init_student

    d = model_dir(tmp_path)
    init = FromPretrained(kind="from_pretrained", path="models/custom", trust_remote_code=True, revision="deadbeef")
    with pytest.raises(KdError) as err:
        init_student(init, None, tmp_path, key="students.s.init")
    assert str(err.value).startswith("students.s.init.code_digest: trust_remote_code: true runs the Python code")
    assert code_digest(d) in str(err.value) and not (tmp_path / "CODE_RAN").exists()
    with pytest.raises(ValidationError):  # neither pin: refused by params validation already
        FromPretrained(kind="from_pretrained", path="models/custom", trust_remote_code=True)
