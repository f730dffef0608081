"""The logits store: how a feature dataset's teacher top-k log-probabilities are laid out, written and read.

A feature dataset `data/<name>/` holds, next to the usual records/manifest/rejected files,
`logits.safetensors` with flat arrays over all records (row r of `offsets` locates record r, the r-th line
of records.jsonl, sorted by id):

    input_ids      int32   [total tokens]           the prompt + completion ids the teacher saw
    topk_ids       uint16  [completion tokens, k]   (int32 when the vocabulary has ≥ 65536 ids)
    topk_logprobs  float16 [completion tokens, k]   log-softmax in float32, then rounded
    tail_logprob   float16 [completion tokens]      log(1 − Σ top-k), floored at TAIL_FLOOR
    tempered_tails float16 [completion tokens, m]   only when students train at m temperatures T ≠ 1 (the
                                                    manifest's `tail_temperatures`): log Σ_{j∉top-k} p_j^{1/T},
                                                    floored at TAIL_FLOOR (kd.distill.losses says why)
    offsets        int64   [records + 1, 2]         start of each record in input_ids / in the top-k arrays
    completion_start int64 [records]                index into the record's ids where its completion starts

Completion row j of a record is the teacher's distribution for token input_ids[completion_start + j], i.e.
the logits at position completion_start + j − 1. At k = 20 that is ≈ 90 bytes per completion token.
The feature stage (kd.elicit.feature) writes it; students (kd.distill) read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kd.cache.features import FORMAT, TEMPERED
from kd.errors import KdError
from kd.records import MANIFEST_FILE, canonical_json, read_dataset
from kd.runtime.tokenize import tokenizer_digest

LOGITS_FILE = "logits.safetensors"
# log(tail mass) floor: e^-80 ≈ 2e-35 is "no tail" for any loss, and float16 holds it exactly enough.
TAIL_FLOOR = -80.0


def pack(parts: list[dict[str, Any]], starts: list[int], top_k: int, vocab: int,
         temperatures: tuple[float, ...] = ()) -> dict[str, Any]:
    """The flat arrays of the file from per-record tensors (as the feature cache holds them), in record order."""
    import torch

    offsets, tok_at, comp_at = [[0, 0]], 0, 0
    for p in parts:
        tok_at, comp_at = tok_at + len(p["input_ids"]), comp_at + len(p["tail_logprob"])
        offsets.append([tok_at, comp_at])
    # uint16 halves the ids when the vocabulary fits (49152 for SmolLM2): 40 instead of 80 bytes/token at k=20.
    id_dtype = torch.uint16 if vocab <= 65536 else torch.int32
    k = top_k
    tempered = {TEMPERED: torch.cat([p[TEMPERED] for p in parts]) if parts
                else torch.zeros((0, len(temperatures)), dtype=torch.float16)} if temperatures else {}
    return {**tempered,
        "input_ids": torch.cat([p["input_ids"] for p in parts]) if parts else torch.zeros(0, dtype=torch.int32),
        "topk_ids": (torch.cat([p["topk_ids"] for p in parts]) if parts else torch.zeros((0, k), dtype=torch.int32))
        .to(id_dtype),
        "topk_logprobs": torch.cat([p["topk_logprobs"] for p in parts]) if parts
        else torch.zeros((0, k), dtype=torch.float16),
        "tail_logprob": torch.cat([p["tail_logprob"] for p in parts]) if parts else torch.zeros(0, dtype=torch.float16),
        "offsets": torch.tensor(offsets, dtype=torch.int64),
        "completion_start": torch.tensor(starts, dtype=torch.int64),
    }


def save_logits(path: Path, arrays: dict[str, Any], top_k: int, temperatures: tuple[float, ...] = ()) -> int:
    """Write the file; returns its size in bytes."""
    from safetensors.torch import save_file

    # One metadata key: safetensors writes its metadata map in hash order, so several keys would make
    # identical records give different bytes (and DVC would see a changed output).
    meta = {"format": FORMAT, "top_k": top_k, **({"tail_temperatures": list(temperatures)} if temperatures else {})}
    save_file(arrays, str(path), metadata={"kd": canonical_json(meta)})
    return path.stat().st_size


@dataclass(frozen=True)
class FeatureRow:
    """One record's stored teacher distribution; row j of the top-k tensors predicts input_ids[completion_start + j]."""

    input_ids: Any      # LongTensor [L]
    completion_start: int
    topk_ids: Any       # LongTensor [C, k], C = L − completion_start
    topk_logprobs: Any  # FloatTensor [C, k]
    tail_logprob: Any   # FloatTensor [C]: the tail at T = 1
    tempered: dict[float, Any]  # T ≠ 1 -> FloatTensor [C], log Σ_{j∉top-k} p_j^{1/T}

    def tail(self, temperature: float) -> Any:
        """The tail `kd.distill.losses.topk_divergence` takes at `temperature` (one the store holds)."""
        return self.tail_logprob if temperature == 1.0 else self.tempered[temperature]


class LogitsStore:
    """Read access to a feature dataset, by source record id."""

    def __init__(self, path: Path, manifest: dict[str, Any], records: list[dict[str, Any]],
                 arrays: dict[str, Any]) -> None:
        self.path, self.manifest, self.arrays = path, manifest, arrays
        self.name: str = manifest["name"]
        self.tokenizer_digest: str = manifest["tokenizer_digest"]
        self.teacher: dict[str, Any] = manifest["teacher"]
        self.top_k: int = manifest["top_k"]
        self.temperatures: tuple[float, ...] = (1.0, *manifest.get("tail_temperatures", []))
        self.records = records
        self._row = {r["source_id"]: i for i, r in enumerate(records)}

    def __len__(self) -> int:
        return len(self.records)

    def __contains__(self, source_id: str) -> bool:
        return source_id in self._row

    def get(self, source_id: str) -> FeatureRow:
        row = self._row.get(source_id)
        if row is None:
            raise KdError(f"logits dataset '{self.name}' ({self.path}) has no features for record {source_id}; "
                          f"rebuild it (`dvc repro {self.name}`)")
        a = self.arrays
        (t0, c0), (t1, c1) = a["offsets"][row].tolist(), a["offsets"][row + 1].tolist()
        tempered = {t: a[TEMPERED][c0:c1, j].float() for j, t in enumerate(self.temperatures[1:])}
        return FeatureRow(input_ids=a["input_ids"][t0:t1].long(), completion_start=int(a["completion_start"][row]),
                          topk_ids=a["topk_ids"][c0:c1].long(), topk_logprobs=a["topk_logprobs"][c0:c1].float(),
                          tail_logprob=a["tail_logprob"][c0:c1].float(), tempered=tempered)

    def check_temperature(self, temperature: float, key: str) -> None:
        """Raise a one-line KdError naming `key` unless the store holds the teacher's tail at `temperature`."""
        if temperature not in self.temperatures:
            raise KdError(f"{key}: {temperature:g}, but logits dataset '{self.name}' holds the teacher's tail at T = "
                          f"{', '.join(f'{t:g}' for t in self.temperatures)} only (the tail at T needs the full "
                          f"logits); rebuild it (`dvc repro {self.name}`)")


def load_logits(path: Path | str) -> LogitsStore:
    """Open a feature dataset directory (`data/<name>`) written by the feature stage."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / MANIFEST_FILE).exists():
        raise KdError(f"{path}: no {MANIFEST_FILE}; build the logits dataset first (`dvc repro {path.name}`)")
    manifest, records = read_dataset(path)  # re-checked against its manifest
    if manifest.get("method") != "feature":
        raise KdError(f"{path}: a {manifest.get('method')} dataset, not a feature (logits) dataset")
    arrays = load_file(str(path / manifest["files"]["logits"]))
    if (TEMPERED in arrays) != bool(manifest.get("tail_temperatures")) or \
            (TEMPERED in arrays and arrays[TEMPERED].shape[1] != len(manifest["tail_temperatures"])):
        raise KdError(f"{path}: {LOGITS_FILE} and its manifest disagree on the tail temperatures; rebuild it "
                      f"(`dvc repro {path.name}`)")
    if arrays["offsets"].shape[0] != len(records) + 1:
        raise KdError(f"{path}: {LOGITS_FILE} holds {arrays['offsets'].shape[0] - 1} records but records.jsonl "
                      f"{len(records)}; rebuild it (`dvc repro {path.name}`)")
    return LogitsStore(path, manifest, records, arrays)


def check_compatible(store: LogitsStore, tokenizer: Any, teacher_identity: dict[str, Any] | None = None) -> None:
    """Refuse logits a student cannot use: another tokenizer (ids mean other tokens) or another teacher.

    Raises:
        KdError: naming the logits dataset and both digests.
    """
    mine = tokenizer_digest(tokenizer)
    if mine != store.tokenizer_digest:
        raise KdError(f"logits dataset '{store.name}' ({store.path}) was made with tokenizer {store.tokenizer_digest[:12]}, "
                      f"but the student's tokenizer is {mine[:12]}: its token ids mean different tokens. Train this "
                      f"student from the teacher's tokenizer (init from_teacher/from_config) or re-elicit the logits")
    if teacher_identity is not None and teacher_identity.get("digest") != store.teacher.get("digest"):
        raise KdError(f"logits dataset '{store.name}' ({store.path}) comes from teacher "
                      f"{store.teacher.get('model')} ({str(store.teacher.get('digest'))[:12]}), not from "
                      f"{teacher_identity.get('model')} ({str(teacher_identity.get('digest'))[:12]}); "
                      f"rebuild it (`dvc repro {store.name}`)")
