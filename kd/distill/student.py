"""Student models: initialisation from params (`init:`) and the model-directory format kd writes.

A model directory `models/<name>/` holds safetensors weights, the tokenizer, `kd_model.json` (what made the
model: datasets and their fingerprints, logits, params, git commit, MLflow run, final metrics) and a
`README.md` model card that says the same in words (DESIGN.md §5).

References: DistilBERT (Sanh et al., 2019) and Minitron (Muralidharan et al., 2024) initialise a student from
a subset of the teacher's layers.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from kd.config import Params
from kd.config.students import FromConfig, FromPretrained, FromTeacher, Init
from kd.device import resolve_device, resolve_dtype
from kd.errors import KdError
from kd.records import replace_dir

INFO_FILE = "kd_model.json"
CARD_FILE = "README.md"
_LAYER_KEY = re.compile(r"^(.*\.layers\.)(\d+)(\..*)$")


def kept_layers(num_layers: int, every: int, layers: list[int] | None, key: str = "init") -> list[int]:
    """Teacher layers a `from_teacher` student keeps: `layers` if given, else 0, k, 2k, ... and the last."""
    if layers is not None:
        bad = [i for i in layers if not 0 <= i < num_layers]
        if bad or not layers:
            raise KdError(f"{key}.layers: {bad or layers} out of range (the teacher has layers 0..{num_layers - 1})")
        if sorted(set(layers)) != list(layers):
            raise KdError(f"{key}.layers: {layers} must be strictly increasing (a layer is kept once, in order)")
        return list(layers)
    kept = list(range(0, num_layers, every))
    if kept[-1] != num_layers - 1:
        kept.append(num_layers - 1)  # the last layer feeds the final norm and head; keeping it matters most
    return kept


def teacher_path(params: Params, teacher: str, root: Path) -> Path:
    """The directory of a local teacher, checked to exist (the `teacher` stage builds the embedded one)."""
    cfg = params.teachers[teacher]
    path = Path(cfg.path) if Path(cfg.path).is_absolute() else root / cfg.path
    if not path.is_dir():
        raise KdError(f"teachers.{teacher}.path: {cfg.path} does not exist (`dvc repro teacher` builds the embedded one)")
    return path


def load_teacher(params: Params, teacher: str, root: Path, dtype: Any = None) -> tuple[Any, Any]:
    """A local teacher's model (eval mode, no gradients) and tokenizer, for online scoring."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = params.teachers[teacher]
    path = teacher_path(params, teacher, root)
    if dtype is None:
        dtype = resolve_dtype(cfg.dtype, resolve_device(cfg.device))
    kw = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code}
    tok = AutoTokenizer.from_pretrained(path, **kw)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True, **kw).eval()
    model.requires_grad_(False)
    return model, tok


def init_student(cfg: Init, params: Params, root: Path, dtype: Any = None, seed: int = 0,
                 key: str = "init") -> tuple[Any, Any]:
    """Build the untrained student declared by `init:`; return (model in eval mode, tokenizer).

    Deterministic: `from_teacher` copies weights; `from_config` draws its random init from `seed` (pass the
    student's `training.seed`, as training does) without touching the global RNG.

    Args:
        key: the params key of `cfg`, e.g. `students.student_fkl.init`, named in errors.
    """
    import torch

    dtype = dtype or torch.float32
    match cfg:
        case FromTeacher():
            return _from_teacher(cfg, params, root, dtype, key)
        case FromConfig():
            return _from_config(cfg, params, root, dtype, seed)
        case FromPretrained():
            return _from_pretrained(cfg, root, dtype, key)
        case _:
            raise AssertionError(cfg)


def _from_teacher(cfg: FromTeacher, params: Params, root: Path, dtype: Any, key: str) -> tuple[Any, Any]:
    import copy

    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    teacher, tok = load_teacher(params, cfg.teacher, root, dtype=dtype)
    tconf = teacher.config
    kept = kept_layers(tconf.num_hidden_layers, cfg.every, cfg.layers, key)
    sconf = copy.deepcopy(tconf)
    sconf.num_hidden_layers = len(kept)
    if getattr(sconf, "layer_types", None):  # per-layer attention kinds (sliding/full) follow their layers
        sconf.layer_types = [tconf.layer_types[i] for i in kept]
    new_index = {old: new for new, old in enumerate(kept)}
    state = {}
    for name, tensor in teacher.state_dict().items():
        m = _LAYER_KEY.match(name)
        if m is None:
            state[name] = tensor  # embeddings, final norm, lm_head
        elif int(m[2]) in new_index:
            state[f"{m[1]}{new_index[int(m[2])]}{m[3]}"] = tensor
    with no_init_weights():  # every weight is overwritten below; a random init would only cost time
        model = AutoModelForCausalLM.from_config(sconf, dtype=dtype)
    model.load_state_dict(state, strict=True)
    model.tie_weights()
    model.generation_config = teacher.generation_config
    return model.eval(), tok


def _from_config(cfg: FromConfig, params: Params, root: Path, dtype: Any, seed: int) -> tuple[Any, Any]:
    import torch
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    path = teacher_path(params, cfg.teacher, root)
    tok = AutoTokenizer.from_pretrained(path)
    tconf = AutoConfig.from_pretrained(path)
    # The teacher's vocabulary size (not len(tok)): top-k ids and full-vocabulary logits must line up.
    config = LlamaConfig(vocab_size=tconf.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                         num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                         num_key_value_heads=cfg.num_kv_heads,
                         max_position_embeddings=getattr(tconf, "max_position_embeddings", 2048),
                         bos_token_id=tconf.bos_token_id, eos_token_id=tconf.eos_token_id,
                         pad_token_id=getattr(tconf, "pad_token_id", None), tie_word_embeddings=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(dtype)
    with contextlib.suppress(OSError):  # a teacher without generation_config.json: the config's defaults apply
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model.eval(), tok


def _from_pretrained(cfg: FromPretrained, root: Path, dtype: Any, key: str) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = Path(cfg.path) if Path(cfg.path).is_absolute() else root / cfg.path
    where = str(local) if local.is_dir() else cfg.path  # else a hub id; needs the network
    kw = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code}
    try:
        tok = AutoTokenizer.from_pretrained(where, **kw)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, use_safetensors=True, **kw)
    except (OSError, ValueError) as e:
        raise KdError(f"{key}.path: cannot load {cfg.path} as a safetensors causal LM ({str(e).splitlines()[0]})") from None
    return model.eval(), tok


def describe_init(init: dict[str, Any]) -> str:
    """`from_teacher (teacher smollm2, every 10)`: an `init:` section in words."""
    rest = ", ".join(f"{k} {v}" for k, v in init.items() if k != "kind" and v is not None)
    return f"`{init.get('kind')}` ({rest})" if rest else f"`{init.get('kind')}`"


def model_card(info: dict[str, Any]) -> str:
    """A README.md naming what made the model: datasets with fingerprints, objective, params, commit, run.

    `info["section"]` names the params section of the model (default `students`; `reward_models`).
    """
    datasets = "\n".join(f"| `{d['name']}` | `{d['fingerprint']}` |" for d in info.get("datasets", []))
    logits = info.get("logits")
    mlflow = info.get("mlflow") or {}
    metrics = "\n".join(f"| {k} | {v} |" for k, v in sorted((info.get("metrics") or {}).items()))
    return f"""---
library_name: transformers
tags: [kd, distillation]
---
# {info['name']}

Distilled by kd with objective **{info['objective']}**, initialised {describe_init(info['init'])}.

## Training data
| dataset | fingerprint (sha256 over record ids) |
|---|---|
{datasets}

Teacher logits: {f"`{logits['name']}` (fingerprint `{logits['fingerprint']}`)" if logits else "none"}

## Provenance
- git commit: `{info.get('git_commit', 'unknown')}`
- MLflow run: `{mlflow.get('run_id')}` (tracking URI `{mlflow.get('tracking_uri')}`)

## Final metrics
| metric | value |
|---|---|
{metrics}

## Params (`{info.get('section', 'students')}.{info['name']}`)
```json
{json.dumps(info.get('params', {}), indent=2, sort_keys=True)}
```
"""


def save_model(model: Any, tokenizer: Any, out_dir: Path, info: dict[str, Any], card: str | None = None) -> None:
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
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        (tmp / CARD_FILE).write_text(card if card is not None else model_card(info), encoding="utf-8")
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_info(model_dir: Path) -> dict[str, Any]:
    """The `kd_model.json` of a model directory written by `save_model`."""
    path = Path(model_dir) / INFO_FILE
    if not path.is_file():
        raise KdError(f"{model_dir}: no {INFO_FILE}; build the student first (`dvc repro`)")
    return json.loads(path.read_text(encoding="utf-8"))
