"""Student initialisation from params (`init:`): a subset of a teacher's layers, a fresh architecture on the
teacher's tokenizer, or a local model directory.

References: DistilBERT (Sanh et al., 2019) and Minitron (Muralidharan et al., 2024) initialise a student from
a subset of the teacher's layers.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Any

from kd.config import Params
from kd.config.students import FromConfig, FromPretrained, FromTeacher, Init
from kd.errors import KdError
from kd.paths import under
from kd.runtime.models import directory_digest, load_teacher, teacher_path, trusted_code

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

    local = under(root, cfg.path)
    where = str(local) if local.is_dir() else cfg.path  # else a hub id; needs the network
    trust = trusted_code(local, cfg, key)  # a local directory: `code_digest` pins; a hub id: a commit
    kw = {"revision": cfg.revision, "trust_remote_code": trust}
    try:
        tok = AutoTokenizer.from_pretrained(where, **kw)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, use_safetensors=True, **kw)
    except (OSError, ValueError) as e:
        raise KdError(f"{key}.path: cannot load {cfg.path} as a safetensors causal LM ({str(e).splitlines()[0]})") from None
    return model.eval(), tok


def init_digest(init: Init, params: Params, root: Path) -> str | None:
    """What the init weights come from, for a training run's checkpoint hash (a rebuilt teacher must not resume).

    None for a hub id (no local directory to hash)."""
    if isinstance(init, FromTeacher | FromConfig):
        return directory_digest(teacher_path(params, init.teacher, root))
    path = under(root, init.path)
    return directory_digest(path) if path.is_dir() else None


def frozen_init(init: Init, params: Params, root: Path, dtype: Any, seed: int, key: str) -> Any:
    """A frozen copy of a model's initialisation, built again from disk (never a copy of the model being
    trained, which would move with it): DPO's reference and the KL anchor of GRPO/RLOO."""
    model, _ = init_student(init, params, root, dtype=dtype, seed=seed, key=key)
    model.eval().requires_grad_(False)
    return model


def freeze(model: Any, layers: int, key: str) -> None:
    """Stop training the input embeddings (an LM head tied to them with them) and the bottom `layers`
    transformer layers; 0 freezes nothing."""
    if not layers:
        return
    stack = model.base_model.layers
    if layers > len(stack):
        raise KdError(f"{key}: {layers} is more layers than the model has ({len(stack)})")
    model.get_input_embeddings().requires_grad_(False)
    for layer in stack[:layers]:
        layer.requires_grad_(False)
