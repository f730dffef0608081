"""Model directories: what kd writes for a student or reward model, what it records about any model, and
loading a local causal LM in the precision its params ask for.

A model directory `models/<name>/` holds safetensors weights, the tokenizer, `kd_model.json` (ModelInfo: what
made the model — datasets and their fingerprints, logits, params, git commit, MLflow run, final metrics) and a
`README.md` model card that says the same in words (DESIGN.md §5).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from kd.config import LocalTeacher, Params
from kd.config.students import FromPretrained
from kd.errors import KdError
from kd.paths import DIGEST_MEMO, under
from kd.records import replace_dir
from kd.runtime.device import resolve_device, resolve_dtype
from kd.runtime.environment import environment_lines
from kd.tracking import DIRTY_SUFFIX

INFO_FILE = "kd_model.json"
CARD_FILE = "README.md"
_MODEL_FILES = (".safetensors", ".json", ".model", ".txt", ".jinja")
# Code a model directory may carry, which `trust_remote_code` runs (modelling/tokenizer modules, native extensions).
CODE_FILES = (".py", ".so", ".pyd", ".c", ".cc", ".cpp", ".cu", ".cuh", ".h")
# A class transformers may import from the model directory itself: `module.Class` (or `pkg.module.Class`). Anything
# else leaves the directory: `repo--module.Class` (another hub repo, or `/abs/dir--module.Class`: a directory
# anywhere), a path with `/` or `..`.
LOCAL_CLASS = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+")
# A pinned hub revision is a commit: a branch or tag (`main`, `v1`) can move to other code after it was read.
COMMIT = re.compile(r"[0-9a-f]{40}")
# Weights in pickle formats: loading them can run arbitrary code, so kd never does (safetensors only).
PICKLE_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
PROVENANCE_FILES = (CARD_FILE, INFO_FILE)
DIRTY_NOTE = (" — not a clean commit: tracked files (templates, seeds, params, code) had uncommitted changes, "
              "so this commit does not hold everything the model learned from")


class DatasetRef(BaseModel):
    name: str
    fingerprint: str


class MlflowRef(BaseModel):
    run_id: str | None = None
    tracking_uri: str | None = None
    experiment: str | None = None


class ModelInfo(BaseModel):
    """`kd_model.json`: what made a model. Written by the training envelope, read by evaluation and `kd audit`."""

    model_config = ConfigDict(extra="ignore")  # directories written by older kd versions carry more keys

    name: str
    kind: Literal["student", "reward_model"] = "student"
    section: Literal["students", "reward_models"] = "students"
    objective: str
    init: dict[str, Any]
    datasets: list[DatasetRef]
    logits: DatasetRef | None = None
    params: dict[str, Any] = {}
    git_commit: str = "unknown"
    mlflow: MlflowRef = MlflowRef()
    metrics: dict[str, Any] = {}
    held_out: list[str] | None = None  # reward models: the record ids whose pairs measure its accuracy
    world_size: int = 1  # training processes; global batch = batch_size × grad_accum × world_size
    environment: dict[str, Any] = {}  # kd.runtime.environment.collect: libraries, device, dtype, CPU/GPU kind


def directory_digest(path: Path) -> str:
    """sha256 over the weights, config and tokenizer files of a model directory.

    kd's own provenance files (the `README.md` card, `kd_model.json`) are left out: they name the git commit and
    MLflow run, so a byte-identical model rebuilt elsewhere would otherwise get another identity, and a student
    used as a generator would draw different samples (sampling is seeded from the request key).

    Code files anywhere in the directory (CODE_FILES) are part of it: with `trust_remote_code` they decide what
    the model computes, so editing them must change every cache key that names this model.

    Hashing gigabytes on every stage start is wasteful, so digests are memoised by (path, size, mtime).
    """
    files = sorted({p for p in path.iterdir() if p.is_file() and p.suffix in _MODEL_FILES
                    and p.name not in PROVENANCE_FILES} | set(code_files(path)))
    if not files:
        raise KdError(f"{path}: no model files (expected safetensors, config.json and tokenizer files)")
    stamp = [[p.relative_to(path).as_posix(), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    memo_key = str(path.resolve())
    try:
        memo = json.loads(DIGEST_MEMO.read_text())
    except (OSError, ValueError):
        memo = {}
    if memo.get(memo_key, {}).get("stamp") == stamp:
        return memo[memo_key]["digest"]
    digest = _hash_files(path, files)
    memo[memo_key] = {"stamp": stamp, "digest": digest}
    try:
        DIGEST_MEMO.parent.mkdir(parents=True, exist_ok=True)
        tmp = DIGEST_MEMO.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(memo))
        os.replace(tmp, DIGEST_MEMO)
    except OSError:
        pass  # the memo only saves time
    return digest


def _hash_files(root: Path, files: list[Path]) -> str:
    """sha256 over `relative/path:sha256-of-content` lines, in the given order."""
    h = hashlib.sha256()
    for p in files:
        fh = hashlib.sha256()
        with p.open("rb") as f:
            while chunk := f.read(1 << 22):
                fh.update(chunk)
        h.update(f"{p.relative_to(root).as_posix()}:{fh.hexdigest()}\n".encode())
    return h.hexdigest()


def code_files(path: Path) -> list[Path]:
    """The code files anywhere under a model directory (what `trust_remote_code` may import or load)."""
    return sorted(p for p in path.rglob("*") if p.suffix in CODE_FILES and p.is_file()
                  and "__pycache__" not in p.relative_to(path).parts)


def config_files(path: Path) -> list[Path]:
    """The configs that name which code runs (`auto_map`, `custom_pipelines`): transformers reads them at the top
    of the directory, and each one's name ends `config.json` (config, tokenizer_config, generation_config,
    processor_config, preprocessor_config, video_preprocessor_config, adapter_config …)."""
    return sorted(p for p in path.glob("*config.json") if p.is_file())


def code_digest(path: Path) -> str:
    """sha256 of everything in a model directory that decides which code runs (its code files and its configs,
    by relative path and content): what `code_digest` pins. A config is in it because its `auto_map` chooses
    the classes: with code files alone, a directory without any hashed to the digest of the empty set and its
    config.json could then point anywhere."""
    return _hash_files(path, sorted(set(code_files(path)) | set(config_files(path))))


def code_references(path: Path) -> list[tuple[str, str]]:
    """(config file, reference) for every class a config names in an `auto_map` (or a `custom_pipelines` `impl`),
    at any depth (a composite model's sub-configs carry their own). An unreadable config gives ("file", "")."""
    refs: list[tuple[str, str]] = []

    def walk(node: Any, name: str, mapped: bool) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, name, mapped or k in ("auto_map", "impl"))
        elif isinstance(node, list):
            for v in node:
                walk(v, name, mapped)
        elif mapped and node is not None:
            refs.append((name, node if isinstance(node, str) else repr(node)))

    for p in config_files(path):
        try:
            walk(json.loads(p.read_bytes()), p.name, False)
        except (ValueError, RecursionError):  # transformers would fail on it too; refuse rather than guess
            refs.append((p.name, ""))
    return refs


def foreign_code(path: Path) -> str | None:
    """The first config reference to code outside the directory (or an unreadable config), in words; else None."""
    for name, ref in code_references(path):
        if not LOCAL_CLASS.fullmatch(ref):
            return f"{name} is not valid JSON" if ref == "" else f"{name} maps a class to {ref[:120]!r}"
    return None


def trusted_code(path: Path, cfg: LocalTeacher | FromPretrained, key: str) -> bool:
    """Whether transformers may run the code in a local model directory (a teacher, a `from_pretrained` init):
    only when the params ask for it and pin exactly the code that is there (a `revision` pins nothing locally).

    Raises:
        KdError: naming `<key>.code_digest`, with the directory's actual digest to copy in after reading the code.
    """
    if not cfg.trust_remote_code:
        return False
    if not path.is_dir():  # a hub id: only a commit pins the code that will be downloaded and run
        if not (cfg.revision and COMMIT.fullmatch(cfg.revision)):
            raise KdError(f"{key}.revision: trust_remote_code: true on hub model {cfg.path} needs `revision` pinned "
                          f"to a full 40-hex commit (a branch or tag can move to other code)")
        return True
    if why := foreign_code(path):
        raise KdError(f"{key}.trust_remote_code: {cfg.path}: {why}, which is code outside the directory (another "
                      f"repo, an absolute path or `..`); kd runs only code pinned inside it by `code_digest`")
    actual = code_digest(path)
    if cfg.code_digest is None:
        raise KdError(f"{key}.code_digest: trust_remote_code: true runs the Python code in {cfg.path}; read it, then "
                      f"pin it with `code_digest: {actual}`")
    if cfg.code_digest != actual:
        raise KdError(f"{key}.code_digest: the code in {cfg.path} is not the code pinned (it hashes to {actual}); "
                      f"read what changed, then pin the new digest")
    return True


def require_safetensors(path: Path, key: str) -> None:
    """Refuse a model directory whose weights are pickles only: loading a pickle can run any code."""
    if any(path.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_WEIGHTS)
    found = f"it has only pickle weights ({', '.join(pickles[:3])})" if pickles else "it has no weights"
    raise KdError(f"{key}: {path}: {found}; kd loads safetensors only (convert them with "
                  f"`transformers` save_pretrained, where you trust the file)")


def teacher_path(params: Params, teacher: str, root: Path) -> Path:
    """The directory of a local teacher, checked to exist (the `teacher` stage builds the embedded one)."""
    cfg = params.teachers[teacher]
    path = under(root, cfg.path)
    if not path.is_dir():
        raise KdError(f"teachers.{teacher}.path: {cfg.path} does not exist (`dvc repro teacher` builds the embedded one)")
    return path


def load_causal_lm(path: Path, cfg: LocalTeacher, key: str, dtype: Any = None) -> tuple[Any, Any]:
    """(model in eval mode on CPU, tokenizer) of a local model directory, safetensors only.

    `key` names the params section (`teachers.<name>`) in errors; `dtype` defaults to the config's (`auto`
    resolved for this machine: kd.runtime.device). Its code runs only when pinned (`trusted_code`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    require_safetensors(path, f"{key}.path")
    if dtype is None:
        dtype = resolve_dtype(cfg.dtype, resolve_device(cfg.device))
    kw = {"revision": cfg.revision, "trust_remote_code": trusted_code(path, cfg, key)}
    tok = AutoTokenizer.from_pretrained(path, **kw)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True, **kw).eval()
    return model, tok


def load_teacher(params: Params, teacher: str, root: Path, dtype: Any = None) -> tuple[Any, Any]:
    """A local teacher's model (eval mode, no gradients) and tokenizer, for online scoring."""
    cfg = params.teachers[teacher]
    model, tok = load_causal_lm(teacher_path(params, teacher, root), cfg, f"teachers.{teacher}", dtype)
    model.requires_grad_(False)
    return model, tok


def describe_init(init: dict[str, Any]) -> str:
    """`from_teacher (teacher smollm2, every 10)`: an `init:` section in words."""
    rest = ", ".join(f"{k} {v}" for k, v in init.items() if k != "kind" and v is not None)
    return f"`{init.get('kind')}` ({rest})" if rest else f"`{init.get('kind')}`"


def model_card(info: ModelInfo) -> str:
    """A README.md naming what made the model: datasets with fingerprints, objective, params, commit, run."""
    datasets = "\n".join(f"| `{d.name}` | `{d.fingerprint}` |" for d in info.datasets)
    logits = info.logits
    metrics = "\n".join(f"| {k} | {v} |" for k, v in sorted(info.metrics.items()))
    env = "".join(line + "\n" for line in environment_lines(info.environment))
    return f"""---
library_name: transformers
tags: [kd, distillation]
---
# {info.name}

Distilled by kd with objective **{info.objective}**, initialised {describe_init(info.init)}.

## Training data
| dataset | fingerprint (sha256 over record ids) |
|---|---|
{datasets}

Teacher logits: {f"`{logits.name}` (fingerprint `{logits.fingerprint}`)" if logits else "none"}

## Provenance
- git commit: `{info.git_commit}`{DIRTY_NOTE if info.git_commit.endswith(DIRTY_SUFFIX) else ''}
- MLflow run: `{info.mlflow.run_id}` (tracking URI `{info.mlflow.tracking_uri}`)
{env}
## Final metrics
| metric | value |
|---|---|
{metrics}

## Params (`{info.section}.{info.name}`)
```json
{json.dumps(info.params, indent=2, sort_keys=True)}
```
"""


def save_model(model: Any, tokenizer: Any, out_dir: Path, info: ModelInfo, card: str | None = None) -> None:
    """Write a model directory atomically: a temporary sibling, then a rename over any old one.

    Args:
        info: written as `kd_model.json`; `card` defaults to `model_card(info)`.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)  # safetensors is the only format transformers 5 writes
        tokenizer.save_pretrained(tmp)
        data = info.model_dump(mode="json", exclude_none=True)
        (tmp / INFO_FILE).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        (tmp / CARD_FILE).write_text(card if card is not None else model_card(info), encoding="utf-8")
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_info(model_dir: Path) -> ModelInfo:
    """The `kd_model.json` of a model directory written by `save_model`.

    Raises:
        KdError: naming the directory when it has none (not built by kd) or it does not parse.
    """
    path = Path(model_dir) / INFO_FILE
    if not path.is_file():
        raise KdError(f"{model_dir}: no {INFO_FILE}; is it a model kd built? (`dvc repro {Path(model_dir).name}`)")
    try:
        return ModelInfo.model_validate_json(path.read_text(encoding="utf-8"))
    except ValidationError as e:
        raise KdError(f"{path}: not a kd model description ({e.errors()[0]['msg']} at "
                      f"{'.'.join(map(str, e.errors()[0]['loc']))})") from None
