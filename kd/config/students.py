"""Students and evaluation in params.yaml: distillation (survey §3.2) as closed choices."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from kd.config.base import Strict
from kd.config.datasets import Judge


class FromTeacher(Strict):
    """Keep a subset of a local teacher's layers, sharing its tokenizer (DistilBERT / Minitron style)."""

    kind: Literal["from_teacher"] = Field(description="how the model is initialised")
    teacher: str = Field(description="a local teacher (key of `teachers`)")
    every: int = Field(2, ge=1, description="keep every k-th layer (the first and last always kept)")
    layers: list[int] | None = Field(None, description="explicit layer indices to keep (overrides `every`)")


class FromConfig(Strict):
    """A fresh llama-style architecture using a teacher's tokenizer."""

    kind: Literal["from_config"] = Field(description="how the model is initialised")
    teacher: str = Field(description="the teacher whose tokenizer (and vocabulary) the student uses")
    hidden_size: int = Field(256, ge=8, description="width of the residual stream")
    num_layers: int = Field(4, ge=1, description="transformer blocks")
    num_heads: int = Field(4, ge=1, description="attention heads")
    num_kv_heads: int = Field(2, ge=1, description="key/value heads (grouped-query attention)")
    intermediate_size: int = Field(768, ge=8, description="width of the MLP")

    @model_validator(mode="after")
    def _heads(self) -> FromConfig:
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must divide by num_heads ({self.num_heads}), "
                             f"and num_heads by num_kv_heads ({self.num_kv_heads})")
        return self


class FromPretrained(Strict):
    """A local model directory (or a hub id when online)."""

    kind: Literal["from_pretrained"] = Field(description="how the model is initialised")
    path: str = Field(description="a local model directory (e.g. models/<sft student>), or a hub id when online")
    revision: str | None = Field(None, description="a pinned revision (commit) of the model")
    trust_remote_code: bool = Field(False, description="run Python code shipped with the model; needs `revision` "
                                                       "(hub id) or `code_digest` (local directory)")
    code_digest: str | None = Field(None, pattern=r"^[0-9a-f]{64}$",
                                    description="sha256 of a local directory's code, required by trust_remote_code "
                                                "there (read the code, then copy in the digest the error prints)")

    @model_validator(mode="after")
    def _remote_code_needs_pin(self) -> FromPretrained:
        if self.trust_remote_code and not (self.revision or self.code_digest):
            raise ValueError("trust_remote_code: true needs a pinned `revision` (hub id) or `code_digest` (local "
                             "directory) next to it")
        return self


Init = Annotated[FromTeacher | FromConfig | FromPretrained, Field(discriminator="kind")]


class Divergence(Strict):
    """Token-level divergence to the teacher's stored top-k distribution (objective `kd`)."""

    divergence: Literal["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"] = Field(
        "forward_kl", description="forward_kl = KL(teacher‖student), mode-covering; reverse_kl = KL(student‖teacher), "
                              "mode-seeking; jsd (with beta); skew_forward_kl / skew_reverse_kl (DistiLLM, with "
                              "alpha); tvd = total variation")
    beta: float = Field(0.5, ge=0, le=1, description="JSD mixture weight: 0 -> forward KL, 1 -> reverse KL")
    alpha: float = Field(0.1, ge=0, lt=1, description="skew KLs: the share of the first distribution mixed into the "
                                                      "second (0 = plain KL; DistiLLM uses 0.1)")
    temperature: float = Field(1.0, gt=0, description="both sides are softmax(logits / T) restricted to the teacher's "
                                                      "top-k + one tail bucket (the logits dataset stores the "
                                                      "teacher's tail at each T its students use); KL-type losses "
                                                      "are scaled by T², TVD is not")
    ce_weight: float = Field(0.0, ge=0, le=1, description="w in the per-token loss w·CE + (1 − w)·divergence, CE on "
                                                          "the teacher's tokens: 0.5 is ½ CE + ½ divergence")


class OnPolicy(Strict):
    """The student generates, the teacher scores its tokens online (GKD / MiniLLM)."""

    teacher: str = Field(description="a local teacher, run online")
    lmbda: float = Field(0.5, ge=0, le=1, description="fraction of batches on student-generated outputs")
    beta: float = Field(0.5, ge=0, le=1, description="generalised JSD: 0 = forward KL, 1 = reverse KL")
    temperature: float = Field(1.0, gt=0, description="the student's sampling temperature for its own outputs")
    max_new_tokens: int = Field(64, ge=1, description="length of the student's sampled outputs")


class Hidden(Strict):
    """Hidden-state similarity for declared (student layer, teacher layer) pairs, added to any objective."""

    teacher: str = Field(description="a local teacher, run online for its hidden states")
    pairs: list[tuple[int, int]] = Field(min_length=1, description="[student_layer, teacher_layer] pairs")
    loss: Literal["l2", "cosine"] = Field("cosine", description="l2: mean squared error; cosine: 1 − cosine similarity")
    weight: float = Field(1.0, ge=0, description="weight of this term added to the objective's loss")

    @field_validator("pairs", mode="before")
    @classmethod
    def _pairs_from_yaml(cls, value: Any) -> Any:  # YAML has lists, not tuples; strict mode refuses lists as tuples
        return [tuple(p) if isinstance(p, list) else p for p in value] if isinstance(value, list) else value


class Rank(Strict):
    """Rank optimisation on a feedback dataset (objectives dpo, rrhf, pro; survey §3.2.4).

    The student starts from an SFT student (`init: {kind: from_pretrained, path: models/<sft student>}`); DPO's
    frozen reference is that same initialisation, loaded again from disk.
    """

    beta: float = Field(0.1, gt=0, description="dpo: strength of the implicit KL to the reference policy")
    loss_type: Literal["sigmoid", "ipo", "hinge"] = Field("sigmoid", description="dpo: the DPO loss variant (TRL)")
    rank_weight: float = Field(1.0, ge=0, description="rrhf: weight of the ranking hinge against the SFT term")
    score_weighted: bool = Field(True, description="pro: weight each ranking term by the score gaps "
                                                   "(PRO's dynamic temperature)")
    length_normalise: bool = Field(True, description="rrhf/pro: rank mean token log-probabilities (as the papers)")


class RL(Strict):
    """Online RL from a distilled reward (objectives grpo, rloo; survey §3.2.3): the student samples
    `num_generations` completions per prompt, a reward scores them, and a KL penalty (`beta`) holds the policy
    near the reference (the initialisation, loaded again from disk)."""

    reward_model: str | None = Field(None, description="a key of `reward_models` (a distilled Bradley-Terry RM)")
    teacher: str | None = Field(None, description="a local teacher whose mean token log-probability is the reward")
    num_generations: int = Field(4, ge=2, description="completions per prompt (the group of GRPO / RLOO)")
    max_new_tokens: int = Field(64, ge=1, description="length of each sampled completion")
    temperature: float = Field(1.0, gt=0, description="sampling temperature of the completions")
    beta: float = Field(0.04, ge=0, description="KL penalty to the reference policy (0 = none, no reference loaded)")

    @model_validator(mode="after")
    def _one_reward(self) -> RL:
        if (self.reward_model is None) == (self.teacher is None):
            raise ValueError("give exactly one reward: `reward_model` (a key of reward_models) or `teacher` "
                             "(a local teacher's likelihood)")
        return self


class Training(Strict):
    epochs: float = Field(1.0, gt=0, description="passes over the data (fractions allowed)")
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimiser steps")
    lr: float = Field(5e-4, gt=0, description="peak learning rate (AdamW; linear warmup, then linear decay to 0)")
    batch_size: int = Field(8, ge=1, description="examples per forward pass")
    grad_accum: int = Field(1, ge=1, description="forward passes per optimiser step (effective batch = batch_size × "
                                                 "grad_accum)")
    max_length: int = Field(512, ge=8, description="prompt + completion tokens per example; longer completions are cut")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="fraction of the steps spent warming the learning rate up")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    seed: int = Field(0, description="which records `subsample` draws, the random init (from_config), data order "
                                     "and sampling; same seed, same model (on CPU)")
    subsample: int | None = Field(None, ge=1, description="train on this many of the datasets' records, drawn by "
                                                          "`seed` (null: all of them)")
    checkpoint_every: int = Field(20, ge=1, description="optimiser steps between resumable checkpoints")
    log_every: int = Field(1, ge=1, description="optimiser steps between metrics sent to MLflow (sft/on_policy: also in plots)")
    device: str = Field("auto", pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$", description="auto = cuda when present")
    processes: int = Field(1, ge=1, description="training processes (`accelerate launch --num_processes`, one per GPU); "
                                                "global batch = batch_size × grad_accum × processes")
    accelerate_config: str | None = Field(
        None, pattern=r"^[^/].*\.ya?ml$",
        description="an accelerate config file for `accelerate launch --config_file` (e.g. profiles/accelerate/"
                    "fsdp.yaml, deepspeed_zero2.yaml): shards a model too large for one device; TRL objectives only, "
                    "with processes > 1")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="precision of the forward and backward passes: bfloat16 / float16 run them under "
                               "autocast while the weights and optimizer state stay float32 (float16 with loss "
                               "scaling); the trained model is saved in this dtype")
    freeze_layers: int = Field(0, ge=0, description="freeze the input embeddings (and an LM head tied to them) and "
                                                    "this many bottom transformer layers: faster steps, and a "
                                                    "from_teacher student keeps the teacher's own lower layers")


class Student(Strict):
    init: Init = Field(description="where the student starts: from_teacher | from_config | from_pretrained")
    objective: Literal["sft", "kd", "on_policy", "dpo", "rrhf", "pro", "grpo", "rloo"] = Field(
        description="sft (TRL SFTTrainer) | kd (stored teacher logits) | on_policy (TRL GKD) | dpo | rrhf | pro "
                    "(feedback data) | grpo | rloo (RL from a reward)")
    datasets: list[str] = Field(min_length=1, description="datasets to train on: prompt + completion (sft, kd, "
                                                          "on_policy), feedback (dpo, rrhf, pro), any (grpo, rloo: "
                                                          "prompts only)")
    logits: str | None = Field(None, description="a `feature` dataset of teacher top-k logits (objective kd)")
    kd: Divergence = Field(Divergence(), description="objective kd: the divergence to the stored teacher logits")
    on_policy: OnPolicy | None = Field(None, description="objective on_policy: the online teacher and GKD's knobs")
    hidden: Hidden | None = Field(None, description="an added hidden-state similarity term (objectives sft, kd)")
    rank: Rank = Field(Rank(), description="objectives dpo, rrhf, pro")
    rl: RL | None = Field(None, description="objectives grpo, rloo: the reward and the group size")
    training: Training = Field(Training(), description="optimiser, schedule, lengths, seed, checkpoints")
    loop: Literal["trl", "kd"] = Field("trl", description="objective sft: TRL's SFTTrainer, or kd's own loop, the one "
                                                          "objective kd runs (same data order, schedule and steps, so "
                                                          "an SFT and a KD student differ only in their loss)")

    @model_validator(mode="after")
    def _objective_needs(self) -> Student:
        if "loop" in self.model_fields_set and self.objective != "sft":
            raise ValueError(f"`loop` chooses how objective sft trains; objective {self.objective} has one loop")
        if self.objective == "kd" and not self.logits:
            raise ValueError("objective: kd needs `logits` (a feature dataset of teacher top-k log-probabilities)")
        if self.objective == "on_policy" and self.on_policy is None:
            raise ValueError("objective: on_policy needs an `on_policy` section (teacher, lmbda, beta)")
        if self.objective in ("grpo", "rloo") and self.rl is None:
            raise ValueError(f"objective: {self.objective} needs an `rl` section (reward_model or teacher, "
                             f"num_generations, beta)")
        if self.objective not in ("grpo", "rloo") and self.rl is not None:
            raise ValueError(f"`rl` is for objectives grpo and rloo, not {self.objective}")
        if self.objective not in ("dpo", "rrhf", "pro") and "rank" in self.model_fields_set:
            raise ValueError(f"`rank` is for objectives dpo, rrhf and pro, not {self.objective}")
        if self.objective not in ("sft", "kd") and self.hidden is not None:
            raise ValueError(f"`hidden` combines with objective sft or kd only, not {self.objective}")
        if self.objective == "on_policy" and self.hidden is not None:
            raise ValueError("`hidden` cannot be combined with objective: on_policy (TRL's GKDTrainer has no hook "
                             "for an extra loss term); use it with objective sft or kd")
        if self.training.accelerate_config is not None:
            if self.objective in ("kd", "rrhf", "pro") or (self.objective == "sft" and (self.loop == "kd" or self.hidden)):
                raise ValueError(f"training.accelerate_config: objective {self.objective} runs kd's own loop, which "
                                 f"spreads over `processes` as data parallel (gradients all-reduced); FSDP and "
                                 f"DeepSpeed configs apply to the TRL objectives (sft, dpo, on_policy, grpo, rloo)")
            if self.training.processes == 1:
                raise ValueError("training.accelerate_config: needs training.processes > 1 (its stage runs "
                                 "`python` otherwise, and the config would be ignored)")
        return self


def logits_readers(students: Mapping[str, Student], logits: str) -> list[str]:
    """The students that train on feature dataset `logits` (objective kd), in params order."""
    return [n for n, s in students.items() if s.objective == "kd" and s.logits == logits]


def tail_temperatures(students: Mapping[str, Student], logits: str) -> tuple[float, ...]:
    """The temperatures other than 1 at which feature dataset `logits` must store the teacher's tail, sorted:
    one per distinct `kd.temperature` of the students reading it. The tail at T needs the full logits, so the
    feature stage computes it then (kd.distill.losses); T = 1's tail is always stored."""
    return tuple(sorted({students[n].kd.temperature for n in logits_readers(students, logits)} - {1.0}))


class RewardModel(Strict):
    """A Bradley-Terry reward model distilled from feedback datasets (TRL RewardTrainer): a one-label sequence
    classifier initialised from a student (usually `from_pretrained: models/<sft student>`)."""

    init: Init = Field(description="the body: usually from_pretrained an SFT student; a new seeded score head")
    datasets: list[str] = Field(min_length=1, description="feedback datasets (prompt, chosen, rejected, candidates)")
    pairs: Literal["best_worst", "all"] = Field("all", description="best_worst: each record's chosen/rejected pair; "
                                                                   "all: every differently-scored candidate pair")
    held_out: float = Field(0.25, gt=0, lt=1, description="fraction of prompts (by record id) held out for the "
                                                         "pair accuracy in metrics; never trained on")
    training: Training = Field(Training(), description="optimiser, schedule, lengths, seed, checkpoints")

    @model_validator(mode="after")
    def _one_process(self) -> RewardModel:
        if self.training.processes != 1 or self.training.accelerate_config:  # its stage runs `python`: a no-op
            raise ValueError("training.processes: reward models train in one process (students can take several)")
        return self


class Compare(Strict):
    """A paired comparison of two students (or two groups of students, e.g. one per seed) on the same prompts."""

    a: list[str] = Field(min_length=1, description="the reference side: one student, or one per seed")
    b: list[str] = Field(min_length=1, description="the other side: one student, or one per seed")
    claim: str = Field(description="what the report states when b beats a on KL with a 95% interval that excludes 0 "
                                   "(e.g. `soft targets help`); otherwise it says the data do not show it")

    @field_validator("a", "b", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


class Evaluation(Strict):
    """Held-out comparison of the teacher, a context-free baseline, the untrained baseline and every student."""

    prompts: str = Field("seeds/eval_prompts.jsonl", description="held-out prompts no generation stage reads")
    template: str | None = Field(None, description="ask the prompts with this template's system message, as the "
                                                   "students were trained (vars: instruction, category); null: the "
                                                   "bare instruction")
    teacher: str = Field(description="a local teacher: generates references and scores likelihoods")
    students: list[str] = Field(min_length=1, description="the students to evaluate (keys of `students`)")
    baseline: str | None = Field(None, description="student whose untrained initialisation is the baseline "
                                                   "(default: the first of `students`)")
    max_new_tokens: int = Field(128, ge=1, description="answer length cap for every model (greedy decoding)")
    batch_size: int = Field(8, ge=1, description="prompts per generate() and forward pass")
    reward_model: str | None = Field(None, description="a key of `reward_models`: report its held-out pair "
                                                       "accuracy and every model's mean reward")
    judge: Judge | None = Field(None, description="a pairwise judge (kind: pairwise): each student's win rate "
                                                  "against `against`, asked in both orders")
    against: str | None = Field(None, description="the student the win rate is against (default: the untrained "
                                                  "baseline)")
    compare: list[Compare] = Field(default_factory=list, description="paired comparisons with bootstrap intervals, "
                                                                     "e.g. SFT against forward-KL KD")

    @model_validator(mode="after")
    def _pairwise(self) -> Evaluation:
        if self.judge is not None and self.judge.kind != "pairwise":
            raise ValueError(f"judge.kind: win rate needs a pairwise judge, not {self.judge.kind}")
        if self.against is not None and self.judge is None:
            raise ValueError("`against` names the win-rate opponent; it needs a pairwise `judge`")
        return self
