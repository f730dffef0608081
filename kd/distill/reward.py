"""Distilled reward models: a Bradley-Terry scalar head trained on a teacher's preference pairs (TRL RewardTrainer).

`train_reward_model` is the whole `reward_models.<name>` stage. The feedback records are split by prompt into
trained and held-out ones (a stable hash, so the split never moves between runs); each record gives one pair
(`best_worst`) or every differently-scored pair of its candidates (`all`). Training pairs are tokenised here
with `kd.runtime.tokenize.encode`, and the held-out accuracy is computed by `kd.runtime.scoring.RewardScorer`
itself, so training, metrics, self-knowledge filtering and evaluation all see the same token ids and read the
same logit. Checkpoints, resume and the MLflow run work exactly as for students.

References: Bradley & Terry, Rank Analysis of Incomplete Block Designs, 1952; Ouyang et al., Training language
models to follow instructions with human feedback (InstructGPT, reward model loss Eq. 1), 2022,
https://arxiv.org/abs/2203.02155
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kd.config import Params, load_params
from kd.config.students import FromPretrained, RewardModel
from kd.distill import envelope
from kd.distill.trl_runs import run_trainer, step_callback, trainer_args
from kd.errors import KdError
from kd.paths import under
from kd.records import canonical_json, sha256_text
from kd.runtime.init import freeze, init_student
from kd.runtime.models import trusted_code
from kd.runtime.scoring import RewardScorer
from kd.runtime.tokenize import encode

OBJECTIVE = "bradley_terry"


@dataclass(frozen=True)
class Pair:
    """One preference: after `prompt`, the assistant text `chosen` is better than `rejected`."""

    record: str  # id of the feedback record it comes from
    prompt: list[dict[str, Any]]
    chosen: str
    rejected: str


def reward_config(params: Params, name: str) -> RewardModel:
    if name not in params.reward_models:
        raise KdError(f"params.yaml: reward_models.{name}: not declared "
                      f"(declared: {', '.join(params.reward_models) or 'none'})")
    return params.reward_models[name]


def load_records(name: str, cfg: RewardModel, root: Path) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Records of every feedback dataset in order (a record listed twice counts once), and the datasets'
    {name, path, fingerprint}."""
    records, refs = envelope.read_training_data(root, cfg.datasets)
    for r in records:
        if not all(k in r for k in ("prompt", "chosen", "rejected")):
            raise KdError(f"reward_models.{name}.datasets: record {r.get('id', '?')[:12]} has no prompt/chosen/rejected; "
                          f"a reward model trains on feedback records")
    return records, refs


def _unit(text: str) -> float:
    """A stable number in [0, 1) from a text: the first 64 bits of its sha256."""
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:16], 16) / 2**64


def split(records: list[dict[str, Any]], held_out: float, key: str = "reward_models.<name>.datasets"
          ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(trained, held-out) records: a record is held out when the hash of its prompt falls below `held_out`.

    By prompt, not by record, so one prompt in two feedback datasets is never trained on and tested on. The
    split depends on nothing but the prompts (not on order, count or seed), so a record never changes side
    as data is added. With two or more prompts, at least one lands on each side.

    Raises:
        KdError: naming `key` when there are fewer than two distinct prompts.
    """
    groups: dict[str, float] = {}
    for r in records:
        p = canonical_json(r["prompt"])
        groups.setdefault(p, _unit(p))
    if len(groups) < 2:
        raise KdError(f"{key}: {len(records)} records with {len(groups)} distinct prompt(s); a reward model needs "
                      f"at least 2 (some to train on, some held out for its accuracy)")
    held = {p for p, u in groups.items() if u < held_out}
    by_hash = sorted(groups, key=lambda p: (groups[p], p))
    if not held:
        held = {by_hash[0]}
    elif len(held) == len(groups):
        held.discard(by_hash[-1])
    in_held = [canonical_json(r["prompt"]) in held for r in records]
    return [r for r, h in zip(records, in_held, strict=True) if not h], [r for r, h in zip(records, in_held,
                                                                                           strict=True) if h]


def _text(completion: Any, rid: str) -> str:
    """The assistant text of a one-message completion (RewardScorer scores exactly that shape)."""
    if (isinstance(completion, list) and len(completion) == 1 and isinstance(completion[0], dict)
            and completion[0].get("role") == "assistant"):
        return completion[0]["content"]
    raise KdError(f"record {rid[:12]}: a completion must be one assistant message to be scored by a reward model")


def make_pairs(records: list[dict[str, Any]], how: str, key: str = "reward_models.<name>.pairs") -> list[Pair]:
    """`best_worst`: each record's chosen/rejected; `all`: every pair of its candidates with different scores,
    the better one first (candidates come best first, but the scores decide)."""
    pairs = []
    for r in records:
        if how == "best_worst":
            pairs.append(Pair(r["id"], r["prompt"], _text(r["chosen"], r["id"]), _text(r["rejected"], r["id"])))
            continue
        cands = r.get("candidates")
        if not cands:
            raise KdError(f"{key}: 'all' needs each record's scored `candidates`; record {r['id'][:12]} has none "
                          f"(use pairs: best_worst)")
        for i, a in enumerate(cands):
            for b in cands[i + 1:]:
                if a["score"] == b["score"]:
                    continue  # no order to learn
                good, bad = (a, b) if a["score"] > b["score"] else (b, a)
                pairs.append(Pair(r["id"], r["prompt"], _text(good["completion"], r["id"]),
                                  _text(bad["completion"], r["id"])))
    return pairs


def _ids(tok: Any, prompt: list[dict[str, Any]], text: str) -> list[int]:
    """Token ids exactly as RewardScorer feeds them: prompt + assistant turn through the chat template."""
    return encode(tok, {"prompt": prompt, "completion": [{"role": "assistant", "content": text}]}, 10**9)[0]


def tokenised(tok: Any, pairs: list[Pair], max_length: int) -> tuple[list[Pair], list[dict[str, list[int]]]]:
    """(pairs that fit, their {chosen_ids, rejected_ids}): a pair with a side over `max_length` is set aside,
    as RewardScorer refuses to score a cut-off candidate (it would judge another text)."""
    kept, rows = [], []
    for p in pairs:
        c, r = _ids(tok, p.prompt, p.chosen), _ids(tok, p.prompt, p.rejected)
        if len(c) <= max_length and len(r) <= max_length:
            kept.append(p)
            rows.append({"chosen_ids": c, "rejected_ids": r})
    return kept, rows


def score_pairs(model: Any, tok: Any, pairs: list[Pair], batch_size: int) -> list[tuple[float, float]]:
    """(r(chosen), r(rejected)) of each pair, computed by RewardScorer's own code on an in-memory model.

    The model must be on the CPU in float32, as RewardScorer loads a saved one; each distinct completion is
    scored once.
    """
    # Handing RewardScorer the trained model runs exactly the code that later scores the saved directory (same
    # tokenisation, padding, batching and rounding).
    scorer = RewardScorer(Path("."), batch_size, loaded=(model, tok))
    items: dict[str, dict[str, Any]] = {}
    keys = []
    for p in pairs:
        ck, rk = (sha256_text(canonical_json([p.prompt, text])) for text in (p.chosen, p.rejected))
        for k, text in ((ck, p.chosen), (rk, p.rejected)):
            items[k] = {"messages": p.prompt, "completion": text, "max_length": 10**9}
        keys.append((ck, rk))
    scores: dict[str, float] = {}
    scorer.generate(sorted(items.items()), lambda k, answer: scores.__setitem__(k, answer["score"]))
    return [(scores[c], scores[r]) for c, r in keys]


def pair_metrics(scores: list[tuple[float, float]]) -> tuple[float | None, float | None]:
    """(accuracy, mean margin): a pair is right when r(chosen) > r(rejected); a tie counts as wrong."""
    if not scores:
        return None, None
    accuracy = sum(c > r for c, r in scores) / len(scores)
    return round(accuracy, 6), round(sum(c - r for c, r in scores) / len(scores), 6)


def init_reward_model(cfg: RewardModel, params: Params, root: Path, name: str, dtype: Any = None) -> tuple[Any, Any]:
    """The untrained reward model: the declared init as a one-label sequence classifier.

    `from_pretrained` loads the directory as AutoModelForSequenceClassification (keeping its score head when it
    is already a reward model); `from_teacher`/`from_config` build the student and keep its base weights. A new
    score head is drawn from `training.seed` without touching the global RNG, so a rerun starts identically.
    """
    import torch

    dtype = dtype or torch.float32
    key = f"reward_models.{name}.init"
    seed = cfg.training.seed
    if isinstance(cfg.init, FromPretrained):
        model, tok, fresh_head = _from_pretrained(cfg.init, root, dtype, key)
    else:
        causal, tok = init_student(cfg.init, params, root, dtype=dtype, seed=seed, key=key)
        model, fresh_head = _as_classifier(causal), True
    if fresh_head:
        _init_head(model, seed)
    if tok.pad_token is None:  # a batch needs a pad id, and the classifier needs it to find each row's last token
        tok.pad_token = tok.eos_token
    model.config.pad_token_id = tok.pad_token_id
    return model.eval(), tok


def _from_pretrained(init: FromPretrained, root: Path, dtype: Any, key: str) -> tuple[Any, Any, bool]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    local = under(root, init.path)
    where = str(local) if local.is_dir() else init.path  # else a hub id; needs the network
    trust = trusted_code(local, init, key)  # a local directory: `code_digest` pins; a hub id: a commit
    kw = {"revision": init.revision, "trust_remote_code": trust}
    try:
        tok = AutoTokenizer.from_pretrained(where, **kw)
        model, info = AutoModelForSequenceClassification.from_pretrained(
            where, num_labels=1, dtype=dtype, use_safetensors=True, output_loading_info=True, **kw)
    except (OSError, ValueError) as e:
        raise KdError(f"{key}.path: cannot load {init.path} as a safetensors model ({str(e).splitlines()[0]})") from None
    base = model.base_model_prefix
    fresh = any(not k.startswith(f"{base}.") for k in info.get("missing_keys", []))
    return model, tok, fresh


def _as_classifier(causal: Any) -> Any:
    """The causal LM's base model (every weight but the LM head) under a one-label classification head."""
    import copy

    from transformers import AutoModelForSequenceClassification
    from transformers.initialization import no_init_weights

    config = copy.deepcopy(causal.config)
    config.num_labels = 1
    with no_init_weights():  # the base is overwritten below and the head drawn by _init_head
        model = AutoModelForSequenceClassification.from_config(config, dtype=causal.dtype)
    base = model.base_model_prefix
    getattr(model, base).load_state_dict(getattr(causal, base).state_dict(), strict=True)
    return model


def _init_head(model: Any, seed: int) -> None:
    """Normal(0, initializer_range) weights and zero bias for every parameter outside the base model."""
    import torch

    base = model.base_model_prefix
    gen = torch.Generator().manual_seed(seed)
    std = getattr(model.config, "initializer_range", 0.02)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.startswith(f"{base}."):
                continue
            if pname.endswith("bias"):
                p.zero_()
            else:
                p.copy_(torch.normal(0.0, std, p.shape, generator=gen).to(p.dtype))


def _train(model: Any, tok: Any, rows: list[dict[str, list[int]]], cfg: RewardModel, ckpt_dir: Path, device: str,
           on_step: Any) -> Any:
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    # RewardTrainer's own token count starts again at 0 on resume (it is not in the checkpoint); the Trainer's
    # `num_input_tokens_seen` counts the same non-padding tokens and is restored with the trainer state. The
    # Trainer logs its speed (`train_runtime`, ...) next to it: wall-clock noise, dropped.
    def tokens(m: dict[str, float]) -> dict[str, float]:
        if "num_input_tokens_seen" in m:
            m["tokens"] = m.pop("num_input_tokens_seen")
        return {k: v for k, v in m.items() if not k.startswith("train_")}

    # Rows arrive as `chosen_ids`/`rejected_ids`, so TRL tokenises nothing and trains on the very ids
    # RewardScorer reads; none exceeds max_length, so its length filter drops nothing either.
    args = RewardConfig(**trainer_args(cfg.training, ckpt_dir, device), include_num_input_tokens_seen="non_padding")
    trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                            callbacks=[step_callback(lambda m: on_step(tokens(m)))])
    result = run_trainer(trainer, ckpt_dir)
    result.history = [tokens(h) for h in result.history]
    result.tokens = int(result.history[-1].get("tokens", 0)) if result.history else 0
    return result


def train_reward_model(name: str, root: Path = Path(".")) -> str:
    """Build `models/<name>/`, `metrics/<name>.json`, `plots/<name>.csv`; return the summary line."""
    import torch

    params = load_params(root)
    cfg = reward_config(params, name)
    t = cfg.training
    records, refs = load_records(name, cfg, root)
    if not records:
        raise envelope.no_records("reward_models", name, cfg.datasets)
    trained, held = split(records, cfg.held_out, f"reward_models.{name}.datasets")
    trained = envelope.subsample(trained, t)  # the held-out prompts stay the same whatever the seed
    job = envelope.prepare(name, "reward_models", cfg, params, root, refs)
    model, tok = init_reward_model(cfg, params, root, name, dtype=job.dtype)
    freeze(model, t.freeze_layers, f"reward_models.{name}.training.freeze_layers")

    # Everything a user can get wrong is checked before an MLflow run exists (no FAILED runs for typos).
    key = f"reward_models.{name}.pairs"
    candidates = make_pairs(trained, cfg.pairs, key), make_pairs(held, cfg.pairs, key)
    (train_pairs, rows), (held_pairs, _) = (tokenised(tok, c, t.max_length) for c in candidates)
    too_long = sum(map(len, candidates)) - len(train_pairs) - len(held_pairs)
    if not train_pairs:
        raise KdError(f"reward_models.{name}.training.max_length: no training pair fits in {t.max_length} tokens "
                      f"({len(candidates[0])} pairs from {len(trained)} records)")

    run = job.start_run()

    def on_step(metrics: dict[str, float]) -> None:
        run.log_metrics({k: v for k, v in metrics.items() if k != "step"}, step=int(metrics["step"]))

    with run.failing():
        result = _train(model.to(job.device), tok, rows, cfg, job.ckpt_dir, job.device, on_step)
        # As RewardScorer loads the saved weights: rounded to the declared dtype, scored in float32 (the later
        # rounding to the declared dtype when saving is then exact).
        model.to("cpu", job.declared).to(torch.float32)
        accuracy, margin = pair_metrics(score_pairs(model, tok, held_pairs, t.batch_size))
        accuracy_train, _ = pair_metrics(score_pairs(model, tok, train_pairs, t.batch_size))
    extra = {"accuracy": accuracy, "accuracy_train": accuracy_train, "margin_held_out": margin,
             "pairs_train": len(train_pairs), "pairs_held_out": len(held_pairs), "pairs_too_long": too_long}
    acc = f"{accuracy:.2f}" if accuracy is not None else "n/a"
    return job.finish(run, model, tok, result, OBJECTIVE, f"held-out accuracy {acc} on {len(held_pairs)} pairs",
                      on=f" on {len(train_pairs)} pairs", extra=extra,
                      logged={k: v for k, v in extra.items() if k.startswith(("accuracy", "margin")) and v is not None},
                      held_out=sorted(r["id"] for r in held))
