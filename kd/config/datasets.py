"""Datasets in params.yaml: one model per knowledge-elicitation method (survey §3.1)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from kd.config.base import Strict, existing_file


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

    _seeds_exist = field_validator("seeds")(lambda v, info: v if v is None else existing_file(v, info))

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

    _template_exists = field_validator("template")(existing_file)


class Evol(Strict):
    templates: list[str] = Field(min_length=1, description="Evol-Instruct operators, one template each")
    count: int = Field(16, ge=0, description="evolved instructions to add")

    @field_validator("templates")
    @classmethod
    def _exist(cls, v: list[str], info: ValidationInfo) -> list[str]:
        return [existing_file(t, info) for t in v]


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

    _files_exist = field_validator("seeds", "template")(existing_file)

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

    _files_exist = field_validator("topics", "attributes", "question_template", "answer_template")(existing_file)


class Feature(Strict):
    """Feature knowledge (survey §3.1.4): the teacher's top-k log-probabilities at every completion token.

    White-box, so the teacher must be `local`. Stored compactly (uint16/int32 ids + float16 log-probs) with
    the teacher's tokenizer hash, so a student with another tokenizer is refused.
    """

    method: Literal["feature"]
    teacher: str = Field(description="a key of `teachers`; must be a local (white-box) teacher")
    dataset: str = Field(description="the dataset whose completions are scored (prompt + completion records)")
    top_k: int = Field(20, ge=1, le=1024, description="log-probabilities kept per token; more = closer to full KD")
    max_length: int = Field(512, ge=8, description="prompt + completion tokens per record; longer are cut")
    batch_size: int = Field(8, ge=1)


Dataset = Annotated[Labeling | Expansion | Curation | Feature, Field(discriminator="method")]
