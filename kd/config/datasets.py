"""Datasets in params.yaml: one model per knowledge-elicitation method (survey §3.1)."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from kd.config.base import Strict, existing_file


class Sampling(Strict):
    temperature: float = Field(0.0, ge=0, le=2, description="0 = greedy; lower = more faithful, less diverse")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling: keep the smallest set of tokens with this "
                                                        "much probability (1 = off)")
    max_tokens: int = Field(256, ge=1, le=131072, description="answer length cap; an answer cut here has "
                                                                 "finish_reason `length`")
    stop: list[str] = Field(default_factory=list, description="strings that end an answer (not included in it)")


class Source(Strict):
    """Where inputs come from: a seed file (field `instruction`) or an upstream dataset (its prompts)."""

    seeds: str | None = Field(None, description="a JSONL seed file, each row with an `instruction`")
    dataset: str | None = Field(None, description="an upstream dataset whose prompts become inputs")
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

    method: Literal["labeling"] = Field(description="the elicitation method")
    inputs: list[Source] = Field(min_length=1, description="seed files and upstream datasets, in order")
    template: str = Field(description="the prompt template (vars: instruction, category)")
    keep_system: bool = Field(True, description="put the template's system message in the student's prompt (Orca)")
    samples: int = Field(1, ge=1, le=64, description="answers per input (sample index is part of the cache key)")
    sampling: Sampling = Field(Sampling(max_tokens=256), description="the teacher's sampling params")

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

    method: Literal["expansion"] = Field(description="the elicitation method")
    seeds: str = Field(description="seed instructions (JSONL, `instruction` per row): demos and the novelty baseline")
    template: str = Field(description="the Self-Instruct template (vars: demos)")
    target: int = Field(32, ge=1, description="new instructions to generate (before Evol)")
    per_round: int = Field(16, ge=1, description="requests per round; later rounds see earlier generations")
    max_rounds: int = Field(8, ge=1, description="stop after this many rounds even below target")
    demos: int = Field(3, ge=1, le=16, description="few-shot demos per request")
    generated_demos: int = Field(1, ge=0, le=16, description="how many of the demos come from earlier generations")
    novelty_threshold: float = Field(0.7, gt=0, le=1, description="reject if ROUGE-L F1 to any kept instruction is above")
    min_words: int = Field(3, ge=1, description="shorter instructions are rejected (`too_short`)")
    max_words: int = Field(80, ge=1, description="longer instructions are rejected (`too_long`)")
    evol: Evol | None = Field(None, description="Evol-Instruct operators applied after the Self-Instruct rounds")
    sampling: Sampling = Field(Sampling(temperature=0.9, top_p=0.95, max_tokens=64),
                               description="the teacher's sampling params (temperature > 0 for variety)")

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

    method: Literal["curation"] = Field(description="the elicitation method")
    topics: str = Field(description="topic seeds (JSONL, `topic` and optional `domain` per row)")
    attributes: str = Field(description="attribute seeds (JSONL, `attribute` per row): audience, style, difficulty")
    count: int = Field(24, ge=1, description="questions to write (distinct topic x attribute pairs)")
    question_template: str = Field(description="writes a question (vars: topic, domain, attribute)")
    answer_template: str = Field(description="answers it (vars: question, topic, domain)")
    question_sampling: Sampling = Field(Sampling(temperature=0.8, top_p=0.95, max_tokens=64),
                                        description="sampling params for the questions")
    answer_sampling: Sampling = Field(Sampling(max_tokens=256), description="sampling params for the answers")

    _files_exist = field_validator("topics", "attributes", "question_template", "answer_template")(existing_file)


class Feature(Strict):
    """Feature knowledge (survey §3.1.4): the teacher's top-k log-probabilities at every completion token.

    White-box: a `local` teacher, or an `openai` one served by vLLM (`prompt_logprobs`) with its `tokenizer`
    directory named. Stored compactly (uint16/int32 ids + float16 log-probs) with
    the teacher's tokenizer hash, so a student with another tokenizer is refused.
    """

    method: Literal["feature"] = Field(description="the elicitation method")
    teacher: str = Field(description="a key of `teachers`: a local one, or an openai one serving prompt log-probs "
                                     "(vLLM) with `tokenizer` set")
    dataset: str = Field(description="the dataset whose completions are scored (prompt + completion records)")
    top_k: int = Field(20, ge=1, le=1024, description="log-probabilities kept per token; more = closer to full KD")
    max_length: int = Field(512, ge=8, description="prompt + completion tokens per record; longer are cut")
    batch_size: int = Field(8, ge=1, description="records per teacher forward pass (local teacher)")


_ASPECT = r"^[a-z][a-z0-9_]*$"


class Judge(Strict):
    """Who scores candidate answers, and how (survey §3.1.5). A closed choice of three kinds:

    `rubric`: the teacher rates each candidate on `aspects` with a template, one line per aspect
    (`helpfulness: 4`), parsed strictly; `pairwise`: the teacher compares two candidates, asked in both orders
    (an inconsistent pair of verdicts is a tie); `likelihood`: white-box, the teacher's mean token
    log-probability of the candidate (needs a local teacher; no template).
    """

    teacher: str = Field(description="a key of `teachers`; `likelihood` needs a local (white-box) one")
    kind: Literal["rubric", "pairwise", "likelihood"] = Field(description="how candidates are scored (see above)")
    template: str | None = Field(None, description="the judge's prompt (rubric, pairwise); none for likelihood")
    aspects: list[str] = Field(["helpfulness", "honesty", "instruction_following"], min_length=1,
                               description="rubric: what each candidate is rated on; its score is the mean")
    low: int = Field(1, description="rubric: the lowest allowed rating (integers only)")
    high: int = Field(5, description="rubric: the highest allowed rating")
    allow_prose: bool = Field(False, description="let the judge reason in lines around its ratings/verdict "
                                                 "(the rating lines themselves stay strict)")
    verdict: Literal["text", "logprob"] = Field(
        "text", description="pairwise: `text` parses the judge's generated answer; `logprob` (white-box, local "
                            "teacher) takes whichever of A, B, tie the teacher is likeliest to begin its answer "
                            "with (one forward pass), so a small judge always gives a verdict")
    sampling: Sampling = Field(Sampling(temperature=0.0, max_tokens=96), description="the judge's sampling params "
                                                                                   "(text verdicts and ratings)")
    max_length: int = Field(1024, ge=8, description="likelihood, logprob: prompt + scored tokens; longer is rejected")
    batch_size: int = Field(8, ge=1, le=4096, description="likelihood: sequences per forward pass")

    _template_exists = field_validator("template")(lambda v, info: v if v is None else existing_file(v, info))

    @field_validator("aspects")
    @classmethod
    def _aspects(cls, v: list[str]) -> list[str]:
        for a in v:
            if not re.match(_ASPECT, a):
                raise ValueError(f"aspect '{a}': use lower-case letters, digits and _ (it is a line label)")
        if len(set(v)) != len(v):
            raise ValueError(f"aspects repeat a name: {v}")
        return v

    @model_validator(mode="after")
    def _kind_needs(self) -> Judge:
        if self.kind == "likelihood" and self.template is not None:
            raise ValueError("kind: likelihood scores log-probabilities and uses no template; remove `template` "
                             "or choose kind rubric/pairwise")
        if self.kind != "likelihood" and self.template is None:
            raise ValueError(f"kind: {self.kind} needs a `template` (e.g. prompts/feedback/{self.kind}.jinja)")
        if self.verdict == "logprob" and self.kind != "pairwise":
            raise ValueError(f"verdict: logprob reads a pairwise verdict (A/B/tie); kind {self.kind} has none")
        if self.verdict == "logprob" and self.allow_prose:
            raise ValueError("verdict: logprob scores the bare answers A, B, tie; allow_prose needs verdict: text")
        if self.kind != "rubric" and {"aspects", "low", "high"} & self.model_fields_set:
            raise ValueError(f"aspects/low/high are for kind: rubric, not kind: {self.kind}")
        if self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        return self


def _sampling_draws(s: Sampling) -> Sampling:
    if s.temperature <= 0:
        raise ValueError("sampling.temperature must be > 0: candidates drawn greedily would all be the same")
    return s


class Feedback(Strict):
    """Feedback (survey §3.1.5): a generator samples candidates, a judge ranks them -> preference pairs.

    Output records are TRL-DPO shaped (`prompt`, `chosen`, `rejected`, conversational) with `score_chosen`,
    `score_rejected`, the judge's `rationale`, and `candidates` (the ranked list, for RRHF/PRO). The pair is
    the best- and worst-scored distinct candidates; a tie between them is a rejection (`tie`). Candidates come
    from the request cache, so editing the judge template reruns only the judge's requests.
    """

    method: Literal["feedback"] = Field(description="the elicitation method")
    generator: str = Field(description="a key of `teachers` that samples the candidates; usually a local entry "
                                       "whose path is a student directory (models/<student>)")
    inputs: list[Source] = Field(min_length=1, description="seed files and upstream datasets, in order")
    template: str = Field(description="renders the generator's prompt (vars: instruction, category); the "
                                      "records' `prompt` is what it rendered")
    keep_system: bool = Field(True, description="keep the template's system message in the records' prompt")
    candidates: int = Field(4, ge=2, le=32, description="answers sampled per prompt (sample index = candidate number)")
    sampling: Sampling = Field(Sampling(temperature=0.8, top_p=0.95, max_tokens=128),
                               description="the generator's; temperature > 0 so candidates differ")
    judge: Judge = Field(description="who scores the candidates")
    allow_truncated: bool = Field(False, description="keep candidates cut off at max_tokens (finish_reason=length)")

    _template_exists = field_validator("template")(existing_file)
    _draws = field_validator("sampling")(_sampling_draws)


class SelfKnowledge(Strict):
    """Self-knowledge (survey §3.1.6): the student samples K answers per prompt and keeps some by a filter.

    `self_consistency` keeps the samples whose final answer is the majority answer (LMSI); `reward_threshold`
    keeps samples scored >= `threshold` by the teacher's likelihood `judge` or by a `reward_model` (ReST's
    grow/improve); `self_judge` has the student rate its own samples with a rubric `judge` and keeps those
    >= `threshold` (Self-Rewarding). The kept prompt/completion records train the next round. Each round is its
    own dataset and DVC stage: round 2's `generator` is a teacher entry pointing at the student trained on
    round 1's dataset, and its `round: 2`, so rebuilding round 2 leaves round 1 untouched.
    """

    method: Literal["self_knowledge"] = Field(description="the elicitation method")
    generator: str = Field(description="a key of `teachers`: a local entry whose path is the student directory")
    round: int = Field(1, ge=1, description="which self-improvement round this dataset is (recorded in provenance)")
    inputs: list[Source] = Field(min_length=1, description="seed files and upstream datasets, in order")
    template: str = Field(description="renders the student's prompt (vars: instruction, category)")
    keep_system: bool = Field(True, description="keep the template's system message in the records' prompt")
    samples: int = Field(8, ge=2, le=64, description="K answers per prompt (sample index = sample number)")
    sampling: Sampling = Field(Sampling(temperature=0.8, top_p=0.95, max_tokens=128),
                               description="temperature > 0 so the K samples differ")
    filter: Literal["self_consistency", "reward_threshold", "self_judge"] = Field(
        description="which samples are kept (see above)")
    answer: Literal["last_number", "last_line"] = Field(
        "last_number", description="self_consistency: how a final answer is read (see kd.elicit.self_knowledge)")
    min_share: float = Field(0.5, gt=0, le=1, description="self_consistency: keep a prompt only if its majority "
                                                          "answer has at least this share of the K votes")
    judge: Judge | None = Field(None, description="reward_threshold: a likelihood judge; self_judge: a rubric judge "
                                                  "whose teacher is the generator itself")
    reward_model: str | None = Field(None, description="reward_threshold: a reward model directory (models/<rm>) "
                                                       "scored as a 1-label sequence classifier")
    threshold: float | None = Field(None, description="reward_threshold/self_judge: keep samples scoring >= this")
    allow_truncated: bool = Field(False, description="keep samples cut off at max_tokens (finish_reason=length)")

    _template_exists = field_validator("template")(existing_file)
    _draws = field_validator("sampling")(_sampling_draws)

    @model_validator(mode="after")
    def _filter_needs(self) -> SelfKnowledge:
        has = {"judge": self.judge is not None, "reward_model": self.reward_model is not None,
               "threshold": self.threshold is not None}
        match self.filter:
            case "self_consistency":
                if extra := [k for k, v in has.items() if v]:
                    raise ValueError(f"filter: self_consistency votes on answers; remove {', '.join(extra)}")
            case "reward_threshold":
                if has["judge"] == has["reward_model"]:
                    raise ValueError("filter: reward_threshold needs exactly one of `judge` (kind: likelihood) "
                                     "or `reward_model` (a model directory)")
                if self.judge is not None and self.judge.kind != "likelihood":
                    raise ValueError(f"filter: reward_threshold scores with a likelihood judge, not kind: "
                                     f"{self.judge.kind} (self_judge is the rubric filter)")
                if not has["threshold"]:
                    raise ValueError("filter: reward_threshold needs a `threshold`")
            case "self_judge":
                if self.judge is None or self.judge.kind != "rubric" or self.reward_model is not None:
                    raise ValueError("filter: self_judge needs a `judge` of kind: rubric (and no reward_model)")
                if not has["threshold"]:
                    raise ValueError("filter: self_judge needs a `threshold` (a mean rubric rating)")
        if self.filter != "self_consistency" and (extra := {"min_share", "answer"} & self.model_fields_set):
            raise ValueError(f"{', '.join(sorted(extra))}: for filter: self_consistency, not {self.filter}")
        return self


Dataset = Annotated[Labeling | Expansion | Curation | Feature | Feedback | SelfKnowledge, Field(discriminator="method")]
