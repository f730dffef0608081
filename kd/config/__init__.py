"""pydantic models of params.yaml: strict, closed choices, one clear line per mistake (STYLE.md §3-4)."""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, model_validator

from kd.config.base import Name, Strict
from kd.config.datasets import (
    Curation,
    Dataset,
    Evol,
    Expansion,
    Feature,
    Feedback,
    Judge,
    Labeling,
    Sampling,
    SelfKnowledge,
    Source,
)
from kd.config.errors import format_errors, key_path, one_line
from kd.config.students import RL, Evaluation, FromConfig, FromTeacher, Rank, RewardModel, Student
from kd.config.teachers import EmbeddedTeacher, LocalTeacher, OpenAITeacher, Price, Teacher, billed_price
from kd.config.yamlfile import read_params_yaml
from kd.errors import KdError
from kd.secrets import is_secret_key, looks_secret, redact, why_refused

__all__ = ["Curation", "Dataset", "EmbeddedTeacher", "Evaluation", "Evol", "Expansion", "Feature", "Feedback",
           "Judge", "Labeling", "LocalTeacher", "RL", "Rank", "RewardModel", "SelfKnowledge", "Student",
           "OpenAITeacher", "Params", "Price", "Sampling", "Source", "Strict", "Teacher", "Tracking", "billed_price", "dataset_config",
           "dataset_inputs",
           "dataset_teachers", "load_params", "PARAMS_STAGE", "STAGE_NAMES"]

PARAMS_STAGE = "params"  # the DVC stage that validates params.yaml before any other stage runs (kd.pipeline.spec)
STAGE_NAMES = (PARAMS_STAGE, "teacher", "evaluate")  # stages of their own: no dataset or model may take the name



class Tracking(Strict):
    """What the training stages give MLflow beyond params, metrics and dataset inputs."""

    log_models: bool = Field(True, description="log each trained model's directory (weights, tokenizer, "
                             "kd_model.json, card) as artifacts of its run; costs a copy of the weights in the "
                             "artifact store per training run (~0.3-0.6 GB for a 135M student), so turn it off for "
                             "big models you keep in DVC only")
    register_models: bool = Field(False, description="register each logged model in the MLflow model registry "
                                  "under its name, with tags for its dataset fingerprints, git commit and kd "
                                  "version; needs log_models")

    @model_validator(mode="after")
    def _registers_what_it_logs(self) -> Tracking:
        if self.register_models and not self.log_models:
            raise ValueError("tracking.register_models: true needs tracking.log_models: true (a registered "
                             "version points at the logged model files)")
        return self


class Params(Strict):
    """The whole params.yaml."""

    project: str = Field("kd", pattern=r"^[A-Za-z0-9_.-]+$", description="the MLflow experiment the runs go to")
    embedded_teacher: EmbeddedTeacher = Field(EmbeddedTeacher(), description="the `teacher` stage: a GGUF on PyPI "
                                              "made a local model directory")
    teachers: dict[Name, Teacher] = Field(min_length=1, description="who answers: local models and OpenAI-compatible "
                                                                  "servers, by name")
    datasets: dict[Name, Dataset] = Field(default_factory=dict, description="one DVC stage each; `method` chooses "
                                                                          "the elicitation method")
    students: dict[Name, Student] = Field(default_factory=dict, description="one DVC stage each: init + objective "
                                                                          "-> models/<name>")
    reward_models: dict[Name, RewardModel] = Field(default_factory=dict, description="Bradley-Terry reward models, "
                                                                                  "one DVC stage each")
    evaluation: Evaluation | None = Field(None, description="the held-out comparison (the `evaluate` stage)")
    tracking: Tracking = Field(Tracking(), description="MLflow: model artifacts and registry")

    @model_validator(mode="before")
    @classmethod
    def _no_secrets(cls, data: Any) -> Any:
        for path, key, value in _walk(data, ()):
            where = redact(key_path(path))  # a key typed as a mapping key is a key too
            if isinstance(key, str) and (is_secret_key(key) and value not in (None, "") or looks_secret(key)):
                raise KdError(one_line(f"params.yaml: {where}: {why_refused(key, '')}"))
            if isinstance(value, str) and looks_secret(value):
                raise KdError(one_line(f"params.yaml: {where}: {why_refused(str(key), value)}"))
        return data

    @model_validator(mode="after")
    def _references(self) -> Params:
        stage_of: dict[str, str] = {}  # each dataset, student and reward model is the DVC stage of its name
        for section in ("datasets", "students", "reward_models"):
            for name in getattr(self, section):
                if name in STAGE_NAMES:
                    raise ValueError(f"{section}.{name}: '{name}' names a stage of its own in dvc.yaml; choose "
                                     f"another name (reserved: {', '.join(STAGE_NAMES)})")
                if name in stage_of and (stage_of[name], section) != ("students", "reward_models"):
                    raise ValueError(f"{section}.{name}: {stage_of[name]}.{name} has the same name; both would be "
                                     f"the DVC stage '{name}'")
                stage_of[name] = section
        for name, ds in self.datasets.items():
            for key, teacher in dataset_teachers(ds).items():
                if teacher not in self.teachers:
                    raise ValueError(f"datasets.{name}.{key}: unknown teacher '{teacher}' "
                                     f"(declared: {', '.join(self.teachers)})")
            judge = ds.judge if isinstance(ds, Feedback | SelfKnowledge) else None
            if judge is not None and (judge.kind == "likelihood" or judge.verdict == "logprob"):
                self._local_teacher(f"datasets.{name}.judge.teacher", judge.teacher)
            if ds.method == "self_knowledge" and ds.filter == "self_judge" and judge.teacher != ds.generator:
                raise ValueError(f"datasets.{name}.judge.teacher: filter self_judge means the generator judges its "
                                 f"own samples, so it must be '{ds.generator}', not '{judge.teacher}' "
                                 f"(a teacher judging is reward_threshold or a feedback dataset)")
            for i, src in enumerate(dataset_inputs(ds)):
                if src.dataset is not None and src.dataset not in self.datasets:
                    raise ValueError(f"datasets.{name}.inputs.{i}.dataset: unknown dataset '{src.dataset}' "
                                     f"(declared: {', '.join(self.datasets)})")
            if ds.method == "feature":
                self._feature_teacher(f"datasets.{name}.teacher", ds.teacher)
                self._dataset(f"datasets.{name}.dataset", ds.dataset)
        for name in self.datasets:
            _check_acyclic(self, name, ())
        for name, st in self.students.items():
            wants = {"dpo": "feedback", "rrhf": "feedback", "pro": "feedback"}.get(st.objective)
            for i, d in enumerate(st.datasets):
                self._dataset(f"students.{name}.datasets.{i}", d)
                method = self.datasets[d].method
                if wants and method != wants:
                    raise ValueError(f"students.{name}.datasets.{i}: objective {st.objective} trains on preference "
                                     f"(feedback) datasets; '{d}' is a {method} dataset")
                if not wants and method in ("feedback", "feature"):
                    raise ValueError(f"students.{name}.datasets.{i}: '{d}' is a {method} dataset, which has no "
                                     f"completions to train objective {st.objective} on")
            if st.rl is not None and st.rl.reward_model is not None:
                self._reward_model(f"students.{name}.rl.reward_model", st.rl.reward_model)
            if st.logits is not None:
                self._dataset(f"students.{name}.logits", st.logits)
                if self.datasets[st.logits].method != "feature":
                    raise ValueError(f"students.{name}.logits: '{st.logits}' is a {self.datasets[st.logits].method} "
                                     f"dataset, not a feature (logits) dataset")
            if isinstance(st.init, FromTeacher | FromConfig):
                self._local_teacher(f"students.{name}.init.teacher", st.init.teacher)
            for section, part in (("on_policy", st.on_policy), ("hidden", st.hidden), ("rl", st.rl)):
                if part is not None and part.teacher is not None:
                    self._local_teacher(f"students.{name}.{section}.teacher", part.teacher)
        for name, rm in self.reward_models.items():
            if name in self.students:
                raise ValueError(f"reward_models.{name}: a student has the same name; both would write models/{name}")
            for i, d in enumerate(rm.datasets):
                self._dataset(f"reward_models.{name}.datasets.{i}", d)
                if self.datasets[d].method != "feedback":
                    raise ValueError(f"reward_models.{name}.datasets.{i}: '{d}' is a {self.datasets[d].method} "
                                     f"dataset; a reward model trains on preference (feedback) datasets")
            if isinstance(rm.init, FromTeacher | FromConfig):
                self._local_teacher(f"reward_models.{name}.init.teacher", rm.init.teacher)
        if self.evaluation:
            self._local_teacher("evaluation.teacher", self.evaluation.teacher)
            for i, s in enumerate(self.evaluation.students + [self.evaluation.baseline or self.evaluation.students[0]]):
                if s not in self.students:
                    raise ValueError(f"evaluation.students.{i}: unknown student '{s}' "
                                     f"(declared: {', '.join(self.students) or 'none'})")
            ev = self.evaluation
            if ev.reward_model is not None:
                self._reward_model("evaluation.reward_model", ev.reward_model)
            if ev.judge is not None and ev.judge.teacher not in self.teachers:
                raise ValueError(f"evaluation.judge.teacher: unknown teacher '{ev.judge.teacher}' "
                                 f"(declared: {', '.join(self.teachers)})")
            if ev.judge is not None and ev.judge.verdict == "logprob":
                self._local_teacher("evaluation.judge.teacher", ev.judge.teacher)
            if ev.against is not None and ev.against not in self.students:
                raise ValueError(f"evaluation.against: unknown student '{ev.against}' "
                                 f"(declared: {', '.join(self.students) or 'none'})")
            for i, c in enumerate(ev.compare):
                for side, names in (("a", c.a), ("b", c.b)):
                    for name in names:
                        if name not in ev.students:
                            raise ValueError(f"evaluation.compare.{i}.{side}: '{name}' is not in evaluation.students "
                                             f"({', '.join(ev.students)}), so it has no answers to compare")
        return self

    def _dataset(self, key: str, name: str) -> None:
        if name not in self.datasets:
            raise ValueError(f"{key}: unknown dataset '{name}' (declared: {', '.join(self.datasets) or 'none'})")

    def _reward_model(self, key: str, name: str) -> None:
        if name not in self.reward_models:
            raise ValueError(f"{key}: unknown reward model '{name}' "
                             f"(declared in reward_models: {', '.join(self.reward_models) or 'none'})")

    def _feature_teacher(self, key: str, name: str) -> None:
        """A local teacher, or a server returning prompt log-probs (vLLM) whose tokenizer kd has locally."""
        if name not in self.teachers:
            raise ValueError(f"{key}: unknown teacher '{name}' (declared: {', '.join(self.teachers)})")
        t = self.teachers[name]
        if t.backend == "openai" and t.tokenizer is None:
            raise ValueError(f"teachers.{name}.tokenizer: {key} scores with this server, so name the directory of "
                             f"the tokenizer it runs (kd sends its own token ids and checks students against it)")

    def _local_teacher(self, key: str, name: str) -> None:
        if name not in self.teachers:
            raise ValueError(f"{key}: unknown teacher '{name}' (declared: {', '.join(self.teachers)})")
        if self.teachers[name].backend != "local":
            raise ValueError(f"{key}: '{name}' is an {self.teachers[name].backend} teacher; this needs a local "
                             f"(white-box) one whose weights kd can run")


def dataset_teachers(ds: Any) -> dict[str, str]:
    """The teacher keys a dataset asks, by the params key that names them (e.g. {"judge.teacher": "smollm2"})."""
    if ds.method in ("feedback", "self_knowledge"):
        judge = {"judge.teacher": ds.judge.teacher} if ds.judge is not None else {}
        return {"generator": ds.generator, **judge}
    return {"teacher": ds.teacher}


def dataset_inputs(ds: Any) -> list[Source]:
    """The `inputs:` of a dataset whose method reads seed files or upstream datasets (none for the others)."""
    return ds.inputs if isinstance(ds, Labeling | Feedback | SelfKnowledge) else []


def _check_acyclic(params: Params, name: str, chain: tuple[str, ...]) -> None:
    if name in chain:
        raise ValueError(f"datasets.{chain[0]}: cycle {' -> '.join(chain + (name,))}")
    ds = params.datasets[name]
    upstream = [s.dataset for s in dataset_inputs(ds) if s.dataset] + ([ds.dataset] if ds.method == "feature" else [])
    for up in upstream:
        _check_acyclic(params, up, chain + (name,))


def _walk(data: Any, path: tuple) -> typing.Iterator[tuple[tuple, Any, Any]]:
    if isinstance(data, dict):
        for k, v in data.items():
            yield path + (k,), k, v
            yield from _walk(v, path + (k,))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            yield path + (i,), i, v
            yield from _walk(v, path + (i,))


def load_params(root: Path | str = ".", file: str = "params.yaml") -> Params:
    """Read and validate params.yaml; every mistake becomes a KdError naming the key and what is allowed."""
    root = Path(root)
    path = root / file
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KdError(f"{file}: not found in {root.resolve()}") from None
    except UnicodeDecodeError as e:
        raise KdError(f"{file}: not UTF-8 text ({e.reason})") from None
    data = read_params_yaml(text, file)
    if not isinstance(data, dict):
        raise KdError(f"{file}: expected a mapping of keys at the top level")
    try:
        return Params.model_validate(data, context={"root": root})
    except ValidationError as e:
        raise KdError(format_errors(e, data, Params, file)) from None


def dataset_config(params: Params, name: str, method: str) -> Any:
    """The `datasets.<name>` section, checked to be of the stage's method."""
    ds = params.datasets.get(name)
    if ds is None:
        raise KdError(f"params.yaml: {key_path(('datasets', name))}: not declared "
                      f"(declared: {', '.join(params.datasets) or 'none'})")
    if ds.method != method:
        raise KdError(f"params.yaml: datasets.{name}.method is '{ds.method}', but this is the {method} stage")
    return ds
